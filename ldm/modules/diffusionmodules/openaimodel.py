"""The LDM/SD noise-prediction UNet (openai guided-diffusion design as CompVis uses it).

Keys follow the public checkpoints' `model.diffusion_model.*`: `time_embed.{0,2}`, `label_emb`,
`input_blocks.{i}.{j}` (ResBlock `in_layers.{0,2}`, `emb_layers.1`, `out_layers.{0,3}`, `skip_connection`;
AttentionBlock `norm`, `qkv`, `proj_out`; SpatialTransformer; Downsample `op`), `middle_block.{0,1,2}`,
`output_blocks.{i}.{j}` (Upsample `conv`), `out.{0,2}`. `use_checkpoint` (gradient checkpointing) and
`use_fp16` are accepted for config compatibility and not used.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.nn import MatMul
from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import avg_pool_nd, conv_nd, normalization, timestep_embedding, zero_module


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as second argument."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Runs its children in order, giving the timestep embedding to TimestepBlocks and the context to
    SpatialTransformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest 2x upsampling, then an optional 3x3 conv (`conv`)."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        self.channels, self.out_channels, self.use_conv = channels, out_channels or channels, use_conv
        if use_conv:
            self.conv = conv_nd(dims, channels, self.out_channels, 3, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """A stride-2 3x3 conv or a 2x2 average pool (`op`)."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        self.channels, self.out_channels, self.use_conv = channels, out_channels or channels, use_conv
        if use_conv:
            self.op = conv_nd(dims, channels, self.out_channels, 3, stride=2, padding=padding)
        else:
            if self.out_channels != channels:
                raise ValueError("Downsample without conv cannot change the channel count")
            self.op = avg_pool_nd(dims, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """GroupNorm-SiLU-conv, + timestep embedding (added, or FiLM scale/shift with use_scale_shift_norm),
    GroupNorm-SiLU-dropout-conv, + skip; optionally up/downsampling inside (resblock_updown)."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, dims: int = 2,
                 use_checkpoint: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        self.channels, self.out_channels = channels, out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       conv_nd(dims, channels, self.out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, dims), Upsample(channels, False, dims)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, dims), Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels))
        self.out_layers = nn.Sequential(normalization(self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)))
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3 if use_conv else 1,
                                           padding=1 if use_conv else 0)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:  # resample between the norm/SiLU and the conv of in_layers
            h = self.in_layers[2](self.h_upd(self.in_layers[1](self.in_layers[0](x))))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb)[:, :, None, None].to(h.dtype)   # [N, C or 2C, 1, 1]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            for layer in self.out_layers[1:]:
                h = layer(h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class QKVAttentionLegacy(nn.Module):
    """Attention over a fused qkv [N, heads*3*C, T] split heads first (the 'legacy' order of the public
    checkpoints). q and k are each scaled by C^(-1/4) before `qk`, as in the public code."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qk = MatMul()
        self.av = MatMul()

    def split(self, qkv: torch.Tensor):
        """-> q, k, v each [(N heads), C, T]."""
        n, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        return qkv.reshape(n * self.n_heads, 3 * ch, length).split(ch, dim=1)

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        n, _, length = qkv.shape
        q, k, v = self.split(qkv)
        scale = q.shape[1] ** -0.25
        weight = self.qk((q * scale).transpose(1, 2), k * scale).softmax(dim=-1)  # [(N h), T, S]
        a = self.av(weight, v.transpose(1, 2))                                     # [(N h), T, C]
        return a.transpose(1, 2).reshape(n, -1, length)                           # [N, h*C, T]


class QKVAttention(QKVAttentionLegacy):
    """The same attention with qkv split into q, k, v first, then heads (use_new_attention_order)."""

    def split(self, qkv: torch.Tensor):
        n, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        return [t.reshape(n * self.n_heads, ch, length) for t in qkv.chunk(3, dim=1)]


class AttentionBlock(nn.Module):
    """Spatial self-attention with a fused 1D-conv qkv projection (`norm`, `qkv`, `proj_out`)."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1, use_checkpoint: bool = False,
                 use_new_attention_order: bool = False):
        super().__init__()
        if num_head_channels != -1 and channels % num_head_channels:
            raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
        self.channels = channels
        self.num_heads = num_heads if num_head_channels == -1 else channels // num_head_channels
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.attention = (QKVAttention if use_new_attention_order else QKVAttentionLegacy)(self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)                                  # [B, C, T]
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


class UNetModel(nn.Module):
    """eps = unet(x, timesteps, context=None, y=None).

    attention_resolutions are downsampling factors (ds), not pixel sizes. Heads: `num_heads` fixed, or
    channels // `num_head_channels`; SpatialTransformer head width = channels // heads.
    """

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 dropout=0.0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2, num_classes=None,
                 use_checkpoint=False, use_fp16=False, num_heads=-1, num_head_channels=-1, num_heads_upsample=-1,
                 use_scale_shift_norm=False, resblock_updown=False, use_new_attention_order=False,
                 use_spatial_transformer=False, transformer_depth=1, context_dim=None, n_embed=None, legacy=True):
        super().__init__()
        if use_spatial_transformer != (context_dim is not None):
            raise ValueError("use_spatial_transformer and context_dim go together (cross-attention needs both)")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set num_heads or num_head_channels")
        if dims != 2:
            raise ValueError("this implementation supports dims=2 only")
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.model_channels, self.num_classes = model_channels, num_classes
        self.num_res_blocks, self.attention_resolutions = num_res_blocks, tuple(attention_resolutions)
        self.channel_mult, self.predict_codebook_ids = tuple(channel_mult), n_embed is not None
        heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample

        def heads_for(ch: int, upsample: bool = False) -> int:
            if num_head_channels != -1:
                return ch // num_head_channels
            return heads_up if upsample and not use_spatial_transformer else num_heads

        def attention(ch: int, upsample: bool = False) -> nn.Module:
            heads = heads_for(ch, upsample)
            if use_spatial_transformer:
                return SpatialTransformer(ch, heads, ch // heads, depth=transformer_depth, context_dim=context_dim)
            return AttentionBlock(ch, num_heads=heads, use_new_attention_order=use_new_attention_order)

        def res(ch_in: int, ch_out: int | None = None, **kw) -> ResBlock:
            return ResBlock(ch_in, time_embed_dim, dropout, out_channels=ch_out,
                            use_scale_shift_norm=use_scale_shift_norm, **kw)

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_embed_dim), nn.SiLU(),
                                        nn.Linear(time_embed_dim, time_embed_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_chans, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch), attention(ch), res(ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), model_channels * mult)]   # input: [h, skip] concatenated
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attention(ch, upsample=True))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                 zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1)))
        if self.predict_codebook_ids:
            self.id_predictor = nn.Sequential(normalization(ch), nn.Conv2d(model_channels, n_embed, 1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """x [N, C, H, W], timesteps [N] (integers of the discrete schedule), context [N, L, context_dim],
        y [N] class labels (num_classes models only)."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass y (class labels) if and only if the UNet has num_classes")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))  # [N, 4 model_channels]
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.id_predictor(h) if self.predict_codebook_ids else self.out(h)
