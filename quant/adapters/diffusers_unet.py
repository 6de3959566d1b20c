"""Adapters for diffusers' UNet2DModel and UNet2DConditionModel (as wrapped by `hf.unet.DiffusersUNet`) and its
DiT and PixArt transformers (`hf.unet.DiffusersTransformer`), read through module names and class names only (no
import of diffusers or hf).

Units, in forward order: `time_embedding`, `conv_in`, then per down/mid/up block its resnets and attentions in the
order the block calls them (a Transformer2DModel as its `proj_in`, each transformer block and `proj_out`, since
the model itself returns a tuple; a UNet2DModel `Attention` whole), its down/upsampler, and `conv_out`. Edge
layers: `conv_in`, `conv_out`. Split shortcut: every up-block resnet reads cat([h, skip]) in `conv1` (after its
norm and SiLU) and `conv_shortcut`; the skip widths follow the down path's stack. Attention products:
`<attention>.processor.qk` / `.av` (hf.unet.MatMulAttnProcessor), laid out (b h). Weight Dilation folds X/s into
the norm a layer group reads directly: a transformer block's norm1 (attn1 q/k/v), norm2 (attn2 q), norm3 (the
GEGLU projection), a Transformer2DModel's norm (proj_in), an Attention's group_norm (its q/k/v); attn2's k/v read
the FP text context and share one s, kept in their quantizer.
"""
from __future__ import annotations

import torch.nn as nn

from quant.adapters import register

PREFIX = "unet."


def _attention_units(name: str, module: nn.Module) -> list[str]:
    if type(module).__name__ == "Transformer2DModel":
        blocks = [f"{name}.transformer_blocks.{k}" for k in range(len(module.transformer_blocks))]
        return [f"{name}.proj_in", *blocks, f"{name}.proj_out"]
    return [name]


def _block_units(name: str, block: nn.Module, mid: bool = False) -> list[str]:
    resnets = [f"{name}.resnets.{j}" for j in range(len(block.resnets))]
    attentions = list(getattr(block, "attentions", None) or [])
    attn = [_attention_units(f"{name}.attentions.{j}", a) for j, a in enumerate(attentions)]
    if mid:                                        # resnets[0], then (attention j, resnet j + 1)
        out = resnets[:1] + [u for j, units in enumerate(attn) for u in units + resnets[j + 1:j + 2]]
    else:                                          # (resnet j, attention j)
        out = [u for j, r in enumerate(resnets) for u in [r] + (attn[j] if j < len(attn) else [])]
    for sampler in ("downsamplers", "upsamplers"):
        if getattr(block, sampler, None) is not None:
            out += [f"{name}.{sampler}.{k}" for k in range(len(getattr(block, sampler)))]
    return out


def _named(model: nn.Module, *class_names: str):
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ in class_names]


