"""Wrap a diffusion UNet into a fake-quantized one from outside (no flags inside the model code)."""
from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from quant.adapters import adapter_for, check_adapter
from quant.layers import NORMS, QUANTIZABLE, QuantLayer, QuantMatMul
from quant.quantizer import ScratchPool
from quant.settings import QuantConfig
from quant.slots import SlotIndex


# Normalization layers keep FP affine parameters (their weight may be [C, H, W]); they are not weight layers.


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


class EpsCorrections(nn.Module):
    """Per-timestep corrections of a quantized network's output (quant/bias_correction.py), off unless set: a gain
    g_t (--eps_rescale) and a mean b_t (--eps_correction), each a table over the timesteps it was estimated at.
    Shared by the simulated model (QuantModel) and its integer form (quant.deploy.IntModel)."""

    def _init_corrections(self) -> None:
        self.register_buffer("eps_bias_t", None)               # optional eps-mean correction [S] and [S, C]
        self.register_buffer("eps_bias", None)
        self._bias_index: SlotIndex | None = None
        self.register_buffer("eps_gain_t", None)               # optional eps rescale [S] and [S]
        self.register_buffer("eps_gain", None)
        self._gain_index: SlotIndex | None = None

    def check_corrections(self, timesteps: Sequence[int]) -> None:
        for index in (self._bias_index, self._gain_index):
            if index is not None:
                index.check_timesteps(timesteps)

    def copy_corrections(self, other: "EpsCorrections") -> None:
        """Install the corrections `other` holds (if any)."""
        if other.eps_bias is not None:
            self.set_eps_bias(other.eps_bias_t, other.eps_bias)
        if other.eps_gain is not None:
            self.set_eps_gain(other.eps_gain_t, other.eps_gain)

    def corrected(self, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps [B, C, ...] with the installed output corrections: g_t eps, then - b_t (none: eps itself)."""
        if self.eps_gain is not None:
            gain = self.eps_gain[self._gain_index.lookup(t)]   # [B]
            eps = eps * gain.view(-1, *([1] * (eps.dim() - 1)))
        if self.eps_bias is not None:
            bias = self.eps_bias[self._bias_index.lookup(t)]   # [B, C]
            eps = eps - bias.view(*bias.shape, *([1] * (eps.dim() - 2)))
        return eps

    def _per_timestep(self, timesteps: torch.Tensor, values: torch.Tensor, ok: bool,
                      what: str) -> tuple[torch.Tensor, torch.Tensor, SlotIndex]:
        """(sorted timesteps, their values, their SlotIndex) on the model's device, for an output correction."""
        timesteps = timesteps.cpu()
        if len(torch.unique(timesteps)) != len(timesteps) or not ok:
            raise ValueError(f"eps {what}")
        order = torch.argsort(timesteps)
        return (timesteps[order].long().to(self.like["device"]), values[order.to(values.device)].to(**self.like),
                SlotIndex(timesteps[order].tolist()))

    def set_eps_bias(self, timesteps: torch.Tensor, bias: torch.Tensor) -> None:
        """Install b_t: forward then returns eps - b_t for t in `timesteps` [S] (bias [S, C]); any other
        timestep is an UncalibratedTimestepError."""
        ok = bias.dim() == 2 and len(bias) == len(timesteps)
        self.eps_bias_t, self.eps_bias, self._bias_index = self._per_timestep(
            timesteps, bias, ok, "bias needs distinct timesteps [S] and a bias [S, C]")

    def set_eps_gain(self, timesteps: torch.Tensor, gain: torch.Tensor) -> None:
        """Install g_t: forward then returns g_t * eps for t in `timesteps` [S] (gain [S]); any other timestep
        is an UncalibratedTimestepError."""
        self.eps_gain_t, self.eps_gain, self._gain_index = self._per_timestep(
            timesteps, gain, gain.shape == timesteps.shape, "gain needs distinct timesteps [S] and a gain [S]")


class QuantModel(EpsCorrections):
    """eps = qmodel(x, t, **cond): the same call as the FP network.

    Every Conv2d/Linear becomes a QuantLayer and every attention matmul a QuantMatMul. With
    `config.temporal`, activation quantizers hold one (Δ, z) per timestep of `schedule` (TPQ) and each
    forward looks the slots up from `t` (once per call); otherwise a single shared (Δ, z) serves all
    timesteps. The wrapped copy, and everything the wrapping creates, lives on the model's device and in
    its floating dtype.
    """

    def __init__(self, model: nn.Module, config: QuantConfig, schedule: Sequence[int] | None = None):
        super().__init__()
        if config.temporal and not schedule:
            raise ValueError("a temporal (TPQ) model needs the sampling schedule it is calibrated for")
        self.config = config
        self.adapter = adapter_for(model)
        check_adapter(model, self.adapter)
        self.model = copy.deepcopy(model)
        self.slots = SlotIndex(list(schedule) if config.temporal else None)
        self.register_buffer("schedule", torch.as_tensor(list(schedule or []), dtype=torch.long,
                                                         device=self.like["device"]))
        self._init_corrections()
        self._wrap()

    def _wrap(self) -> None:
        cfg, adapter = self.config, self.adapter
        first, last = adapter.edge_layers(self.model)
        splits = adapter.split_channels(self.model) if cfg.split else {}
        matmuls = adapter.softmax_operands(self.model)
        layout = adapter.head_layout(self.model)
        # Weight layers this wrapper cannot quantize (e.g. ConvTranspose2d, Embedding) stay FP: listed here, in
        # the log and in results.json, never silently counted as quantized.
        self.unquantized = [f"{name} ({type(m).__name__})" for name, m in self.model.named_modules()
                            if isinstance(getattr(m, "weight", None), nn.Parameter)
                            and not isinstance(m, QUANTIZABLE + NORMS) and m.weight.dim() >= 2]
        if self.unquantized:
            warnings.warn(f"{len(self.unquantized)} weight layer(s) stay in full precision (no quantized form): "
                          f"{', '.join(self.unquantized[:6])}{' ...' if len(self.unquantized) > 6 else ''}")
        for name, module in list(self.model.named_modules()):
            if isinstance(module, QUANTIZABLE):
                edge = name in (first, last)
                a_spec = cfg.act_spec(edge) if cfg.quant_act else None
                new = QuantLayer(module, cfg.weight_spec(edge), a_spec, self.slots, splits.get(name, 0),
                                 copy=False)                          # self.model is this model's own copy
                _set_submodule(self.model, name, new)
            elif name in matmuls and cfg.quant_act:
                sm = matmuls[name]
                specs = [cfg.softmax_spec() if sm == i else cfg.act_spec() for i in (0, 1)]
                _set_submodule(self.model, name, QuantMatMul(*specs, self.slots, op=module, head_layout=layout,
                                                             **self.like))

    @property
    def like(self) -> dict:
        """device= and dtype= of the wrapped model's parameters: what new tensors of the wrapper follow."""
        ref = next(self.model.parameters())
        return dict(device=ref.device, dtype=ref.dtype)

    def check_timesteps(self, timesteps: Sequence[int]) -> None:
        """One-line error unless every timestep a sampler will visit was calibrated (call before sampling)."""
        self.slots.check_timesteps(timesteps)
        self.check_corrections(timesteps)

    @staticmethod
    def batch_timesteps(x: torch.Tensor, t: torch.Tensor | int | float) -> torch.Tensor:
        """t as a [B] tensor on x's device: a Python number or a 0-d tensor (what diffusers samplers pass) is one
        timestep for the whole batch."""
        t = torch.as_tensor(t, device=x.device)
        return t.expand(x.shape[0]) if t.dim() == 0 else t

    def raw_eps(self, x: torch.Tensor, t: torch.Tensor | int | float, **cond) -> torch.Tensor:
        """The quantized network's output, without the eps corrections (mean, rescale)."""
        t = self.batch_timesteps(x, t)
        with self.slots.active(self.slots.lookup(t)):
            return self.model(x, t, **cond)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int | float, **cond) -> torch.Tensor:
        t = self.batch_timesteps(x, t)
        return self.corrected(self.raw_eps(x, t, **cond), t)

    def quant_layers(self) -> Iterator[tuple[str, QuantLayer]]:
        return ((n, m) for n, m in self.model.named_modules() if isinstance(m, QuantLayer))

    def act_quant_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """Modules (QuantLayer or QuantMatMul) that own activation quantizers."""
        return ((n, m) for n, m in self.model.named_modules()
                if isinstance(m, (QuantLayer, QuantMatMul)) and len(m.a_quant))


