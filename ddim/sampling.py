"""The DDIM family's samplers over its schedules (--sample_type, --sampler) and its images from fixed noise
(the batch machinery and the files are diffusion.sampling's)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from ddim.schedule import timestep_sequence
from diffusion.samplers import ddpm_steps as ddpm_sample, generalized_steps as ddim_sample, unconditional
from diffusion.samplers import make_sampler as make_shared_sampler
from diffusion.sampling import initial_noise, join_batches, run_batches

SAMPLE_TYPES = ("generalized", "ddpm_noisy")            # --sample_type: the DDIM repository's samplers
SAMPLERS = {"ddim": None, "plms": "plms", "dpm": "dpm_solver"}   # --sampler: ddim = --sample_type's; CompVis's others


def make_sampler(betas: torch.Tensor, steps: int, skip_type: str, eta: float, sample_type: str = "generalized",
                 sampler: str = "ddim"):
    """sample(model, x_T, on_step=None, generator=None) for a DDIM UNet `model(x, t)`: the DDIM repository's DDIM
    (`generalized`) or DDPM sampler over the `skip_type` sequence, or (sampler "plms" / "dpm") CompVis's PLMS over
    the `skip_type` discretization of its own (the +1 shift) or DPM-Solver-2 over its time-uniform grid
    (diffusion.samplers). `sample.seq`: the increasing timesteps the network sees; `sample.calls`: network calls
    per trajectory (PLMS makes one more than its steps)."""
    if sample_type not in SAMPLE_TYPES:
        raise ValueError(f"unknown sample_type {sample_type!r}; choose one of {SAMPLE_TYPES}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {tuple(SAMPLERS)}")
    if SAMPLERS[sampler] is not None:
        return _compvis_sampler(betas, steps, skip_type, SAMPLERS[sampler])
    seq = timestep_sequence(len(betas), steps, skip_type)

    def sample(model: Callable, x_T: torch.Tensor, on_step=None, generator=None) -> torch.Tensor:
        if sample_type == "generalized":
            return ddim_sample(model, x_T, seq, betas, eta=eta, generator=generator, on_step=on_step)
        return ddpm_sample(model, x_T, seq, betas, generator=generator, on_step=on_step)

    sample.seq, sample.betas, sample.calls = seq, betas, len(seq)
    return sample


def _compvis_sampler(betas: torch.Tensor, steps: int, skip_type: str, name: str):
    shared = make_shared_sampler(name, steps, torch.cumprod(1.0 - betas, dim=0), discretize=skip_type)

    def sample(model: Callable, x_T: torch.Tensor, on_step=None, generator=None) -> torch.Tensor:
        hook = None if on_step is None else (lambda x, t, cond: on_step(x, t))
        return shared.sample(unconditional(model), x_T, on_step=hook, generator=generator)

    sample.seq, sample.betas, sample.calls = sorted(shared.timesteps), betas, shared.calls
    return sample


def sample_batches(model: Callable, sample, n: int, shape: tuple[int, ...], batch_size: int, seed: int,
                   device: torch.device, batches: Iterable[int] | None = None, cache: Path | None = None,
                   progress: bool = True) -> dict[int, tuple[np.ndarray, float]]:
    """run_batches for a DDIM sampler: batch b starts from noise images [b*bs, (b+1)*bs) of `seed`."""
    noise = initial_noise(n, shape, seed)

    def draw(b: int, gen: torch.Generator, tick: Callable) -> torch.Tensor:
        return sample(model, noise[b * batch_size:(b + 1) * batch_size].to(device), generator=gen, on_step=tick)
    return run_batches(draw, n, batch_size, seed, device, sample.calls, batches, cache, progress)


def generate(model: Callable, sample, n: int, shape: tuple[int, ...], batch_size: int, seed: int,
             device: torch.device, cache: Path | None = None) -> tuple[np.ndarray, float]:
    """n images as uint8 NHWC and the seconds spent sampling them (every batch of sample_batches)."""
    return join_batches(sample_batches(model, sample, n, shape, batch_size, seed, device, cache=cache))


