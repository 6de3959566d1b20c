"""Samplers as plain functions of a noise-prediction callable `eps = model(x, t)`.

They know nothing about quantization: an FP or quantized network runs through the same code.
`on_step(x_t, t)` (optional) sees every network input, e.g. to collect calibration data.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ddim.schedule import alphas_cumprod

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepHook = Optional[Callable[[torch.Tensor, torch.Tensor], None]]


def _abar(abar: torch.Tensor, t: int, like: torch.Tensor) -> torch.Tensor:
    """abar_t with abar_{-1} = 1, as a scalar tensor on like's device/dtype."""
    value = 1.0 if t < 0 else float(abar[t])
    return torch.tensor(value, device=like.device, dtype=like.dtype)


@torch.no_grad()
def ddim_sample(model: EpsModel, x_T: torch.Tensor, seq: Sequence[int], betas: torch.Tensor, eta: float = 0.0,
                generator: torch.Generator | None = None, on_step: StepHook = None) -> torch.Tensor:
    """DDIM generalized steps (Song et al. 2021, eq. 12), visiting `seq` from its end to its start.

    x0 = (x_t - sqrt(1-a_t) eps) / sqrt(a_t); c1 = eta sqrt((1 - a_t/a_n)(1 - a_n)/(1 - a_t));
    x_n = sqrt(a_n) x0 + c1 z + sqrt(1 - a_n - c1^2) eps.
    """
    abar = alphas_cumprod(betas)
    x = x_T
    nxt = [-1] + list(seq[:-1])
    for t, t_next in zip(reversed(seq), reversed(nxt)):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        if on_step is not None:
            on_step(x, tt)
        eps = model(x, tt)
        a_t, a_n = _abar(abar, t, x), _abar(abar, t_next, x)
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        c1 = eta * ((1 - a_t / a_n) * (1 - a_n) / (1 - a_t)).sqrt()
        c2 = (1 - a_n - c1 ** 2).sqrt()
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if eta > 0 else 0.0
        x = a_n.sqrt() * x0 + c1 * noise + c2 * eps
    return x


@torch.no_grad()
def ddpm_sample(model: EpsModel, x_T: torch.Tensor, seq: Sequence[int], betas: torch.Tensor,
                generator: torch.Generator | None = None, on_step: StepHook = None) -> torch.Tensor:
    """Ancestral sampling (DDPM eq. 11) over `seq`, with the posterior variance of the skipped chain."""
    abar = alphas_cumprod(betas)
    x = x_T
    nxt = [-1] + list(seq[:-1])
    for t, t_next in zip(reversed(seq), reversed(nxt)):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        if on_step is not None:
            on_step(x, tt)
        eps = model(x, tt)
        a_t, a_n = _abar(abar, t, x), _abar(abar, t_next, x)
        beta_t = 1 - a_t / a_n                                   # effective beta of the skip t -> t_next
        x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
        mean = (a_n.sqrt() * beta_t * x0 + (1 - beta_t).sqrt() * (1 - a_n) * x) / (1 - a_t)
        if t_next < 0:
            x = mean
        else:
            var = beta_t * (1 - a_n) / (1 - a_t)
            x = mean + var.sqrt() * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x
