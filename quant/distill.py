"""Block-wise reconstruction, resumable unit by unit: DilateQuant's BKD and Q-Diffusion's BRECQ.

Unit k of the quantized model is trained to match the FP unit k's output, its input taken from the
already-quantized chain: MSE(B_k∘…∘B_1(x), B̂_k∘…∘B̂_1(x))  (paper eq. 17; SPEC §4); beyond the paper,
`DistillConfig.fp_input` takes each training sample's input from the FP chain instead with that probability.
What is trained is a sequence of `Objective`s, one after the other on each unit: BKD trains weights, Δ_w and the
per-timestep Δ_x, z_x together on mixed-timestep batches (`DistillObjective`; beyond the paper,
`BKDTraining.STAGED` trains the weights first with FP activations, then the activation quantizers);
Q-Diffusion's passes train AdaRound rounding or activation steps (`quant/methods/qdiff.py`).
Only one unit's graph lives at a time; its inputs and targets are cached on the CPU.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common.checkpoint import require_finite, state_dict_mismatch, torch_load
from common.device import release_free_memory
from common.errors import AdapterError, CheckpointError
from common.files import atomic_torch_save
from quant.calib_data import CalibSet
from quant.unit_cache import CachePolicy, Store, describe, per_sample_shapes, plan, unit_output
from quant.layers import QuantLayer, QuantMatMul
from quant.model import QuantModel, quant_enabled

logger = logging.getLogger(__name__)


class BKDTraining(Enum):
    """What BKD trains on each unit, and in which order. JOINT is the paper (eq. 17): weights, Δ_w, Δ_x and z_x
    together, everything quantized. STAGED (beyond the paper) splits it as BRECQ/Q-Diffusion do: the weights and
    Δ_w (and learnable scales) with the activation quantizers off, then Δ_x and z_x with the weights frozen,
    `iters` iterations each."""
    JOINT = "joint"
    STAGED = "staged"


class LRSchedule(Enum):
    """Learning rate over a unit's iterations. COSINE anneals every group from its lr to 0, as the
    BRECQ-family reconstructions do for learned steps (the paper does not say); CONSTANT keeps it."""
    COSINE = "cosine"
    CONSTANT = "constant"


@dataclass(frozen=True)
class DistillConfig:
    iters: int = 5000          # per unit (paper: 5K iterations, batch 32)
    batch_size: int = 32
    lr_weight: float = 1e-3    # weights and biases (paper: 1e-2; why 1e-3: docs/method-choices.md)
    lr_quant: float = 1e-4     # Δ_w, z_w (and Δ_x, z_x unless lr_act is set) (paper: 1e-4)
    lr_act: float | None = None  # Δ_x, z_x of the activation quantizers; None = lr_quant
    lr_scale: float = 1e-5     # learnable equivalent-scaling factors, --scaling learnable (paper Table 9: 1e-5)
    lr_schedule: LRSchedule = LRSchedule.COSINE
    t_weight_sigma: float | None = None  # weight samples by 1/(σ_t² + this²) (timestep_weights); None: plain MSE
    cache_batch_size: int = 64
    cache_dtype: torch.dtype | None = None   # unit caches: None = the model's dtype; float16 halves them (unit_cache)
    cache_ram_gb: float | None = None        # a unit cache above this goes to a memory-mapped file (None: RAM)
    fp_input: float = 0.0      # probability a training sample's unit input is the FP chain's (0: the paper's eq. 17)
    training: BKDTraining = BKDTraining.JOINT
    seed: int = 0

    def __post_init__(self):
        checks = [("iters", self.iters, 0), ("batch_size", self.batch_size, 1), ("lr_weight", self.lr_weight, 0),
                  ("lr_quant", self.lr_quant, 0), ("lr_act", self.act_lr, 0), ("lr_scale", self.lr_scale, 0)]
        if self.t_weight_sigma is not None:
            checks.append(("t_weight_sigma", self.t_weight_sigma, 1e-4))
        checks.append(("fp_input", self.fp_input, 0.0))
        bad = [f"{name} = {value} (must be >= {low})" for name, value, low in checks if value < low]
        if self.fp_input > 1:
            bad.append(f"fp_input = {self.fp_input} (a probability: must be <= 1)")
        if bad:
            raise ValueError(f"invalid distillation setting: {', '.join(bad)}")

    @property
    def act_lr(self) -> float:
        """The learning rate the activation quantizers train at: lr_act, or lr_quant when it is unset."""
        return self.lr_quant if self.lr_act is None else self.lr_act


def timestep_weights(t: torch.Tensor, sigmas: torch.Tensor, sigma0: float) -> torch.Tensor:
    """Per-sample loss weights 1/(σ_t² + σ0²), scaled to mean 1 over `t` (σ_t = sqrt(1 - ᾱ_t), `sigmas` [T]).

    Beyond the paper. Plain MSE treats every timestep alike, but the same feature error becomes a far larger
    eps error at small t, where the network scales the noise it finds by about 1/σ_t; and the small-t steps are
    the ones whose quantization error costs FID (results/mnist_band_fid_w4a4.json, README). The weight follows
    that gain and levels off below σ0.
    """
    w = 1.0 / (sigmas.to(t.device)[t].double() ** 2 + sigma0 ** 2)
    return (w / w.mean()).float()


@dataclass
class UnitData:
    """A unit's cached inputs (from the quantized chain; with fp_args/fp_kwargs also from the FP chain) and FP
    targets, on the CPU."""
    args: list                        # positional inputs of the unit: tensors [M, ...], or the non-tensor value
                                      # (None, a flag, a size) that every call passed
    target: torch.Tensor              # FP unit output [M, ...]
    t: torch.Tensor                   # [M] timesteps
    kwargs: dict = field(default_factory=dict)   # keyword inputs, likewise: tensors [M, ...] or non-tensor values
    weight: torch.Tensor | None = None   # [M] per-sample loss weights (timestep_weights); None: equal
    stores: list = field(default_factory=list)   # where the tensors live (quant.unit_cache.Store), for release()
    fp_args: list | None = None       # the FP model's inputs to the unit (DistillConfig.fp_input)
    fp_kwargs: dict | None = None

    def batch(self, idx: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None,
              fp_rows: torch.Tensor | None = None):
        """(args, kwargs, target, t) of samples idx, on device (floating tensors cast to `dtype` if given: a
        float16 cache is used at the model's precision). fp_rows [len(idx)] (bool): those samples take the FP
        chain's inputs."""
        def get(v, fp=None):
            if not torch.is_tensor(v):                         # the same value in every call
                return v
            v = v[idx].to(device)
            if fp is not None:
                rows = fp_rows.to(device).view(-1, *[1] * (v.dim() - 1))
                v = torch.where(rows, fp[idx].to(device), v)
            return v.to(dtype) if dtype is not None and v.is_floating_point() else v
        mixed = fp_rows is not None
        if mixed and self.fp_args is None:
            raise ValueError("fp_rows needs the FP chain's inputs (cache_unit_io with fp_inputs=True)")
        fp_args = self.fp_args if mixed else [None] * len(self.args)
        args = [get(a, f) for a, f in zip(self.args, fp_args)]
        kwargs = {k: get(v, self.fp_kwargs[k] if mixed else None) for k, v in self.kwargs.items()}
        return args, kwargs, get(self.target), self.t[idx].to(device)

    def release(self) -> None:
        """Free the cache (and remove its memory-mapped files, if any)."""
        for store in self.stores:
            store.release()

    def weighted(self, idx: torch.Tensor, out: torch.Tensor, target: torch.Tensor):
        """out and target scaled by sqrt(weight) per sample, so any MSE of them is the weighted MSE."""
        if self.weight is None:
            return out, target
        s = self.weight[idx].to(out.device).sqrt().view(-1, *[1] * (out.dim() - 1))
        return out * s, target * s


class _Captured(Exception):
    """Raised by a hook to stop the forward once the unit's input/output is captured."""


def _cpu(v):
    return v.detach().cpu() if torch.is_tensor(v) else v


def _capture(model: nn.Module, call, unit: str, inputs: bool, output: bool):
    """Run `call()` up to submodule `unit` and return its inputs (positional list, keyword dict) and/or its
    output: inputs, output, or (inputs, output)."""
    box = []

    def pre(_, args, kwargs):
        box.append(([_cpu(a) for a in args], {k: _cpu(v) for k, v in kwargs.items()}))
        if not output:
            raise _Captured

    def post(_, args, out):
        box.append(_cpu(unit_output(unit, out)))
        raise _Captured

    module = model.get_submodule(unit)
    handles = ([module.register_forward_pre_hook(pre, with_kwargs=True)] if inputs else []) + \
        ([module.register_forward_hook(post)] if output else [])
    try:
        call()
    except _Captured:
        pass
    finally:
        for h in handles:
            h.remove()
    if len(box) < inputs + output:
        raise RuntimeError(f"unit {unit} was never called")
    return tuple(box) if inputs and output else box[0]


@torch.no_grad()
def cache_unit_io(qmodel: QuantModel, fp_model: nn.Module, unit: str, calib: CalibSet, batch_size: int,
                  policy: CachePolicy = CachePolicy(), spill_dir: Path | None = None,
                  fp_inputs: bool = False) -> UnitData:
    """The unit's inputs (from the quantized chain; with fp_inputs, also the FP model's) and FP targets for
    every calibration sample, kept as the policy says (RAM or a memory-mapped file in spill_dir; the model's
    dtype or a smaller one). Non-tensor inputs (None, flags, sizes) are kept as values; they must be the same in
    every call."""
    device = next(qmodel.parameters()).device
    n, stores, static = len(calib.t), None, None
    for x, t, cond in calib.batches(batch_size, device):
        args, kwargs = _capture(qmodel.model, lambda: qmodel(x, t, **cond), unit, inputs=True, output=False)
        fp_call = lambda: fp_model(x, t, **cond)                          # noqa: E731
        named = {f"arg{i}": a for i, a in enumerate(args)} | {f"kw_{k}": v for k, v in kwargs.items()}
        if fp_inputs:
            (fp_args, fp_kwargs), target = _capture(fp_model, fp_call, unit, inputs=True, output=True)
            named |= {f"fp_arg{i}": a for i, a in enumerate(fp_args)} | \
                {f"fp_kw_{k}": v for k, v in fp_kwargs.items()}
        else:
            target = _capture(fp_model, fp_call, unit, inputs=False, output=True)
        named["target"] = target
        values = {k: v for k, v in named.items() if not torch.is_tensor(v)}
        if static is None:
            static = values
        elif not _same(values, static):
            raise AdapterError(f"unit {unit} is called with non-tensor inputs that change between calls ({values} "
                               f"vs {static}): a reconstruction unit's cached inputs cannot replay them",
                               "pass them as tensors, or let the adapter name units inside this one")
        named = {k: v for k, v in named.items() if torch.is_tensor(v)}
        if stores is None:                                     # allocated once the first batch shows the shapes
            size = n * sum(v[0].numel() * policy.element_bytes(v.dtype) for v in named.values())
            disk = spill_dir is not None and policy.ram_gb is not None and size > policy.ram_gb * 1024 ** 3
            stores = {k: Store(n, tuple(v.shape[1:]), policy.dtype or v.dtype,
                               spill_dir / f"{unit}.{k}.bin" if disk else None) for k, v in named.items()}
        for k, v in named.items():
            stores[k].add(v)
    tensors = {k: st.tensor for k, st in stores.items()} | static

    def inputs(prefix: str):
        args = [tensors[f"{prefix}arg{i}"] for i in range(sum(k.startswith(f"{prefix}arg") for k in tensors))]
        return args, {k.removeprefix(f"{prefix}kw_"): v for k, v in tensors.items() if k.startswith(f"{prefix}kw_")}
    args, kwargs = inputs("")
    fp_args, fp_kwargs = inputs("fp_") if fp_inputs else (None, None)
    return UnitData(args, tensors["target"], calib.t.clone(), kwargs, stores=list(stores.values()), fp_args=fp_args,
                    fp_kwargs=fp_kwargs)


def _same(a: dict, b: dict) -> bool:
    """Whether two captures' non-tensor inputs are equal (a comparison that fails counts as different)."""
    try:
        return a.keys() == b.keys() and all(bool(a[k] == b[k]) for k in a)
    except Exception:                                           # noqa: BLE001 (values that do not compare)
        return False


class Objective(Protocol):
    """What one unit's reconstruction trains, and how."""

    fp_activations: bool    # the unit trains (and is scored) with its activation quantizers off

    def prepare(self, unit: nn.Module) -> list[dict]:
        """Install anything temporary; return Adam parameter groups (empty: nothing to train)."""

    def loss(self, out: torch.Tensor, target: torch.Tensor, it: int, iters: int) -> torch.Tensor:
        """The training loss at iteration `it` of `iters`."""

    def finish(self, unit: nn.Module) -> None:
        """Make the trained state final (e.g. hard rounding) and remove anything temporary."""


def unit_param_groups(unit: nn.Module, cfg: DistillConfig, weights: bool = True,
                      activations: bool = True) -> list[dict]:
    """Weights/biases at lr_weight, weight-quantizer parameters (Δ_w, z_w) at lr_quant, learnable scaling factors
    (if any) at lr_scale (these three if `weights`); activation-quantizer parameters (Δ_x, z_x) at lr_act
    (lr_quant if unset) if `activations`."""
    params, w_quant, a_quant, scales = [], [], [], []
    for m in unit.modules():
        if isinstance(m, QuantLayer):
            params += [p for p in (m.weight, m.bias) if p is not None]
            scales += [m.in_gain] if m.in_gain is not None else []
            w_quant += [p for p in m.w_quant.parameters()]
        if isinstance(m, (QuantLayer, QuantMatMul)) and m.quant_act:
            a_quant += [p for q in m.a_quant for p in q.parameters()]
    groups = ([{"params": params, "lr": cfg.lr_weight}, {"params": w_quant, "lr": cfg.lr_quant}] if weights else [])
    groups += [{"params": a_quant, "lr": cfg.act_lr}] if activations else []
    groups += [{"params": scales, "lr": cfg.lr_scale}] if weights else []
    return [g for g in groups if g["params"] and g["lr"] > 0]


class DistillObjective:
    """BKD on the unit's MSE: weights, Δ_w, Δ_x and z_x together (the paper), or with `weights` or `activations`
    False, only the other part; `fp_activations`: trained with the activation quantizers off."""

    def __init__(self, cfg: DistillConfig, weights: bool = True, activations: bool = True,
                 fp_activations: bool = False):
        self.cfg, self.weights, self.activations, self.fp_activations = cfg, weights, activations, fp_activations

    def prepare(self, unit: nn.Module) -> list[dict]:
        return unit_param_groups(unit, self.cfg, self.weights, self.activations)

    def loss(self, out: torch.Tensor, target: torch.Tensor, it: int, iters: int) -> torch.Tensor:
        return F.mse_loss(out, target)

    def finish(self, unit: nn.Module) -> None:
        pass


@torch.no_grad()
def unit_loss(qmodel: QuantModel, module: nn.Module, data: UnitData, batch_size: int) -> float:
    """MSE of the quantized unit against its FP targets over all cached samples (weighted if data.weight)."""
    device = next(qmodel.parameters()).device
    total = 0.0
    for i in range(0, len(data.t), batch_size):
        idx = torch.arange(i, min(i + batch_size, len(data.t)))
        args, kwargs, target, t = data.batch(idx, device, _dtype(qmodel))
        with qmodel.slots.active(qmodel.slots.lookup(t)):
            total += float(F.mse_loss(*data.weighted(idx, module(*args, **kwargs), target), reduction="sum"))
    return total / data.target.numel()


def train_unit(qmodel: QuantModel, unit: str, data: UnitData, objective: Objective, cfg: DistillConfig, seed: int,
               desc: str = "") -> dict:
    """Adam on `objective` for cfg.iters mixed-timestep batches of the unit's cached data, the learning rates
    following cfg.lr_schedule.

    Returns the MSE over all cached samples before and after. If the unit ends worse than it started
    (too high a learning rate for it, say), its initial state is restored and `kept_initial` is set.
    """
    module = qmodel.model.get_submodule(unit)
    before = unit_loss(qmodel, module, data, cfg.cache_batch_size)
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    groups = objective.prepare(module)
    if groups and cfg.iters > 0:
        device = next(qmodel.parameters()).device
        opt = torch.optim.Adam(groups)
        sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.iters, eta_min=0.0)
                 if cfg.lr_schedule is LRSchedule.COSINE else None)
        gen = torch.Generator().manual_seed(seed)
        bar = tqdm(range(cfg.iters), desc=desc, dynamic_ncols=True, leave=False)
        for it in bar:
            idx = torch.randint(0, len(data.t), (cfg.batch_size,), generator=gen)
            fp_rows = torch.rand(cfg.batch_size, generator=gen) < cfg.fp_input if cfg.fp_input > 0 else None
            args, kwargs, target, t = data.batch(idx, device, _dtype(qmodel), fp_rows)
            with qmodel.slots.active(qmodel.slots.lookup(t)):
                loss = objective.loss(*data.weighted(idx, module(*args, **kwargs), target), it, cfg.iters)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if it % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3e}")
        opt.zero_grad(set_to_none=True)          # the unit's gradients are not kept once it is trained
    objective.finish(module)
    after = unit_loss(qmodel, module, data, cfg.cache_batch_size)
    if after > before:
        module.load_state_dict(initial)
    return {"loss_before": before, "loss_after": min(before, after), "kept_initial": after > before}


