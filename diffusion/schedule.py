"""Timestep grids and coefficients of the DDIM-family samplers as CompVis's latent-diffusion code defines them
(ldm.modules.diffusionmodules.util re-exports them under CompVis's module path)."""
from __future__ import annotations

import numpy as np

DDIM_DISCRETIZATIONS = ("uniform", "quad")


def make_ddim_timesteps(method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int) -> np.ndarray:
    """The increasing integer timesteps a DDIM/PLMS sampler visits, as CompVis chooses them (note the +1).

    uniform: range(0, T, T // S) + 1; quad: int(linspace(0, sqrt(0.8 T), S)^2) + 1.
    """
    if not 1 <= num_ddim_timesteps <= num_ddpm_timesteps:
        raise ValueError(f"steps must be in [1, {num_ddpm_timesteps}], got {num_ddim_timesteps}")
    if method == "uniform":
        steps = np.arange(0, num_ddpm_timesteps, num_ddpm_timesteps // num_ddim_timesteps)
    elif method == "quad":
        steps = (np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_timesteps) ** 2).astype(int)
    else:
        raise ValueError(f"unknown DDIM discretization {method!r}; choose one of {DDIM_DISCRETIZATIONS}")
    if steps[-1] + 1 >= num_ddpm_timesteps:
        raise ValueError(f"{num_ddim_timesteps} {method} steps reach timestep {steps[-1] + 1} outside "
                         f"0..{num_ddpm_timesteps - 1} (the +1 shift); use fewer steps")
    return steps + 1


def make_ddim_sampling_parameters(alphas_cumprod: np.ndarray, ddim_timesteps: np.ndarray, eta: float):
    """(sigmas, alphas, alphas_prev) of each DDIM step, CompVis's choice: alphas_prev[0] = abar_0 (not 1).

    sigma_i = eta sqrt((1 - a_prev) / (1 - a) (1 - a / a_prev))  (DDIM eq. 16).
    """
    alphas = alphas_cumprod[ddim_timesteps]
    alphas_prev = np.concatenate([alphas_cumprod[:1], alphas_cumprod[ddim_timesteps[:-1]]])
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    return sigmas, alphas, alphas_prev
