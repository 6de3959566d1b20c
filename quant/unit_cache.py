"""Where a reconstruction unit's cached inputs and targets live, and how large they get.

Block-wise distillation keeps, for the unit being trained, its inputs (from the quantized chain) and its FP
outputs for every calibration sample (SPEC §4). At real scale that is large: for Stable Diffusion's 64x64 blocks
one tensor of 5,120 samples is about 27 GB in float32. `CachePolicy` bounds it: the cache can be kept in
float16 (half the bytes; inputs and targets are cast back to the model's dtype per batch), and a unit whose
cache exceeds `ram_gb` is written to a memory-mapped file under the run directory instead of RAM (read back
batch by batch; the file is removed when the unit is done). `plan` measures every unit's cache from one
sample's shapes before any work, so a long run prints what it will need.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from common.errors import AdapterError

GB = 1024 ** 3


@dataclass(frozen=True)
class CachePolicy:
    dtype: torch.dtype | None = None     # None: the values' own dtype; torch.float16 halves the cache
    ram_gb: float | None = None          # a unit cache above this goes to a memory-mapped file (None: always RAM)

    def __post_init__(self):
        if self.dtype not in (None, torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"cache dtype {self.dtype} is not a floating dtype")
        if self.ram_gb is not None and self.ram_gb <= 0:
            raise ValueError(f"cache RAM budget must be > 0 GB, got {self.ram_gb}")

    def element_bytes(self, dtype: torch.dtype) -> int:
        return torch.empty((), dtype=self.dtype or dtype).element_size()


@dataclass(frozen=True)
class UnitPlan:
    unit: str
    bytes: int          # inputs + target of every calibration sample, at the policy's dtype
    on_disk: bool


def unit_output(unit: str, out) -> torch.Tensor:
    """A reconstruction unit's output, which must be one tensor (its FP target); else one AdapterError line."""
    if not torch.is_tensor(out):
        raise AdapterError(f"unit {unit} returns a {type(out).__name__}, not a tensor: block reconstruction trains "
                           f"a unit against one output tensor", "let the adapter's units() name modules that "
                           "return one tensor (the blocks inside this one)")
    return out


def per_sample_shapes(model: nn.Module, call, units: list[str]) -> dict[str, list[tuple[tuple[int, ...], torch.dtype]]]:
    """Run `call()` (one calibration sample through the model) and record, per unit, the per-sample shape and
    dtype of each tensor input (positional and keyword) and of its output."""
    shapes, hooks = {}, []

    def pre(name):
        def fn(_, args, kwargs):
            shapes[name] = [(tuple(v.shape[1:]), v.dtype) for v in list(args) + list(kwargs.values())
                            if torch.is_tensor(v)]
        return fn

    def post(name):
        def fn(_, args, out):
            out = unit_output(name, out)
            shapes[name].append((tuple(out.shape[1:]), out.dtype))
        return fn

    for name in units:
        module = model.get_submodule(name)
        hooks += [module.register_forward_pre_hook(pre(name), with_kwargs=True), module.register_forward_hook(post(name))]
    try:
        with torch.no_grad():
            call()
    finally:
        for h in hooks:
            h.remove()
    return shapes


def plan(shapes: dict, n_samples: int, policy: CachePolicy, fp_inputs: bool = False) -> list[UnitPlan]:
    """Each unit's cache size for n_samples (inputs twice with fp_inputs: the quantized and the FP chain's),
    and whether the policy puts it on disk."""
    out = []
    for unit, tensors in shapes.items():
        copies = [2 if fp_inputs else 1] * (len(tensors) - 1) + [1]          # the output (FP target) is last
        size = n_samples * sum(c * math.prod(s) * policy.element_bytes(d) for c, (s, d) in zip(copies, tensors))
        out.append(UnitPlan(unit, size, policy.ram_gb is not None and size > policy.ram_gb * GB))
    return out


def describe(plans: list[UnitPlan], n_samples: int, policy: CachePolicy, where: Path) -> str:
    """One line for the log: the largest unit cache and where the caches go."""
    big = max(plans, key=lambda p: p.bytes)
    spilled = [p.unit for p in plans if p.on_disk]
    dtype = str(policy.dtype).removeprefix("torch.") if policy.dtype else "the model's dtype"
    return (f"[distill] plan: {len(plans)} units, {n_samples} samples, caches in {dtype}; largest {big.unit} "
            f"{big.bytes / GB:.2f} GB (inputs + FP target); "
            + (f"{len(spilled)} unit(s) over the {policy.ram_gb:g} GB RAM budget go to memory-mapped files in {where}"
               if spilled else "all in RAM"))


class Store:
    """A [M, *shape] tensor filled chunk by chunk: in RAM, or backed by a memory-mapped file."""

    def __init__(self, n: int, shape: tuple[int, ...], dtype: torch.dtype, path: Path | None):
        self.path = path
        if path is None:
            self.tensor = torch.empty((n, *shape), dtype=dtype)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            numel = n * math.prod(shape)
            self.tensor = torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(n, *shape)
        self.filled = 0

    def add(self, chunk: torch.Tensor) -> None:
        self.tensor[self.filled:self.filled + len(chunk)] = chunk
        self.filled += len(chunk)

    def release(self) -> None:
        del self.tensor
        if self.path is not None:
            self.path.unlink(missing_ok=True)
