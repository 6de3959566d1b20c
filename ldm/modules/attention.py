"""Cross-attention transformer blocks of the LDM/SD UNet (`SpatialTransformer`), CompVis layout.

Both attention matmuls are `MatMul` modules without parameters (hook points for quantizing their
inputs from outside): `qk(q, kᵀ)` with q [(b h), n, d] and kᵀ [(b h), d, m], and `av(softmax, v)` with
the softmax probabilities [(b h), n, m] as first operand. Heads are batch-major: row = b * heads + h.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.nn import MatMul
from ldm.modules.diffusionmodules.util import zero_module


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, n, h*d] -> [(b h), n, d]."""
    b, n, hd = x.shape
    return x.reshape(b, n, heads, hd // heads).permute(0, 2, 1, 3).reshape(b * heads, n, hd // heads)


def merge_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[(b h), n, d] -> [b, n, h*d]."""
    bh, n, d = x.shape
    return x.reshape(bh // heads, heads, n, d).permute(0, 2, 1, 3).reshape(bh // heads, n, heads * d)


class GEGLU(nn.Module):
    """x W_a * gelu(x W_b), one Linear giving both halves (`proj`)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = False, dropout: float = 0.0):
        super().__init__()
        inner = int(dim * mult)
        project_in = GEGLU(dim, inner) if glu else nn.Sequential(nn.Linear(dim, inner), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner, dim_out or dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention of x [b, n, query_dim] to context [b, m, context_dim] (self-attention without one)."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner = dim_head * heads
        context_dim = context_dim or query_dim
        self.scale = dim_head ** -0.5
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))
        self.qk = MatMul()
        self.av = MatMul()

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q = split_heads(self.to_q(x), self.heads)                      # [(b h), n, d]
        k = split_heads(self.to_k(context), self.heads)                # [(b h), m, d]
        v = split_heads(self.to_v(context), self.heads)                # [(b h), m, d]
        attn = (self.qk(q, k.transpose(1, 2)) * self.scale).softmax(dim=-1)  # [(b h), n, m]
        return self.to_out(merge_heads(self.av(attn, v), self.heads))  # [b, n, h*d] -> [b, n, query_dim]


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the context, gated feed-forward; pre-LayerNorm, residual each."""

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0, context_dim: int | None = None,
                 gated_ff: bool = True, checkpoint: bool = True):
        super().__init__()  # `checkpoint` (gradient checkpointing) is accepted for config compatibility, unused
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context=context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """[b, c, h, w] -> GroupNorm, 1x1 conv in, transformer blocks over the h*w tokens, 1x1 conv out, + input."""

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: int | None = None):
        super().__init__()
        inner = n_heads * d_head
        self.in_channels = in_channels
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Conv2d(in_channels, inner, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, n_heads, d_head, dropout=dropout, context_dim=context_dim)
             for _ in range(depth)])
        self.proj_out = zero_module(nn.Conv2d(inner, in_channels, kernel_size=1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        t = self.proj_in(self.norm(x))
        t = t.flatten(2).transpose(1, 2)                               # [b, h*w, inner]
        for block in self.transformer_blocks:
            t = block(t, context=context)
        t = t.transpose(1, 2).reshape(b, -1, h, w)                    # [b, inner, h, w]
        return x + self.proj_out(t)
