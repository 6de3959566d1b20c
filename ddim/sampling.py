"""Generate images from any eps-callable with a fixed seed, and write them to a log dir."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ddim.data import to_uint8
from ddim.samplers import ddim_sample, ddpm_sample
from ddim.schedule import timestep_sequence

SAMPLE_TYPES = ("generalized", "ddpm_noisy")


def initial_noise(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """x_T [n, *shape] drawn on the CPU from `seed`, so runs on any device (and FP vs quantized runs)
    start from the same noise, image by image."""
    return torch.randn((n,) + tuple(shape), generator=torch.Generator().manual_seed(seed))


def make_sampler(betas: torch.Tensor, steps: int, skip_type: str, eta: float, sample_type: str = "generalized"):
    """sample(model, x_T, on_step=None, generator=None) for the DDIM (`generalized`) or DDPM sampler."""
    if sample_type not in SAMPLE_TYPES:
        raise ValueError(f"unknown sample_type {sample_type!r}; choose one of {SAMPLE_TYPES}")
    seq = timestep_sequence(len(betas), steps, skip_type)

    def sample(model: Callable, x_T: torch.Tensor, on_step=None, generator=None) -> torch.Tensor:
        if sample_type == "generalized":
            return ddim_sample(model, x_T, seq, betas, eta=eta, generator=generator, on_step=on_step)
        return ddpm_sample(model, x_T, seq, betas, generator=generator, on_step=on_step)

    sample.seq, sample.betas = seq, betas
    return sample


@torch.no_grad()
def generate(model: Callable, sample, n: int, shape: tuple[int, ...], batch_size: int, seed: int,
             device: torch.device, cache: Path | None = None) -> tuple[np.ndarray, float]:
    """n images as uint8 NHWC and the seconds spent sampling them. Batch b uses noise images
    [b*bs, (b+1)*bs) of `seed` and its own sampler-noise generator (eta > 0), so it depends on nothing
    but b. With `cache`, each finished batch is kept there (images and seconds) and reused, so an
    interrupted run resumes at the first missing batch; the caller clears `cache` when the model or the
    settings change."""
    noise = initial_noise(n, shape, seed)
    out, seconds = [], 0.0
    for b, i in enumerate(tqdm(range(0, n, batch_size), desc="sample", dynamic_ncols=True)):
        path = cache / f"batch_{b:04d}.npz" if cache is not None else None
        if path is not None and path.exists():
            done = np.load(path)
            out.append(done["images"])
            seconds += float(done["seconds"])
            continue
        gen = torch.Generator(device=device).manual_seed(seed + 1 + b)
        start = time.perf_counter()
        images = to_uint8(sample(model, noise[i:i + batch_size].to(device), generator=gen))
        elapsed = time.perf_counter() - start
        out.append(images)
        seconds += elapsed
        if path is not None:
            cache.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.stem + ".tmp.npz")
            np.savez(tmp, images=images, seconds=elapsed)
            tmp.replace(path)
    return np.concatenate(out), seconds


def save_samples(logdir: Path, images: np.ndarray, max_pngs: int | None = None) -> None:
    """<logdir>/samples.npz (uint8 NHWC, key arr_0), images/<i>.png and grid.png."""
    logdir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(logdir / "samples.npz", arr_0=images)
    img_dir = logdir / "images"
    img_dir.mkdir(exist_ok=True)
    for i, im in enumerate(images[:max_pngs]):
        Image.fromarray(im.squeeze(-1) if im.shape[-1] == 1 else im).save(img_dir / f"{i:05d}.png")
    make_grid(images[:100]).save(logdir / "grid.png")


def make_grid(images: np.ndarray, pad: int = 2) -> Image.Image:
    """A square-ish grid of uint8 NHWC images."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = im
    return Image.fromarray(grid.squeeze(-1) if c == 1 else grid)
