"""Per-architecture knowledge the quantization core needs, looked up by the model's class path.

The core never imports model classes: an adapter names the distillation units in forward order,
the first/last layers, layers reading a concatenated skip input (for --split), the attention
matmuls (which operand is a softmax output, and how their operands hold heads), and groups of layers that read
one tensor. `check_adapter` holds every name to the network: each must exist and be of its kind, or a one-line
AdapterError names it (QuantModel checks this before wrapping).
"""
from __future__ import annotations

from typing import Protocol

import torch.nn as nn

from common.errors import AdapterError
from quant.layers import NORMS, QUANTIZABLE
from quant.quantizer import HEAD_LAYOUTS


class ArchAdapter(Protocol):
    def units(self, model: nn.Module) -> list[str]:
        """Module names of the distillation units (blocks, or lone layers) in forward order."""

    def edge_layers(self, model: nn.Module) -> tuple[str, str]:
        """(real input layer, output layer): kept at `first_last_bit`."""

    def split_channels(self, model: nn.Module) -> dict[str, int]:
        """Layer name -> channels of the first half of its concatenated input."""

    def softmax_operands(self, model: nn.Module) -> dict[str, int | None]:
        """Attention matmul name -> index of its softmax-output operand (None if neither)."""

    def shared_inputs(self, model: nn.Module) -> list[tuple[str, ...]]:
        """Groups of layers that read the same tensor (they must share one dilation scale)."""

    def norm_producers(self, model: nn.Module) -> dict[tuple[str, ...], str]:
        """Layer group -> the affine norm whose output they read directly (X/s folds into it exactly)."""

    def head_layout(self, model: nn.Module) -> str:
        """How the attention matmuls' operands hold samples and heads in their leading dim: "(b h)" (sample b's
        heads together) or "(h b)"."""


_REGISTRY: dict[str, ArchAdapter] = {}


def register(class_path: str):
    """Class decorator: `@register("pkg.module.ClassName")` makes the adapter serve models of that class.
    Call it from your own code for a network of another codebase (docs/api.md, "Bring your own model";
    tests/test_byo_model.py has a complete example)."""
    def deco(cls):
        _REGISTRY[class_path] = cls()
        return cls
    return deco


def adapter_for(model: nn.Module) -> ArchAdapter:
    key = f"{type(model).__module__}.{type(model).__qualname__}"
    if key not in _REGISTRY:
        raise KeyError(f"no quantization adapter for {key}: write one (units, edge layers, split channels, attention "
                       f"matmuls, shared inputs, norm producers) and register it from your code with "
                       f"@quant.adapters.register({key!r}); see docs/api.md 'Bring your own model' "
                       f"(known: {sorted(_REGISTRY)})")
    return _REGISTRY[key]


def check_adapter(model: nn.Module, adapter: ArchAdapter) -> None:
    """Every name the adapter returns for `model` (the FP network) exists and is of the kind its role needs;
    otherwise one AdapterError line names the entry."""
    who, net = type(adapter).__name__, type(model).__name__
    modules = dict(model.named_modules())
    missing = [m for m in ("units", "edge_layers", "split_channels", "softmax_operands", "shared_inputs",
                           "norm_producers", "head_layout") if not callable(getattr(adapter, m, None))]
    if missing:
        raise AdapterError(f"adapter {who} lacks {', '.join(missing)} (quant.adapters.ArchAdapter lists what an "
                           f"adapter declares)")

    def module(role: str, name: str, kinds: tuple[type, ...] | None = None, what: str = "") -> nn.Module:
        if name not in modules or name == "":
            raise AdapterError(f"adapter {who} names {role} {name!r}, which {net} does not have")
        found = modules[name]
        if kinds is not None and not isinstance(found, kinds):
            raise AdapterError(f"adapter {who} names {role} {name!r}, a {type(found).__name__}, not {what}")
        return found

    layer = dict(kinds=QUANTIZABLE, what="a Conv1d/Conv2d/Linear layer")
    units = list(adapter.units(model))
    if not units:
        raise AdapterError(f"adapter {who} names no distillation units for {net}")
    for name in units:
        module("unit", name)
    for a in units:
        nested = [b for b in units if b != a and b.startswith(a + ".")]
        if nested or units.count(a) > 1:
            raise AdapterError(f"adapter {who} names unit {a!r} twice or with a unit inside it ({nested[:2]})")
    for name in adapter.edge_layers(model):
        module("edge layer", name, **layer)
    for name, first in adapter.split_channels(model).items():
        channels = module("split layer", name, **layer).weight.shape[1]
        if not 0 < first < channels:
            raise AdapterError(f"adapter {who} splits {name!r} after {first} of its {channels} input channels "
                               f"(needs 0 < split < {channels})")
    for name, operand in adapter.softmax_operands(model).items():
        found = module("attention matmul", name)
        if isinstance(found, QUANTIZABLE) or any(True for _ in found.parameters()):
            raise AdapterError(f"adapter {who} names attention matmul {name!r}, a {type(found).__name__} with "
                               f"weights, not a parameter-free matmul module")
        if operand not in (0, 1, None):
            raise AdapterError(f"adapter {who} gives softmax operand {operand!r} for {name!r} (0, 1 or None)")
    for group in adapter.shared_inputs(model):
        widths = {module("shared-input layer", name, **layer).weight.shape[1] for name in group}
        if len(widths) > 1:
            raise AdapterError(f"adapter {who} groups {group} as reading one tensor, but their inputs have "
                               f"{sorted(widths)} channels")
    for group, norm in adapter.norm_producers(model).items():
        for name in group:
            module("norm-fed layer", name, **layer)
        module("norm producer", norm, NORMS, "a GroupNorm/LayerNorm/BatchNorm")
    if adapter.head_layout(model) not in HEAD_LAYOUTS[1:]:
        raise AdapterError(f"adapter {who} declares head layout {adapter.head_layout(model)!r}, not one of "
                           f"{HEAD_LAYOUTS[1:]}")


from quant.adapters import ddim_unet, diffusers_unet, ldm_unet  # noqa: E402,F401  (register the adapters)
