"""Images from any model family, batch by batch from fixed noise, and the files a run writes (samples.npz,
images/, grid.png)."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from common.errors import NonFiniteError
from common.files import atomic_write, replace_dir


def initial_noise(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """x_T [n, *shape] drawn on the CPU from `seed`, so runs on any device (and FP vs quantized runs)
    start from the same noise, image by image."""
    return torch.randn((n,) + tuple(shape), generator=torch.Generator().manual_seed(seed))


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC, clipping out-of-range samples."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def run_batches(draw: Callable, n: int, batch_size: int, seed: int, device: torch.device, steps: int,
                batches: Iterable[int] | None = None, cache: Path | None = None, progress: bool = True,
                desc: str = "sample") -> dict[int, tuple[np.ndarray, float]]:
    """{b: (uint8 NHWC images, seconds)} for batches b (default: all) of an n-image run, any model family.

    draw(b, generator, tick) returns batch b's images in [-1, 1] (NCHW); its generator is seeded seed + 1 + b
    (sampler noise for eta > 0) and tick() is called once per sampling step. If batch b depends on nothing but
    b (and the seed and batch size), any subset of batches, in any process, gives the images of the same
    batches of one full run. With `cache`, each finished batch is kept there and reused (if it holds the
    images this run's batch holds), so an interrupted run resumes at the first missing batch; the caller
    clears `cache` when the model or the settings change.
    NaN/inf images stop the run before anything is saved or scored.
    """
    todo = list(range(-(-n // batch_size)) if batches is None else batches)
    out = {}
    bar = tqdm(total=len(todo) * steps, desc=f"{desc} ({n} images, {steps} steps)", unit="step",
               dynamic_ncols=True, disable=not progress)
    for b in todo:
        path = cache / f"batch_{b:04d}.npz" if cache is not None else None
        if path is not None and path.exists():
            with np.load(path) as done:
                images, seconds = done["images"], float(done["seconds"])
            if len(images) == min(batch_size, n - b * batch_size):   # the last batch of a run with another n
                out[b] = (images, seconds)                          # holds another count: drawn anew
                bar.update(steps)
                continue
        gen = torch.Generator(device=device).manual_seed(seed + 1 + b)
        start = time.perf_counter()
        x0 = draw(b, gen, lambda *_: bar.update(1))
        if not bool(torch.isfinite(x0).all()):                 # NaN would become black pixels, inf white
            raise NonFiniteError(f"sampling batch {b} produced NaN/inf values: the model or its quantizer ranges are "
                                 f"broken, or the sampler settings are", "check the checkpoint and --eta (0..1); "
                                 "nothing of this run was scored")
        images = to_uint8(x0)
        out[b] = (images, time.perf_counter() - start)
        if path is not None:
            atomic_write(path, lambda tmp: _savez(tmp, images=images, seconds=out[b][1]))
    bar.close()
    return out


def _savez(path: Path, compressed: bool = False, **arrays) -> None:
    with open(path, "wb") as f:                    # a file object: numpy would append .npz to a bare name
        (np.savez_compressed if compressed else np.savez)(f, **arrays)


def join_batches(done: dict[int, tuple[np.ndarray, float]]) -> tuple[np.ndarray, float]:
    """All batches in order -> (images, total sampling seconds)."""
    order = sorted(done)
    if order != list(range(len(order))):
        raise RuntimeError(f"sampling batches missing: have {order[:5]}...")
    return np.concatenate([done[b][0] for b in order]), sum(done[b][1] for b in order)


SAMPLE_FILES = ("samples.npz", "images", "grid.png")      # what save_samples writes


def save_samples(logdir: Path, images: np.ndarray, max_pngs: int | None = None) -> None:
    """<logdir>/samples.npz (uint8 NHWC, key arr_0), images/<i>.png (this run's only) and grid.png."""
    logdir.mkdir(parents=True, exist_ok=True)
    atomic_write(logdir / "samples.npz", lambda tmp: _savez(tmp, compressed=True, arr_0=images))

    def pngs(folder: Path) -> None:
        for i, im in enumerate(images[:max_pngs]):
            Image.fromarray(im.squeeze(-1) if im.shape[-1] == 1 else im).save(folder / f"{i:05d}.png")
    replace_dir(logdir / "images", pngs)
    atomic_write(logdir / "grid.png", lambda tmp: make_grid(images[:100]).save(tmp, format="PNG"))


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
