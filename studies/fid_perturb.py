"""How FID on the embedded model reacts to small pixel changes: FID/sFID of sample sets against real images
after (a) i.i.d. Gaussian pixel noise of a few grey levels, (b) setting faint pixels (values 1..k) to black.

    python studies/fid_perturb.py runs/mnist/fp/samples.npz --noise 0.5 1 2 \\
        --floor 8 --floor_runs runs/mnist/dilatequant_w6a6/samples.npz runs/mnist/dilatequant_w4a4/samples.npz \\
        --out results/mnist_fid_perturb.json

(a) tells how large an FID gap a given pixel error can make: read a quantized run's FID gap to FP beside it.
(b) removes the faint grey background of the FP model's samples (real digits have almost none): comparing
the FID gap between runs before and after it tells whether the gap sits in that background or in the
strokes. Both are diagnostics of the metric, not methods: no reported result applies them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from common.files import write_json  # noqa: E402
from evaluation.fid import (DEFAULT_CACHE_DIR, InceptionExtractor, feature_stats, fid_sfid,  # noqa: E402
                           load_images_npz, reference_stats)
from studies.sample_drift import pixel_stats  # noqa: E402


def add_pixel_noise(images: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """uint8 images plus i.i.d. N(0, sigma^2) grey levels per pixel, rounded and clipped to 0..255."""
    if sigma < 0:
        raise ValueError(f"noise sigma {sigma} < 0: give a standard deviation in grey levels")
    noise = np.random.default_rng(seed).normal(0.0, sigma, images.shape)
    return np.clip(np.rint(images.astype(np.float64) + noise), 0, 255).astype(np.uint8)


def floor_faint(images: np.ndarray, k: int) -> np.ndarray:
    """uint8 images with every pixel of value 1..k set to 0."""
    if not 0 <= k <= 255:
        raise ValueError(f"floor {k} outside 0..255: give the largest grey level to set to black")
    return np.where(images <= k, 0, images).astype(np.uint8)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", help="npz of samples to perturb with noise (and to floor)")
    p.add_argument("--noise", type=float, nargs="*", default=[0.5, 1.0, 2.0], help="sigmas in grey levels")
    p.add_argument("--floor", type=int, nargs="*", default=[8], help="largest grey level set to black")
    p.add_argument("--floor_runs", nargs="*", default=[], help="more npz files to floor (and score as they are)")
    p.add_argument("--ref", default="mnist")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    sets = {path: load_images_npz(path) for path in [args.base, *args.floor_runs]}   # fail before Inception

    extractor = InceptionExtractor(args.device)
    real = reference_stats(args.ref, extractor, cache_dir=DEFAULT_CACHE_DIR)

    def score(images: np.ndarray) -> dict:
        return fid_sfid(feature_stats(extractor(images)), real) | pixel_stats(images)

    report = {"ref": args.ref, "seed": args.seed, "runs": {}}
    for path, images in sets.items():
        rows = {"as is": score(images)}
        if path == args.base:
            for sigma in args.noise:
                rows[f"noise sigma {sigma:g}"] = score(add_pixel_noise(images, sigma, args.seed))
        for k in args.floor:
            rows[f"floor 1..{k} to 0"] = score(floor_faint(images, k))
        report["runs"][path] = rows
        for name, row in rows.items():
            print(f"{path}  {name:>18}: FID {row['fid']:7.2f}  sFID {row['sfid']:7.2f}  mean px {row['mean_px']:.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    from common.errors import entry_point
    entry_point(main)
