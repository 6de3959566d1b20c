"""Noise schedules and the sampling-step sequences of DDIM (Song et al. 2021, app. and public code)."""
from __future__ import annotations

import math

import numpy as np
import torch

from ddim.config import DiffusionConfig

SKIP_TYPES = ("uniform", "quad")


def make_betas(cfg: DiffusionConfig) -> torch.Tensor:
    """beta_1..beta_T as float64 [T]."""
    n, b0, b1 = cfg.num_diffusion_timesteps, cfg.beta_start, cfg.beta_end
    if cfg.beta_schedule == "linear":
        betas = np.linspace(b0, b1, n)
    elif cfg.beta_schedule == "quad":
        betas = np.linspace(b0 ** 0.5, b1 ** 0.5, n) ** 2
    elif cfg.beta_schedule == "const":
        betas = np.full(n, b1)
    elif cfg.beta_schedule == "jsd":  # 1/T, 1/(T-1), ..., 1
        betas = 1.0 / np.linspace(n, 1, n)
    elif cfg.beta_schedule == "sigmoid":
        betas = (b1 - b0) / (1 + np.exp(-np.linspace(-6, 6, n))) + b0
    else:  # cosine (Nichol & Dhariwal 2021, s = 0.008)
        f = lambda t: math.cos((t / n + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(n)])
    return torch.from_numpy(betas.astype(np.float64))


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """abar_t = prod_{s<=t} (1 - beta_s), [T] float64."""
    return torch.cumprod(1.0 - betas, dim=0)


def timestep_sequence(num_timesteps: int, steps: int, skip_type: str) -> list[int]:
    """Increasing timesteps visited by a `steps`-step sampler (the public DDIM definitions).

    uniform: range(0, T, T // steps); quad: int(s) for s in linspace(0, sqrt(0.8 T), steps)^2.
    """
    if skip_type not in SKIP_TYPES:
        raise ValueError(f"unknown skip_type {skip_type!r}; choose one of {SKIP_TYPES}")
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    if skip_type == "uniform":
        return list(range(0, num_timesteps, num_timesteps // steps))
    seq = np.linspace(0, np.sqrt(num_timesteps * 0.8), steps) ** 2
    return [int(s) for s in seq]
