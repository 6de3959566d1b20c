"""Small building blocks and schedules shared by the LDM networks and samplers (CompVis conventions)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from diffusion.schedule import DDIM_DISCRETIZATIONS, make_ddim_sampling_parameters, make_ddim_timesteps  # noqa: F401

BETA_SCHEDULES = ("linear", "cosine", "sqrt_linear", "sqrt")


def make_beta_schedule(schedule: str, n_timestep: int, linear_start: float = 1e-4, linear_end: float = 2e-2,
                       cosine_s: float = 8e-3) -> np.ndarray:
    """beta_0..beta_{T-1} as float64. LDM's 'linear' is linear in sqrt(beta): linspace(sqrt b0, sqrt b1)^2."""
    if schedule == "linear":
        return np.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=np.float64) ** 2
    if schedule == "cosine":  # Nichol & Dhariwal 2021
        s = np.arange(n_timestep + 1, dtype=np.float64) / n_timestep + cosine_s
        abar = np.cos(s / (1 + cosine_s) * np.pi / 2) ** 2
        return np.clip(1 - abar[1:] / abar[:-1], 0, 0.999)
    if schedule == "sqrt_linear":
        return np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64)
    if schedule == "sqrt":
        return np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64) ** 0.5
    raise ValueError(f"unknown beta schedule {schedule!r}; choose one of {BETA_SCHEDULES}")


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(t f_k), sin(t f_k)], f_k = max_period^(-k/half) (the openai/CompVis UNet convention). [N] -> [N, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (the UNet's `normalization`, eps 1e-5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> nn.Module:
    return GroupNorm32(32, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero the parameters of `module` (output layers start at zero, as in training from scratch)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1D or 2D convolution (the attention projections are 1D, everything else 2D)."""
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    raise ValueError(f"unsupported dims={dims}; this implementation supports 1 and 2")


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    if dims == 2:
        return nn.AvgPool2d(*args, **kwargs)
    raise ValueError(f"unsupported dims={dims}; this implementation supports 2")
