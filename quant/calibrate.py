"""Explicit calibration: weight ranges from the weights, activation ranges from calibration data.

Activation statistics are gathered per TPQ slot (the timestep each sample was drawn at); a slot that no
calibration sample reached (named in a warning before any work, `slots_without_samples`) or whose values were
all NaN/inf falls back to the range of all data. Nothing is initialised inside forward.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from tqdm import tqdm

from common.errors import NonFiniteError

from quant.calib_data import CalibSet
from quant.layers import QuantLayer
from quant.model import QuantModel, quant_enabled
from quant.quantizer import ActQuantizer
from quant.range_search import init_range, init_weight_quantizers
from quant.settings import RangeInit


class SlotObserver:
    """Per-slot exact min/max, running-average min/max (momentum `momentum` over batches) and a bounded
    random subsample of the values an activation quantizer sees.

    `samples_per_slot` [n_slots] says how many calibration samples each slot will see (known from the
    calibration set); each sample keeps ceil(max_values / that) of its values, drawn at random. A slot's
    subsample thus holds about max_values values however the samples fall on slots, every sample of a slot
    is represented equally, and memory stays O(n_slots * max_values) for TPQ's many slots.
    """

    def __init__(self, samples_per_slot: torch.Tensor, max_values: int, generator: torch.Generator,
                 momentum: float = 0.95):
        self.n_slots, self.max_values, self.gen, self.momentum = len(samples_per_slot), max_values, generator, momentum
        self.per_sample = torch.ceil(max_values / samples_per_slot.clamp_min(1).double()).long()
        self.lo = torch.full((self.n_slots,), float("inf"))
        self.hi = torch.full((self.n_slots,), float("-inf"))
        self.run_lo = torch.full((self.n_slots,), float("nan"))
        self.run_hi = torch.full((self.n_slots,), float("nan"))
        self.values: list[list[torch.Tensor]] = [[] for _ in range(self.n_slots)]

    def _running(self, old: torch.Tensor, s: int, new: float) -> None:
        old[s] = new if torch.isnan(old[s]) else self.momentum * old[s] + (1 - self.momentum) * new

    def _keep(self, v: torch.Tensor, k: int) -> torch.Tensor:
        return v if v.numel() <= k else v[torch.randint(0, v.numel(), (k,), generator=self.gen)]

    def update(self, x: torch.Tensor, sample_slots: torch.Tensor) -> None:
        """x [B*h, ...]: h consecutive rows per sample (h = heads for attention operands, else 1);
        sample_slots [B]: the slot of each sample."""
        sample_slots = sample_slots.cpu()
        x = x.detach().float().cpu().reshape(len(sample_slots), -1)            # [B, h*...]
        finite = torch.isfinite(x)
        for s in torch.unique(sample_slots).tolist():
            rows, ok = x[sample_slots == s], finite[sample_slots == s]         # [r, n]
            if not bool(ok.any()):
                continue                                                       # nothing finite to learn from
            lo, hi = float(rows[ok].min()), float(rows[ok].max())              # NaN/inf never set a range
            self.lo[s] = min(float(self.lo[s]), lo)
            self.hi[s] = max(float(self.hi[s]), hi)
            self._running(self.run_lo, s, lo)
            self._running(self.run_hi, s, hi)
            k = int(self.per_sample[s])
            if k >= rows.shape[1]:                                             # small tensors: every value
                kept = rows.flatten()
            else:
                idx = torch.randint(0, rows.shape[1], (len(rows), k), generator=self.gen)
                kept = rows.gather(1, idx).flatten()
            self.values[s].append(kept[torch.isfinite(kept)])

    def ranges(self, quantizer: ActQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
        """Range per slot by the quantizer's init rule; unseen slots get the all-data range."""
        seen = [s for s in range(self.n_slots) if sum(len(v) for v in self.values[s])]
        if not seen:
            raise NonFiniteError("no finite calibration value reached an activation quantizer: the FP model produces "
                                 "NaN/inf on the calibration data", "check the checkpoint (--ckpt)")
        pooled = [self._keep(torch.cat(self.values[s]), self.max_values) for s in seen]
        everything = self._keep(torch.cat(pooled), self.max_values)
        rows = []
        for s in range(self.n_slots):
            v = pooled[seen.index(s)] if s in seen else everything
            rows.append(v[torch.randint(0, v.numel(), (self.max_values,), generator=self.gen)])
        lo, hi = (self.run_lo, self.run_hi) if quantizer.spec.init is RangeInit.RUNNING else (self.lo, self.hi)
        lo = torch.where(torch.isfinite(lo), lo, everything.min())
        hi = torch.where(torch.isfinite(hi), hi, everything.max())
        return init_range(torch.stack(rows), quantizer.spec, lo, hi)  # [T, m] -> ([T], [T])


