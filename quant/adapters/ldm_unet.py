"""Adapter for the LDM / Stable Diffusion UNet (`ldm.modules.diffusionmodules.openaimodel.UNetModel`, CompVis
layout), read through its module names and class names only (no import of ldm).

Units are the CompVis blocks: `time_embed`, `input_blocks.i`, `middle_block`, `output_blocks.i`, `out`. The
first and last layers are the input conv `input_blocks.0.0` and the output conv `out.2`. Split shortcut
quantization (Q-Diffusion) acts on the first ResBlock of each output block, which reads cat([h, skip]): its
`skip_connection` and its `in_layers` conv. Attention matmuls: `qk` (q, kᵀ) and `av` (softmax, v) of every
CrossAttention and QKV attention, laid out (b h). Weight Dilation folds X/s into the norm a layer group
reads directly (attn1's q/k/v <- norm1, attn2's q <- norm2, the GEGLU projection <- norm3, proj_in and the
AttentionBlock qkv <- their GroupNorm); attn2's k/v read the FP context and share one s, kept in the quantizer.
"""
from __future__ import annotations

import torch.nn as nn

from quant.adapters import register

ATTENTION_CORES = ("CrossAttention", "QKVAttentionLegacy", "QKVAttention")


def _out_channels(block: nn.Module) -> int:
    """Channels a TimestepEmbedSequential hands on: those of its last layer that declares them."""
    for layer in reversed(list(block.children())):
        for attr in ("out_channels", "in_channels", "channels"):
            if isinstance(getattr(layer, attr, None), int):
                return getattr(layer, attr)
    raise ValueError(f"cannot tell the output channels of {type(block).__name__}")


def _named(model: nn.Module, *class_names: str):
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ in class_names]


@register("ldm.modules.diffusionmodules.openaimodel.UNetModel")
class LDMUNetAdapter:
    def units(self, model: nn.Module) -> list[str]:
        if getattr(model, "predict_codebook_ids", False):
            raise ValueError("UNetModel with predict_codebook_ids has no adapter (its output head is id_predictor)")
        return (["time_embed"] + [f"input_blocks.{i}" for i in range(len(model.input_blocks))] + ["middle_block"]
                + [f"output_blocks.{i}" for i in range(len(model.output_blocks))] + ["out"])

    def edge_layers(self, model: nn.Module) -> tuple[str, str]:
        return "input_blocks.0.0", "out.2"

    def split_channels(self, model: nn.Module) -> dict[str, int]:
        """output_blocks.i.0 reads cat([h, skip]) (UNetModel.forward): its first `channels - skip` channels are h."""
        skips = [_out_channels(block) for block in model.input_blocks]     # the hs stack
        out = {}
        for i, block in enumerate(model.output_blocks):
            res = block[0]
            first = res.channels - skips.pop()
            out[f"output_blocks.{i}.0.in_layers.2"] = first
            if isinstance(res.skip_connection, (nn.Conv2d, nn.Conv1d)):
                out[f"output_blocks.{i}.0.skip_connection"] = first
        return out

    def softmax_operands(self, model: nn.Module) -> dict[str, int | None]:
        out = {}
        for name, _ in _named(model, *ATTENTION_CORES):
            out[f"{name}.qk"] = None       # q, kᵀ
            out[f"{name}.av"] = 0          # softmax(q kᵀ), v
        return out

    def shared_inputs(self, model: nn.Module) -> list[tuple[str, ...]]:
        groups = list(self.norm_producers(model))
        groups += [(f"{name}.attn2.to_k", f"{name}.attn2.to_v") for name, _ in _named(model, "BasicTransformerBlock")]
        return groups

    def norm_producers(self, model: nn.Module) -> dict[tuple[str, ...], str]:
        out = {}
        for name, _ in _named(model, "BasicTransformerBlock"):
            out[tuple(f"{name}.attn1.to_{p}" for p in "qkv")] = f"{name}.norm1"
            out[(f"{name}.attn2.to_q",)] = f"{name}.norm2"
            out[(f"{name}.ff.net.0.proj",)] = f"{name}.norm3"       # GEGLU's projection (gated feed-forward)
            out[(f"{name}.ff.net.0.0",)] = f"{name}.norm3"          # Linear + GELU (plain feed-forward)
        for name, _ in _named(model, "SpatialTransformer"):
            out[(f"{name}.proj_in",)] = f"{name}.norm"
        for name, _ in _named(model, "AttentionBlock"):
            out[(f"{name}.qkv",)] = f"{name}.norm"
        layers = {name for name, m in model.named_modules()              # FP layers, or QuantLayers once wrapped
                  if isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() > 1}
        return {group: norm for group, norm in out.items() if set(group) <= layers}

    def head_layout(self, model: nn.Module) -> str:
        return "(b h)"          # ldm.modules.attention.split_heads: row = b * heads + h
