"""Per-architecture knowledge the quantization core needs, looked up by the model's class path.

The core never imports model classes: an adapter names the distillation units in forward order,
the first/last layers, layers reading a concatenated skip input (for --split), the attention
matmuls (and which operand is a softmax output), and groups of layers that read one tensor.
"""
from __future__ import annotations

from typing import Protocol

import torch.nn as nn


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


from quant.adapters import ddim_unet, ldm_unet  # noqa: E402,F401  (register this repo's two UNets)