@register("hf.unet.DiffusersUNet")
class DiffusersUNetAdapter:
    def units(self, model: nn.Module) -> list[str]:
        unet = model.unet
        out = ["time_embedding", "conv_in"]
        out += [u for i, b in enumerate(unet.down_blocks) for u in _block_units(f"down_blocks.{i}", b)]
        if unet.mid_block is not None:
            out += _block_units("mid_block", unet.mid_block, mid=True)
        out += [u for i, b in enumerate(unet.up_blocks) for u in _block_units(f"up_blocks.{i}", b)]
        return [PREFIX + u for u in out + ["conv_out"]]

    def edge_layers(self, model: nn.Module) -> tuple[str, str]:
        return PREFIX + "conv_in", PREFIX + "conv_out"

    def split_channels(self, model: nn.Module) -> dict[str, int]:
        unet = model.unet
        skips = [unet.conv_in.out_channels]                   # the down path's stack of skip tensors
        for block in unet.down_blocks:
            skips += [r.out_channels for r in block.resnets]
            skips += [d.out_channels for d in (getattr(block, "downsamplers", None) or [])]
        out = {}
        for i, block in enumerate(unet.up_blocks):
            for j, res in enumerate(block.resnets):
                first = res.in_channels - skips.pop()
                out[f"{PREFIX}up_blocks.{i}.resnets.{j}.conv1"] = first
                if isinstance(getattr(res, "conv_shortcut", None), nn.Conv2d):
                    out[f"{PREFIX}up_blocks.{i}.resnets.{j}.conv_shortcut"] = first
        return out

    def softmax_operands(self, model: nn.Module) -> dict[str, int | None]:
        out = {}
        for name, _ in _named(model, "Attention"):
            out[f"{name}.processor.qk"] = None           # q, kᵀ
            out[f"{name}.processor.av"] = 0              # softmax(q kᵀ), v
        return out

    def shared_inputs(self, model: nn.Module) -> list[tuple[str, ...]]:
        groups = list(self.norm_producers(model))
        groups += [(f"{name}.attn2.to_k", f"{name}.attn2.to_v") for name, m in _named(model, "BasicTransformerBlock")
                   if getattr(m, "attn2", None) is not None]
        return groups

    def norm_producers(self, model: nn.Module) -> dict[tuple[str, ...], str]:
        out = {}
        for name, m in _named(model, "BasicTransformerBlock"):
            if getattr(m, "norm_type", "layer_norm") != "layer_norm":     # modulated after the norm: no fold
                continue
            out[tuple(f"{name}.attn1.to_{p}" for p in "qkv")] = f"{name}.norm1"
            if getattr(m, "attn2", None) is not None:
                out[(f"{name}.attn2.to_q",)] = f"{name}.norm2"
            out[(f"{name}.ff.net.0.proj",)] = f"{name}.norm3"
        for name, m in _named(model, "Transformer2DModel"):
            out[(f"{name}.proj_in",)] = f"{name}.norm"
        for name, m in _named(model, "Attention"):
            if getattr(m, "group_norm", None) is not None:
                out[tuple(f"{name}.to_{p}" for p in "qkv")] = f"{name}.group_norm"
        types = {name: type(m).__name__ for name, m in model.named_modules()}
        norms = ("GroupNorm", "LayerNorm")                     # AdaLayerNorm variants have no affine to fold into
        layers = {name for name, m in model.named_modules()
                  if isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() > 1}
        return {group: norm for group, norm in out.items() if set(group) <= layers and types.get(norm) in norms}

    def head_layout(self, model: nn.Module) -> str:
        return "(b h)"          # hf.unet.MatMulAttnProcessor: row = b * heads + h


@register("hf.unet.DiffusersTransformer")
class DiffusersTransformerAdapter:
    """DiT / PixArt. Units in forward order: the patch embedding, (PixArt) the timestep embedding and its
    projection, the caption projection, every transformer block (each computes its own ada-norm modulation), and
    the output projections. Edge layers: the patch conv and the last projection. No split. Attention products as
    for the UNets. Their norms are modulated after normalising (AdaLayerNormZero, ada_norm_single: LN(x)(1 +
    scale) + shift, the LayerNorm without affine), so no layer group has a norm to fold X/s into: it stays in
    each layer's activation quantizer (exact); q/k/v, and attn2's k/v, still share one s."""

    PREFIX = "model."

    def units(self, model: nn.Module) -> list[str]:
        net = model.model
        blocks = [f"transformer_blocks.{k}" for k in range(len(net.transformer_blocks))]
        if model.kind == "PixArtTransformer2DModel":
            head = ["pos_embed", "adaln_single.emb", "adaln_single.linear"]
            head += ["caption_projection"] if getattr(net, "caption_projection", None) is not None else []
            return [self.PREFIX + u for u in head + blocks + ["proj_out"]]
        return [self.PREFIX + u for u in ["pos_embed", *blocks, "proj_out_1", "proj_out_2"]]

    def edge_layers(self, model: nn.Module) -> tuple[str, str]:
        last = "proj_out" if model.kind == "PixArtTransformer2DModel" else "proj_out_2"
        return self.PREFIX + "pos_embed.proj", self.PREFIX + last

    def split_channels(self, model: nn.Module) -> dict[str, int]:
        return {}

    softmax_operands = DiffusersUNetAdapter.softmax_operands

    def shared_inputs(self, model: nn.Module) -> list[tuple[str, ...]]:
        out = []
        for name, m in _named(model, "BasicTransformerBlock"):
            out.append(tuple(f"{name}.attn1.to_{p}" for p in "qkv"))
            if getattr(m, "attn2", None) is not None:
                out.append((f"{name}.attn2.to_k", f"{name}.attn2.to_v"))
        return out

    def norm_producers(self, model: nn.Module) -> dict[tuple[str, ...], str]:
        return {}

    def head_layout(self, model: nn.Module) -> str:
        return "(b h)"