@contextmanager
def frozen(qmodel: QuantModel) -> Iterator[QuantModel]:
    """Inference with fixed weights: each layer's (fake-)quantized weight is computed once on entry and reused
    by every forward inside, instead of being re-quantized per call; recomputed on the next entry. On the CPU
    the activation quantizers also write into reused buffers (quant.quantizer.ScratchPool) instead of fresh
    tensors; the values are the same bit for bit."""
    layers = [layer for _, layer in qmodel.quant_layers()]
    quantizers = [(k, q) for _, m in qmodel.act_quant_modules() for k, q in enumerate(m.a_quant)]
    saved = [q.scratch for _, q in quantizers]
    on_cpu = all(p.device.type == "cpu" for p in qmodel.parameters())
    try:
        with torch.no_grad():
            for layer in layers:
                layer.frozen_weight = layer.op_weight().detach()   # a plain tensor, also when it is W itself
        if on_cpu:
            pool = ScratchPool()
            for k, q in quantizers:
                q.scratch = (pool, k)
        yield qmodel
    finally:
        for layer in layers:
            layer.frozen_weight = None
        for (_, q), before in zip(quantizers, saved):
            q.scratch = before


@contextmanager
def quant_enabled(qmodel: QuantModel, weight: bool = True, act: bool = True) -> Iterator[QuantModel]:
    """Switch weight / activation quantization for the duration of a block; previous state restored."""
    saved = []
    for m in qmodel.model.modules():
        if isinstance(m, (QuantLayer, QuantMatMul)):
            saved.append((m, getattr(m, "quant_weight", None), m.quant_act))
            if isinstance(m, QuantLayer):
                m.quant_weight = weight
            m.quant_act = act and len(m.a_quant) > 0
    try:
        yield qmodel
    finally:
        for m, w, a in saved:
            if w is not None:
                m.quant_weight = w
            m.quant_act = a
