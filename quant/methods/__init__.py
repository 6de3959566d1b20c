"""Quantization methods: one module per method, a frozen config dataclass and the handler registered for it.

The config's type is the dispatch key, as in torchao's `quantize_(model, config)`:

    qmodel = quantize(fp_model, QuantConfig(weight_bit=4, act_bit=4), DilateQuantConfig(), MethodContext(...))

A method config declares what a pipeline asks of a method (the `Method` protocol): its `name` (the
`--quant_mode` value), how its calibration set is drawn (`calibration`) and whether it needs one
(`needs_data`), whether its activation quantizers keep one step per timestep (`temporal`), its command-line
options (`flags`, plain data that the entry points turn into a --help group of their own; `from_flags` builds the
config from their values), and its structured `identity()` (name and settings, written to results.json and to
checkpoints as fields) with the short `label()` tables print. A new method is one module that defines such a
config and calls `register_method(ConfigType, handler)`; nothing else changes (tests/data/minmax_method.py does
it from outside the package).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Protocol, Sequence

import torch
import torch.nn as nn

from quant.calib_data import CalibSet
from quant.settings import QuantConfig


class CalibrationDraw(Enum):
    """How a method's calibration set is drawn from FP trajectories: RANDOM_STEPS takes --cali_n samples at
    random sampling steps (--cali_per_traj per trajectory); EVENLY_SPACED takes --cali_n samples at each of
    --cali_st evenly spaced steps (Q-Diffusion's time-step-aware calibration)."""
    RANDOM_STEPS = "random_steps"
    EVENLY_SPACED = "evenly_spaced"


@dataclass(frozen=True)
class Flag:
    """One command-line option of a method, as plain data (no argparse here): `--name` sets config field(s) in
    `from_flags`. kind: "value" (type, choices), "switch" (store_true) or "toggle" (--name / --no-name).
    `valid(value)` and `valid_words` give the one-line range error; `exclusive`: giving it with another method
    is an error (instead of being ignored)."""
    name: str
    default: Any
    help: str
    type: type | None = None
    choices: tuple | None = None
    kind: str = "value"
    valid: Callable[[Any], bool] | None = None
    valid_words: str = ""
    exclusive: bool = False

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")

    def check(self, value: Any) -> None:
        if self.valid is not None and not self.valid(value):
            from common.errors import UsageError
            raise UsageError(f"{self.name} {value} is out of range: use {self.valid_words}")


@dataclass(frozen=True)
class MethodContext:
    """What a handler gets besides the network and the configs: the sampler's timesteps (TPQ slots), the
    calibration set (None when the method needs none), the run directory for per-unit checkpoints, the
    calibration forward batch, the seed, and σ_t per timestep (DilateQuant's --t_weight_sigma)."""
    schedule: Sequence[int]
    calib: CalibSet | None
    run_dir: Path
    batch_size: int = 64
    seed: int = 0
    sigmas: torch.Tensor | None = None


class Method(Protocol):
    name: ClassVar[str]
    calibration: ClassVar[CalibrationDraw]
    flags: ClassVar[tuple[Flag, ...]]

    @property
    def temporal(self) -> bool: ...

    def needs_data(self, quant: QuantConfig) -> bool: ...

    def identity(self) -> dict: ...

    def label(self) -> str: ...

    @classmethod
    def from_flags(cls, values: Mapping[str, Any], seed: int) -> "Method": ...


Handler = Callable[[nn.Module, QuantConfig, Any, MethodContext], nn.Module]
_HANDLERS: dict[type, Handler] = {}
_BY_NAME: dict[str, type] = {}


def register_method(config_type: type, handler: Handler) -> None:
    """Register `handler(fp_model, quant, method_config, ctx) -> QuantModel` for configs of `config_type` (its
    `name` becomes a --quant_mode choice). Registering another type under a taken name is an error."""
    name = config_type.name
    if _BY_NAME.get(name, config_type) is not config_type:
        raise ValueError(f"a method named {name!r} is registered already ({_BY_NAME[name].__qualname__})")
    _HANDLERS[config_type], _BY_NAME[name] = handler, config_type


BUILTIN = ("baseline", "qdiff", "dilatequant")


def methods() -> dict[str, type]:
    """Registered method config types by name: the built-in ones, then the others in registration order."""
    _builtin()
    return {n: _BY_NAME[n] for n in BUILTIN} | {n: t for n, t in _BY_NAME.items() if n not in BUILTIN}


def method_type(name: str) -> type:
    known = methods()
    if name not in known:
        raise ValueError(f"unknown quantization method {name!r}; registered: {sorted(known)}")
    return known[name]


def quantize(fp_model: nn.Module, quant: QuantConfig, method, ctx: MethodContext) -> nn.Module:
    """Run the handler registered for type(method)."""
    _builtin()
    handler = _HANDLERS.get(type(method))
    if handler is None:
        raise TypeError(f"no quantization method is registered for {type(method).__qualname__}: call "
                        "quant.methods.register_method(ConfigType, handler)")
    return handler(fp_model, quant, method, ctx)


def identity_fields(config) -> dict:
    """A method config's fields as JSON values (enums by value, dtypes by name, nested configs as dicts)."""
    def value(v):
        if dataclasses.is_dataclass(v):
            return {f.name: value(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Enum):
            return v.value
        if isinstance(v, torch.dtype):
            return str(v).removeprefix("torch.")
        if isinstance(v, tuple):
            return [value(x) for x in v]
        return v
    return {"name": config.name, **value(config)}


def _builtin() -> None:
    """The built-in methods register themselves on import."""
    from quant.methods import baseline, dilatequant, qdiff  # noqa: F401
