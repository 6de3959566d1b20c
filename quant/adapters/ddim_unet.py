"""Adapter for the DDPM/DDIM UNet in `ddim/model.py` (read through its module names only)."""
from __future__ import annotations

import torch.nn as nn

from quant.adapters import register


def _levels(model: nn.Module, path: str):
    return [(f"{path}.{i}", level) for i, level in enumerate(getattr(model, path))]


def _level_units(prefix: str, level: nn.Module, resampler: str) -> list[str]:
    """block.j (each followed by attn.j when the level has attention), then the resampler if any."""
    names = []
    for j in range(len(level.block)):
        names.append(f"{prefix}.block.{j}")
        if len(level.attn):
            names.append(f"{prefix}.attn.{j}")
    return names + ([f"{prefix}.{resampler}"] if hasattr(level, resampler) else [])


@register("ddim.model.UNet")
class DDIMUNetAdapter:
    def units(self, model: nn.Module) -> list[str]:
        names = ["temb.dense.0", "temb.dense.1", "conv_in"]
        for prefix, level in _levels(model, "down"):
            names += _level_units(prefix, level, "downsample")
        names += ["mid.block_1", "mid.attn_1", "mid.block_2"]
        for prefix, level in reversed(_levels(model, "up")):
            names += _level_units(prefix, level, "upsample")
        return names + ["conv_out"]

    def edge_layers(self, model: nn.Module) -> tuple[str, str]:
        return "conv_in", "conv_out"

    def split_channels(self, model: nn.Module) -> dict[str, int]:
        """Up-path ResBlocks read cat([h, skip]): conv1 (after GN+SiLU) and nin_shortcut split there."""
        skips = [model.conv_in.out_channels]                       # the hs stack of UNet.forward
        for _, level in _levels(model, "down"):
            skips += [b.out_channels for b in level.block]
            if hasattr(level, "downsample"):
                skips.append(level.block[-1].out_channels)
        out = {}
        for prefix, level in reversed(_levels(model, "up")):
            for j, block in enumerate(level.block):
                first = block.in_channels - skips.pop()
                out[f"{prefix}.block.{j}.conv1"] = first
                out[f"{prefix}.block.{j}.nin_shortcut"] = first
        return out

    def softmax_operands(self, model: nn.Module) -> dict[str, int | None]:
        out = {}
        for name, module in model.named_modules():
            if type(module).__name__ == "AttnBlock":
                out[f"{name}.qk"] = None   # q, k
                out[f"{name}.av"] = 1      # v, softmax(qk)ᵀ
        return out

    def shared_inputs(self, model: nn.Module) -> list[tuple[str, ...]]:
        return list(self.norm_producers(model))

    def norm_producers(self, model: nn.Module) -> dict[tuple[str, ...], str]:
        """q, k, v read GroupNorm(x) directly; every other layer reads through SiLU, a concat or a resampler."""
        return {tuple(f"{name}.{p}" for p in "qkv"): f"{name}.norm" for name, module in model.named_modules()
                if type(module).__name__ == "AttnBlock"}

    def head_layout(self, model: nn.Module) -> str:
        return "(b h)"          # one head: q, k, v are [B, HW, C]
