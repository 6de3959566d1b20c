"""Every sampler of this repo, as plain functions of a noise-prediction callable, for every model family.

- CompVis's DDIM, PLMS and DPM-Solver(-2, multistep) over `eps_fn(x, t, cond)` (for an LDM,
  `LatentDiffusion.apply_model`; for a DDIM UNet, `unconditional(model)`), with classifier-free guidance;
  `Sampler` fixes their settings and knows the timesteps they call the network at.
- The DDIM repository's own `generalized_steps` (DDIM with abar_{-1} = 1 at the last step) and `ddpm_steps`
  (ancestral), over `model(x, t)`, with coefficients in the tensor's dtype: Q-Diffusion's `--sample_type
  generalized` / `ddpm_noisy` for DDIM models, kept bit for bit.

Every network call gets the TRUE integer timestep t of the discrete schedule as a long tensor [N], so a quantizer
can look up per-timestep parameters from t; each sampler's timesteps are known before sampling. Classifier-free
guidance is one network call on cat([x, x]), cat([t, t]), cat([uncond, cond]) with eps = eps_u + scale (eps_c -
eps_u); scale 1 (or no uncond) runs the conditional pass only. `on_step(x, t, cond)` (`on_step(x, t)` for the
DDIM repository's samplers) sees every network input (the doubled batch under guidance), e.g. to draw calibration
data. CompVis's schedule coefficients are Python floats computed on the host from `alphas_cumprod`, so sampling
makes no device-to-host syncs. The samplers know nothing about quantization.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from diffusion.schedule import make_ddim_sampling_parameters, make_ddim_timesteps

EpsFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
StepHook = Optional[Callable[[torch.Tensor, torch.Tensor, Any], None]]
SAMPLERS = ("ddim", "plms", "dpm_solver")


def unconditional(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> EpsFn:
    """eps_fn(x, t, cond) of an unconditional network model(x, t) (a DDIM UNet): cond is None."""
    return lambda x, t, cond: model(x, t)


def cat_cond(uncond, cond):
    """Batch-concatenate two conditionings of the same structure (tensor, list of tensors, dict, or None)."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: cat_cond(uncond[k], cond[k]) for k in cond}
    if isinstance(cond, (list, tuple)):
        return [cat_cond(u, c) for u, c in zip(uncond, cond)]
    return torch.cat([uncond, cond])


def guided(eps_fn: EpsFn, cond=None, uncond=None, scale: float = 1.0,
           on_step: StepHook = None) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """eps(x, t) for an integer t: the network call(s) with classifier-free guidance and the on_step hook."""
    def call(x: torch.Tensor, t: torch.Tensor, c) -> torch.Tensor:
        if on_step is not None:
            on_step(x, t, c)
        return eps_fn(x, t, c)

    def eps(x: torch.Tensor, t: int) -> torch.Tensor:
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        if uncond is None or scale == 1.0:
            return call(x, tt, cond)
        e_u, e_c = call(torch.cat([x, x]), torch.cat([tt, tt]), cat_cond(uncond, cond)).chunk(2)
        return e_u + scale * (e_c - e_u)
    return eps


def _abar(alphas_cumprod) -> np.ndarray:
    a = alphas_cumprod.detach().cpu().double().numpy() if isinstance(alphas_cumprod, torch.Tensor) else alphas_cumprod
    return np.asarray(a, dtype=np.float64)


def ddim_timesteps(steps: int, num_timesteps: int = 1000, discretize: str = "uniform") -> list[int]:
    """The timesteps DDIM and PLMS call the network at, in calling order (decreasing)."""
    return [int(t) for t in make_ddim_timesteps(discretize, steps, num_timesteps)[::-1]]


def dpm_solver_grid(steps: int, num_timesteps: int = 1000) -> list[int]:
    """DPM-Solver's time-uniform grid (t from 1 to 1/N, model time (t - 1/N) N) rounded to integers:
    round(linspace(N - 1, 0, steps + 1)), decreasing. The network is called at all but the last point."""
    if not 1 <= steps < num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps - 1}], got {steps}")
    grid = [int(math.floor(v + 0.5)) for v in np.linspace(num_timesteps - 1, 0, steps + 1)]
    if len(set(grid)) != len(grid):
        raise ValueError(f"{steps} DPM-Solver steps repeat an integer timestep of a {num_timesteps}-step schedule")
    return grid


def dpm_solver_timesteps(steps: int, num_timesteps: int = 1000) -> list[int]:
    return dpm_solver_grid(steps, num_timesteps)[:-1]