def _dtype(qmodel: QuantModel) -> torch.dtype:
    return next(qmodel.parameters()).dtype


def _unit_state(qmodel: QuantModel, unit: str) -> dict:
    prefix = f"model.{unit}."
    return {k: v.clone() for k, v in qmodel.state_dict().items() if k.startswith(prefix)}


def bkd_objectives(cfg: DistillConfig) -> list[Objective]:
    """The objectives BKD trains each unit with, in order (BKDTraining)."""
    if cfg.training is BKDTraining.STAGED:
        return [DistillObjective(cfg, activations=False, fp_activations=True), DistillObjective(cfg, weights=False)]
    return [DistillObjective(cfg)]


def train_stages(qmodel: QuantModel, unit: str, data: UnitData, objectives: Sequence[Objective],
                 cfg: DistillConfig, seed: int, desc: str = "") -> dict:
    """train_unit with each objective in turn (stage s seeded seed + 100 s), with the activation quantizers off
    for those that train with FP activations. -> the last stage's log, with every stage's under "stages" when
    there are several."""
    logs = []
    for s, objective in enumerate(objectives):
        state = quant_enabled(qmodel, weight=True, act=False) if objective.fp_activations else nullcontext()
        with state:
            logs.append(train_unit(qmodel, unit, data, objective, cfg, seed + 100 * s,
                                   desc if len(objectives) == 1 else f"{desc} ({s + 1}/{len(objectives)})"))
    return logs[-1] | ({"stages": logs} if len(logs) > 1 else {})


