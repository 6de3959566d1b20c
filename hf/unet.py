"""A diffusers UNet (UNet2DModel, UNet2DConditionModel) as a network of this repo's quantization core.

`DiffusersUNet(unet)` installs `MatMulAttnProcessor` on every attention module through diffusers' public
extension points (the UNet's `set_attn_processor`, or each Attention's `set_processor` where the model has none),
and is called as `net(x, t, **cond)` (cond: the UNet's keyword arguments, e.g.
`encoder_hidden_states`), returning the sample tensor instead of diffusers' output object. The processor computes
what diffusers' default processor (AttnProcessor2_0, `F.scaled_dot_product_attention`) computes, with the two
products QKᵀ and softmax·V as `common.nn.MatMul` modules (`processor.qk`, `processor.av`) that the quantizer
wraps; heads are laid out "(b h)". `quant/adapters/diffusers_unet.py` tells the core the rest (units, split
channels, norms).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from common.errors import UsageError
from common.nn import MatMul


class MatMulAttnProcessor(nn.Module):
    """Attention of a diffusers `Attention` module with its two products as modules. Supports what the UNets' and
    transformers' attention uses (self- and cross-attention, an attention mask (PixArt's caption mask: additive, or
    boolean with True = attend, as SDPA takes it), the optional group_norm, spatial 4-d inputs, residual connection,
    output rescale); a spatial norm or q/k norms are refused in one line."""

    def __init__(self):
        super().__init__()
        self.qk, self.av = MatMul(), MatMul()

    def forward(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if getattr(attn, "spatial_norm", None) is not None or \
                getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
            raise UsageError("MatMulAttnProcessor supports no spatial norm or q/k norm",
                             "quantize this model's attention with its own processor")
        residual = hidden_states
        spatial = hidden_states.dim() == 4
        if spatial:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        n, heads = query.shape[0], attn.heads
        head_dim = key.shape[-1] // heads

        def rows(t: torch.Tensor) -> torch.Tensor:                     # [n, L, heads*d] -> [(n heads), L, d]
            return t.view(n, -1, heads, head_dim).transpose(1, 2).reshape(n * heads, -1, head_dim)

        q, k, v = rows(query), rows(key), rows(value)
        scores = self.qk(q, k.transpose(1, 2)) * head_dim ** -0.5       # SDPA's default scale
        if attention_mask is not None:                                  # -> [(n heads), 1 or Lq, Lk], as SDPA's
            mask = attn.prepare_attention_mask(attention_mask, key.shape[1], n)
            if mask.dtype == torch.bool:
                mask = torch.zeros_like(mask, dtype=scores.dtype).masked_fill(~mask, torch.finfo(scores.dtype).min)
            scores = scores + mask
        out = self.av(scores.softmax(dim=-1), v)                        # [(n heads), Lq, d]
        out = out.view(n, heads, -1, head_dim).transpose(1, 2).reshape(n, -1, heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))                       # projection, dropout
        if spatial:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install_processors(model: nn.Module) -> None:
    """MatMulAttnProcessor on every attention module, through diffusers' public extension points: the model's
    `set_attn_processor`, or each Attention's `set_processor` where the model has none."""
    if hasattr(model, "set_attn_processor"):
        model.set_attn_processor({name: MatMulAttnProcessor() for name in model.attn_processors})
        return
    for module in model.modules():
        if callable(getattr(module, "set_processor", None)):
            module.set_processor(MatMulAttnProcessor())


def _prepared(model: nn.Module, kinds: tuple[str, ...], what: str) -> nn.Module:
    """`model` with MatMulAttnProcessor installed, if it is one of the diffusers classes `kinds`."""
    if type(model).__name__ not in kinds:
        raise UsageError(f"{type(model).__name__} is not a diffusers {what} this wrapper knows",
                         f"pass one of {', '.join(kinds)}")
    install_processors(model)
    return model


class DiffusersUNet(nn.Module):
    """A diffusers UNet called as net(x, t, **cond) -> the predicted tensor (diffusers' `return_dict=False`
    output), its attention through MatMulAttnProcessor. `unet` keeps the diffusers module (its config, its
    state_dict keys under `unet.`)."""

    KINDS = ("UNet2DModel", "UNet2DConditionModel")

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = _prepared(unet, self.KINDS, "UNet")

    @property
    def kind(self) -> str:
        return type(self.unet).__name__

    def forward(self, x: torch.Tensor, t, **cond) -> torch.Tensor:
        return self.unet(x, t, return_dict=False, **cond)[0]


class DiffusersTransformer(nn.Module):
    """A diffusers DiT or PixArt transformer (DiTTransformer2DModel, PixArtTransformer2DModel) called as
    net(x, t, **cond) -> its output tensor (DiT and PixArt predict eps and the variance: 2 x in_channels), its
    attention through MatMulAttnProcessor. cond: `class_labels` (DiT); `encoder_hidden_states`,
    `encoder_attention_mask` and PixArt's micro-conditions `resolution` [B, 2] and `aspect_ratio` [B, 1] (flat
    tensors with one row per sample, so that calibration sets and batches slice them; given to the model as its
    `added_cond_kwargs`, None when absent)."""

    KINDS = ("DiTTransformer2DModel", "PixArtTransformer2DModel")

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = _prepared(model, self.KINDS, "transformer")

    @property
    def kind(self) -> str:
        return type(self.model).__name__

    def forward(self, x: torch.Tensor, t, **cond) -> torch.Tensor:
        if self.kind == "PixArtTransformer2DModel":
            cond["added_cond_kwargs"] = {k: cond.pop(k, None) for k in ("resolution", "aspect_ratio")}
        t = torch.as_tensor(t, device=x.device)
        return self.model(x, timestep=t.expand(len(x)) if t.dim() == 0 else t, return_dict=False, **cond)[0]


def wrap_diffusers(model: nn.Module) -> nn.Module:
    """DiffusersUNet or DiffusersTransformer, by the diffusers class of `model`."""
    kinds = DiffusersUNet.KINDS + DiffusersTransformer.KINDS
    if type(model).__name__ not in kinds:
        raise UsageError(f"{type(model).__name__} is not a diffusers model this repo wraps",
                         f"pass one of {', '.join(kinds)}")
    return (DiffusersUNet if type(model).__name__ in DiffusersUNet.KINDS else DiffusersTransformer)(model)