def _observed_inputs(module: nn.Module, args: tuple) -> list[torch.Tensor]:
    """What each of the module's activation quantizers sees, in `a_quant` order."""
    if isinstance(module, QuantLayer):
        x = module.quantizer_input(args[0])
        return [x[:, :module.split], x[:, module.split:]] if module.split else [x]
    return [args[0], args[1]]


def slots_without_samples(qmodel: QuantModel, t: torch.Tensor) -> list[int]:
    """The timesteps of the model's TPQ schedule that no calibration timestep in `t` reaches; a warning line
    names them (their slots take the range of all the data). [] for a model without TPQ."""
    if qmodel.slots.schedule is None:
        return []
    counts = torch.bincount(qmodel.slots.lookup(t.reshape(-1)).cpu(), minlength=qmodel.slots.num_slots)
    missing = qmodel.slots.schedule[counts == 0].tolist()
    if missing:
        warnings.warn(f"the calibration set has no sample at {len(missing)} of the {qmodel.slots.num_slots} timesteps "
                      f"of the TPQ model ({missing[:6]}{' ...' if len(missing) > 6 else ''}): their slots take the "
                      f"range of all the data; draw more calibration samples to calibrate them", stacklevel=3)
    return missing


@torch.no_grad()
def calibrate_activations(qmodel: QuantModel, calib: CalibSet, batch_size: int = 64, max_values: int = 8192,
                          seed: int = 0) -> None:
    """Fill every activation quantizer's (Δ, z) per slot from FP activations on `calib` (weights quantized)."""
    slots_without_samples(qmodel, calib.t)
    gen = torch.Generator().manual_seed(seed)
    device = next(qmodel.parameters()).device
    observers, hooks = {}, []
    samples_per_slot = torch.bincount(qmodel.slots.lookup(calib.t).cpu(), minlength=qmodel.slots.num_slots)
    for name, module in qmodel.act_quant_modules():
        observers[name] = [SlotObserver(samples_per_slot[:q.delta.numel()], max_values, gen) for q in module.a_quant]

        def hook(mod, args, name=name):
            slots = qmodel.slots.current()                      # [B] slot of each sample
            for obs, x in zip(observers[name], _observed_inputs(mod, args)):
                obs.update(x, slots)
        hooks.append(module.register_forward_pre_hook(hook))
    try:
        with quant_enabled(qmodel, weight=True, act=False):
            for x, t, cond in tqdm(calib.batches(batch_size, device), total=-(-len(calib.t) // batch_size),
                             desc="calibrate activations", dynamic_ncols=True):
                qmodel(x, t, **cond)
    finally:
        for h in hooks:
            h.remove()
    for name, module in qmodel.act_quant_modules():
        for obs, quantizer in zip(observers[name], module.a_quant):
            quantizer.set_range(*obs.ranges(quantizer))


def calibrate(qmodel: QuantModel, calib: CalibSet | None, batch_size: int = 64, seed: int = 0) -> QuantModel:
    """Initialise all quantizers: weights always, activations when the config quantizes them."""
    init_weight_quantizers(qmodel)
    if qmodel.config.quant_act:
        if calib is None:
            raise ValueError("activation quantization needs calibration data")
        calibrate_activations(qmodel, calib, batch_size, seed=seed)
    return qmodel