def reconstruct(qmodel: QuantModel, fp_model: nn.Module, calib: CalibSet, objectives: Sequence[Objective],
                cfg: DistillConfig, run_dir: Path, sigmas: torch.Tensor | None = None) -> list[dict]:
    """Reconstruct every unit in forward order, training it with each objective in turn; unit k is saved to
    run_dir/unit_{k:02d}.pt when done and reloaded (not retrained) by a rerun, so an interrupted run resumes
    from its last finished unit.
    With cfg.t_weight_sigma, samples are weighted by timestep_weights (needs `sigmas`, σ_t per timestep)."""
    weight = None
    if cfg.t_weight_sigma is not None:
        if sigmas is None:
            raise ValueError("t_weight_sigma needs the noise levels σ_t of the schedule (sigmas)")
        weight = timestep_weights(calib.t, sigmas, cfg.t_weight_sigma)
    run_dir.mkdir(parents=True, exist_ok=True)
    fp_model.eval()
    qmodel.eval()                                            # dropout off; parameters still train
    units = qmodel.adapter.units(qmodel.model)
    policy = CachePolicy(cfg.cache_dtype, cfg.cache_ram_gb)
    device = next(qmodel.parameters()).device
    x, t, cond = next(calib.batches(1, device))
    shapes = per_sample_shapes(qmodel.model, lambda: qmodel(x, t, **cond), units)
    logger.info(describe(plan(shapes, len(calib.t), policy, cfg.fp_input > 0), len(calib.t), policy, run_dir / "cache"))
    log = []
    for k, unit in enumerate(tqdm(units, desc=f"reconstruct units ({run_dir.name})", dynamic_ncols=True)):
        path = run_dir / f"unit_{k:02d}.pt"
        if path.exists():
            saved = torch_load(path, "finished unit")
            problem = state_dict_mismatch(_unit_state(qmodel, unit), saved["state"])
            if problem:
                raise CheckpointError(f"{path} was made for another model or setting ({problem}); "
                                 f"delete {run_dir} or use another --logdir")
            qmodel.load_state_dict(saved["state"], strict=False)
            log.append(saved["log"])
            continue
        data = cache_unit_io(qmodel, fp_model, unit, calib, cfg.cache_batch_size, policy, run_dir / "cache",
                             fp_inputs=cfg.fp_input > 0)
        data.weight = weight
        try:
            entry = {"unit": unit} | train_stages(qmodel, unit, data, objectives, cfg, seed=cfg.seed * 1000 + k,
                                                  desc=f"[{k}] {unit}")
        finally:
            data.release()
            release_free_memory()
        state = {k: v.cpu() for k, v in _unit_state(qmodel, unit).items()}
        require_finite(state, f"unit {unit} after reconstruction", "lower the learning rates (--lr_weight, "
                       "--lr_quant, --cali_lr), or check the calibration set")
        atomic_torch_save({"state": state, "log": entry}, path)
        log.append(entry)
    return log


def distill(qmodel: QuantModel, fp_model: nn.Module, calib: CalibSet, cfg: DistillConfig, run_dir: Path,
            sigmas: torch.Tensor | None = None) -> list[dict]:
    """DilateQuant's Block-wise Knowledge Distillation (eq. 17; cfg.training)."""
    return reconstruct(qmodel, fp_model, calib, bkd_objectives(cfg), cfg, run_dir, sigmas)