@torch.no_grad()
def ddim_sample(eps_fn: EpsFn, x_T: torch.Tensor, alphas_cumprod, steps: int, eta: float = 0.0, cond=None,
                uncond=None, scale: float = 1.0, discretize: str = "uniform", on_step: StepHook = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) with CompVis's timesteps and alphas_prev (alphas_prev[0] = abar_0):
    x0 = (x - sqrt(1 - a) eps) / sqrt(a); x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z."""
    abar = _abar(alphas_cumprod)
    seq = make_ddim_timesteps(discretize, steps, len(abar))
    sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(abar, seq, eta)
    eps = guided(eps_fn, cond, uncond, scale, on_step)
    x = x_T
    for i in reversed(range(len(seq))):
        e = eps(x, int(seq[i]))
        x = _ddim_update(x, e, alphas[i], alphas_prev[i], sigmas[i], generator)
    return x


def _ddim_update(x, e, a, a_prev, sigma, generator=None):
    x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
    x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma ** 2) * e
    if sigma > 0:
        x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x


@torch.no_grad()
def plms_sample(eps_fn: EpsFn, x_T: torch.Tensor, alphas_cumprod, steps: int, cond=None, uncond=None,
                scale: float = 1.0, discretize: str = "uniform", on_step: StepHook = None) -> torch.Tensor:
    """PLMS (Liu et al. 2022, pseudo linear multistep) as CompVis runs it: the first step is a pseudo improved
    Euler step (a second network call at the next timestep), then Adams-Bashforth of orders 2, 3, 4 on the
    eps history, each applied through the DDIM (eta = 0) update. steps + 1 network calls."""
    abar = _abar(alphas_cumprod)
    seq = make_ddim_timesteps(discretize, steps, len(abar))
    _, alphas, alphas_prev = make_ddim_sampling_parameters(abar, seq, 0.0)
    eps = guided(eps_fn, cond, uncond, scale, on_step)
    x, old = x_T, []
    for i in reversed(range(len(seq))):
        e = eps(x, int(seq[i]))
        if not old:
            x_next = _ddim_update(x, e, alphas[i], alphas_prev[i], 0.0)
            e_prime = (e + eps(x_next, int(seq[max(i - 1, 0)]))) / 2
        elif len(old) == 1:
            e_prime = (3 * e - old[-1]) / 2
        elif len(old) == 2:
            e_prime = (23 * e - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e_prime = (55 * e - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        x = _ddim_update(x, e_prime, alphas[i], alphas_prev[i], 0.0)
        old = (old + [e])[-3:]
    return x


@torch.no_grad()
def dpm_solver_sample(eps_fn: EpsFn, x_T: torch.Tensor, alphas_cumprod, steps: int, cond=None, uncond=None,
                      scale: float = 1.0, lower_order_final: bool = True, on_step: StepHook = None) -> torch.Tensor:
    """Multistep DPM-Solver-2 with data prediction (DPM-Solver++ form; Lu et al. 2022), CompVis's sampler
    settings (time-uniform grid, order 2, first step order 1, last step order 1 when steps < 15), on the
    integer grid of `dpm_solver_grid`. alpha_n = sqrt(abar_n), sigma_n = sqrt(1 - abar_n) and
    lambda_n = log(alpha_n / sigma_n) are taken at those integers, so every update is exact for the
    timesteps the network sees. NFE = steps.

    order 1: x_t = (s_t / s_s) x - a_t (e^-h - 1) m_s,   h = l_t - l_s,  m = x0 prediction
    order 2: the same with m_s + (m_s - m_p) / (2 r),     r = (l_s - l_p) / h
    """
    abar = _abar(alphas_cumprod)
    grid = dpm_solver_grid(steps, len(abar))
    alpha = [math.sqrt(abar[n]) for n in grid]
    sigma = [math.sqrt(1 - abar[n]) for n in grid]
    lam = [math.log(a / s) for a, s in zip(alpha, sigma)]
    eps = guided(eps_fn, cond, uncond, scale, on_step)

    def x0(x, k):  # data prediction at grid point k
        return (x - sigma[k] * eps(x, grid[k])) / alpha[k]

    x = x_T
    m = [x0(x, 0)]                                 # x0 predictions at the previous grid points
    for k in range(1, steps + 1):
        h = lam[k] - lam[k - 1]
        order = 1 if k == 1 or (lower_order_final and steps < 15 and k == steps) else 2
        d = m[-1] if order == 1 else m[-1] + (m[-1] - m[-2]) * h / (2 * (lam[k - 1] - lam[k - 2]))
        x = (sigma[k] / sigma[k - 1]) * x - alpha[k] * math.expm1(-h) * d
        if k < steps:
            m = (m + [x0(x, k)])[-2:]
    return x


@dataclass(frozen=True)
class Sampler:
    """A sampler with its settings fixed: `timesteps` (the network's t values, in calling order) and
    `sample(eps_fn, x_T, cond=None, uncond=None, scale=1.0, on_step=None, generator=None)`."""
    name: str
    steps: int
    alphas_cumprod: tuple[float, ...]
    eta: float = 0.0
    discretize: str = "uniform"

    def __post_init__(self):
        if self.name not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.name!r}; choose one of {SAMPLERS}")
        if self.eta < 0 or (self.eta > 0 and self.name != "ddim"):
            raise ValueError(f"eta must be >= 0 and is only used by DDIM (got {self.eta} for {self.name})")

    @property
    def calls(self) -> int:
        """Network calls per trajectory (PLMS makes one more than its steps: a second call in its first step)."""
        return len(self.timesteps) + (1 if self.name == "plms" else 0)

    @property
    def timesteps(self) -> list[int]:
        n = len(self.alphas_cumprod)
        if self.name == "dpm_solver":
            return dpm_solver_timesteps(self.steps, n)
        return ddim_timesteps(self.steps, n, self.discretize)

    def sample(self, eps_fn: EpsFn, x_T: torch.Tensor, cond=None, uncond=None, scale: float = 1.0,
               on_step: StepHook = None, generator: torch.Generator | None = None) -> torch.Tensor:
        abar = np.asarray(self.alphas_cumprod)
        common = dict(cond=cond, uncond=uncond, scale=scale, on_step=on_step)
        if self.name == "ddim":
            return ddim_sample(eps_fn, x_T, abar, self.steps, self.eta, discretize=self.discretize,
                               generator=generator, **common)
        if self.name == "plms":
            return plms_sample(eps_fn, x_T, abar, self.steps, discretize=self.discretize, **common)
        return dpm_solver_sample(eps_fn, x_T, abar, self.steps, **common)


def make_sampler(name: str, steps: int, alphas_cumprod, eta: float = 0.0, discretize: str = "uniform") -> Sampler:
    """A Sampler over the model's `alphas_cumprod` (e.g. LatentDiffusion.alphas_cumprod)."""
    return Sampler(name, steps, tuple(float(a) for a in _abar(alphas_cumprod)), eta, discretize)


# The DDIM repository's samplers (Q-Diffusion's --sample_type generalized / ddpm_noisy) ------------------------

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ModelStepHook = Optional[Callable[[torch.Tensor, torch.Tensor], None]]


def _model_steps(model: EpsModel, x_T: torch.Tensor, seq: Sequence[int], betas: torch.Tensor,
                 on_step: ModelStepHook, current: Callable[[], torch.Tensor]):
    """Per step of `seq` from its end: (t, t_next, eps = model(x, t), abar_t, abar_next) with x = current() (the
    caller's latest x; abar_{-1} = 1), after on_step(x, t)."""
    abar = torch.cumprod(1.0 - betas, dim=0)
    nxt = [-1] + list(seq[:-1])
    for t, t_next in zip(reversed(seq), reversed(nxt)):
        x = current()
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        if on_step is not None:
            on_step(x, tt)
        yield t, t_next, model(x, tt), _abar_at(abar, t, x), _abar_at(abar, t_next, x)


def _abar_at(abar: torch.Tensor, t: int, like: torch.Tensor) -> torch.Tensor:
    """abar_t with abar_{-1} = 1, as a scalar tensor on like's device/dtype."""
    value = 1.0 if t < 0 else float(abar[t])
    return torch.tensor(value, device=like.device, dtype=like.dtype)


@torch.no_grad()
def generalized_steps(model: EpsModel, x_T: torch.Tensor, seq: Sequence[int], betas: torch.Tensor, eta: float = 0.0,
                      generator: torch.Generator | None = None, on_step: ModelStepHook = None) -> torch.Tensor:
    """DDIM generalized steps (Song et al. 2021, eq. 12), visiting `seq` from its end to its start.

    x0 = (x_t - sqrt(1-a_t) eps) / sqrt(a_t); c1 = eta sqrt((1 - a_t/a_n)(1 - a_n)/(1 - a_t));
    x_n = sqrt(a_n) x0 + c1 z + sqrt(1 - a_n - c1^2) eps.
    """
    x = x_T
    for t, t_next, eps, a_t, a_n in _model_steps(model, x_T, seq, betas, on_step, lambda: x):
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        c1 = eta * ((1 - a_t / a_n) * (1 - a_n) / (1 - a_t)).sqrt()
        c2 = (1 - a_n - c1 ** 2).sqrt()
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if eta > 0 else 0.0
        x = a_n.sqrt() * x0 + c1 * noise + c2 * eps
    return x


@torch.no_grad()
def ddpm_steps(model: EpsModel, x_T: torch.Tensor, seq: Sequence[int], betas: torch.Tensor,
                      generator: torch.Generator | None = None, on_step: ModelStepHook = None) -> torch.Tensor:
    """Ancestral sampling (DDPM eq. 11) over `seq`, with the posterior variance of the skipped chain."""
    x = x_T
    for t, t_next, eps, a_t, a_n in _model_steps(model, x_T, seq, betas, on_step, lambda: x):
        beta_t = 1 - a_t / a_n                                   # effective beta of the skip t -> t_next
        x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
        mean = (a_n.sqrt() * beta_t * x0 + (1 - beta_t).sqrt() * (1 - a_n) * x) / (1 - a_t)
        if t_next < 0:
            x = mean
        else:
            var = beta_t * (1 - a_n) / (1 - a_t)
            x = mean + var.sqrt() * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x
