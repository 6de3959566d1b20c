"""Explicit calibration: weight ranges from the weights, activation ranges from calibration data.

Activation statistics are gathered per TPQ slot (the timestep each sample was drawn at); a slot that no
calibration sample reached falls back to the range of all data. Nothing is initialised inside forward.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from tqdm import tqdm

from quant.calib_data import CalibSet
from quant.layers import QuantLayer
from quant.model import QuantModel, quant_enabled
from quant.quantizer import ActQuantizer
from quant.range_search import init_range, init_weight_quantizers
from quant.settings import RangeInit


class SlotObserver:
    """Per-slot exact min/max, running-average min/max (momentum `momentum` over batches) and a bounded
    random subsample of the values an activation quantizer sees."""

    def __init__(self, n_slots: int, max_values: int, generator: torch.Generator, momentum: float = 0.95):
        self.n_slots, self.max_values, self.gen, self.momentum = n_slots, max_values, generator, momentum
        self.lo = torch.full((n_slots,), float("inf"))
        self.hi = torch.full((n_slots,), float("-inf"))
        self.run_lo = torch.full((n_slots,), float("nan"))
        self.run_hi = torch.full((n_slots,), float("nan"))
        self.values: list[list[torch.Tensor]] = [[] for _ in range(n_slots)]

    def _running(self, old: torch.Tensor, s: int, new: float) -> None:
        old[s] = new if torch.isnan(old[s]) else self.momentum * old[s] + (1 - self.momentum) * new

    def _keep(self, v: torch.Tensor, k: int) -> torch.Tensor:
        return v if v.numel() <= k else v[torch.randint(0, v.numel(), (k,), generator=self.gen)]

    def update(self, x: torch.Tensor, row_slots: torch.Tensor) -> None:
        """x [N, ...]; row_slots [N]: the slot of each row."""
        x = x.detach().float().cpu()
        for s in torch.unique(row_slots).tolist():
            v = x[row_slots.cpu() == s].flatten()
            self.lo[s] = min(self.lo[s], v.min())
            self.hi[s] = max(self.hi[s], v.max())
            self._running(self.run_lo, s, float(v.min()))
            self._running(self.run_hi, s, float(v.max()))
            self.values[s].append(self._keep(v, self.max_values))

    def ranges(self, quantizer: ActQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
        """Range per slot by the quantizer's init rule; unseen slots get the all-data range."""
        seen = [s for s in range(self.n_slots) if self.values[s]]
        if not seen:
            raise RuntimeError("no calibration data reached this quantizer")
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


@torch.no_grad()
def calibrate_activations(qmodel: QuantModel, calib: CalibSet, batch_size: int = 64, max_values: int = 8192,
                          seed: int = 0) -> None:
    """Fill every activation quantizer's (Δ, z) per slot from FP activations on `calib` (weights quantized)."""
    gen = torch.Generator().manual_seed(seed)
    device = next(qmodel.parameters()).device
    observers, hooks = {}, []
    for name, module in qmodel.act_quant_modules():
        observers[name] = [SlotObserver(q.delta.numel(), max_values, gen) for q in module.a_quant]

        def hook(mod, args, name=name):
            slots = qmodel.steps.current()                      # [B] slot of each sample
            for obs, x in zip(observers[name], _observed_inputs(mod, args)):
                obs.update(x, slots.repeat_interleave(x.shape[0] // slots.numel()))
        hooks.append(module.register_forward_pre_hook(hook))
    try:
        with quant_enabled(qmodel, weight=True, act=False):
            for x, t in tqdm(calib.batches(batch_size), total=-(-len(calib.t) // batch_size),
                             desc="calibrate activations", dynamic_ncols=True):
                qmodel(x.to(device), t.to(device))
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
