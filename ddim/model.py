"""The DDPM noise-prediction UNet (Ho et al. 2020) as used by the public DDIM code.

Module names and parameter shapes follow the public `model-790000.ckpt` state_dict layout
(`temb.dense.{0,1}`, `down.{i}.block.{j}`, `down.{i}.attn.{j}`, `mid.block_1`, `up.{i}.block.{j}`,
`norm_out`, `conv_out`, ...), so such a checkpoint loads with `strict=True`. The two attention
matmuls are `MatMul` modules (no parameters) so that quantization can wrap them from outside.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.nn import MatMul
from ddim.config import UNetConfig


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (DDPM): [sin(t f_k), cos(t f_k)], f_k = 10000^(-k/(dim/2-1)). [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float, groups: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = self.nin_shortcut(x) if self.in_channels != self.out_channels else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.qk = MatMul()
        self.av = MatMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(b, c, hh * ww).transpose(1, 2)    # [B, HW, C]
        k = self.k(h).reshape(b, c, hh * ww)                    # [B, C, HW]
        v = self.v(h).reshape(b, c, hh * ww)                    # [B, C, HW]
        w = torch.softmax(self.qk(q, k) * c ** -0.5, dim=2)     # [B, HW(query), HW(key)]
        h = self.av(v, w.transpose(1, 2)).reshape(b, c, hh, ww)  # [B, C, HW(query)]
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as in the public model
        return F.avg_pool2d(x, 2)


class Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Level(nn.Module):
    """One resolution of the down or up path: `block`, `attn` lists and an optional resampler."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class Mid(nn.Module):
    def __init__(self, channels: int, temb_channels: int, dropout: float, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, temb_channels, dropout, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, temb_channels, dropout, groups)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h, temb)), temb)


class UNet(nn.Module):
    """eps = unet(x_t, t): x_t [B, C, H, W], t [B] integer timesteps in [0, T)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch, g, temb_ch = cfg.ch, cfg.num_groups, cfg.ch * 4
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, temb_ch), nn.Linear(temb_ch, temb_ch)])
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        mults = (1,) + tuple(cfg.ch_mult)
        res, skip_channels = cfg.resolution, [ch]
        self.down = nn.ModuleList()
        for i, m in enumerate(cfg.ch_mult):
            level, c_in, c_out = Level(), ch * mults[i], ch * m
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(c_in, c_out, temb_ch, cfg.dropout, g))
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(c_out, g))
                c_in = c_out
                skip_channels.append(c_out)
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(c_out, cfg.resamp_with_conv)
                res //= 2
                skip_channels.append(c_out)
            self.down.append(level)

        self.mid = Mid(c_in, temb_ch, cfg.dropout, g)

        up_levels = []
        for i in reversed(range(len(cfg.ch_mult))):
            level, c_out = Level(), ch * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(c_in + skip_channels.pop(), c_out, temb_ch, cfg.dropout, g))
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(c_out, g))
                c_in = c_out
            if i != 0:
                level.upsample = Upsample(c_out, cfg.resamp_with_conv)
                res *= 2
            up_levels.insert(0, level)  # up.{i} is indexed by resolution level, like the checkpoint
        self.up = nn.ModuleList(up_levels)

        self.norm_out = group_norm(c_in, g)
        self.conv_out = nn.Conv2d(c_in, cfg.out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = timestep_embedding(t, self.cfg.ch).to(x.dtype)       # [B, ch]
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](temb)))  # [B, 4ch]

        hs = [self.conv_in(x)]
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(hs[-1], temb)
                if len(level.attn):
                    h = level.attn[j](h)
                hs.append(h)
            if hasattr(level, "downsample"):
                hs.append(level.downsample(hs[-1]))

        h = self.mid(hs[-1], temb)

        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)  # [B, C_h + C_skip, H, W]
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)

        return self.conv_out(F.silu(self.norm_out(h)))
