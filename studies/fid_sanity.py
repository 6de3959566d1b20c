"""FID/sFID sanity on real data: real half vs other half (small), real vs Gaussian noise (large).

    python studies/fid_sanity.py --out results/fid_sanity.json

Extracts Inception features of all 5,000 real MNIST digits once, caches them as the `mnist` reference
statistics (the same file `evaluate(ref="mnist")` uses), and the 1,000-digit `mnist-1k` subset's too.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from common.files import write_json  # noqa: E402
from ddim.data import mnist_uint8  # noqa: E402
from evaluation.fid import (DEFAULT_CACHE_DIR, Features, InceptionExtractor, feature_stats,  # noqa: E402
                           fid_sfid, save_stats, stats_cache_path)


def distances(a: Features, b: Features) -> dict:
    return fid_sfid(feature_stats(a), feature_stats(b))


def subset(f: Features, idx) -> Features:
    return Features(pool=f.pool[idx], spatial=f.spatial[idx])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/fid_sanity.json")
    p.add_argument("--n_noise", type=int, default=1000)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    extractor = InceptionExtractor(args.device)
    real_images = mnist_uint8()
    real = extractor(real_images)
    save_stats(stats_cache_path("mnist", DEFAULT_CACHE_DIR), feature_stats(real), len(real_images))
    save_stats(stats_cache_path("mnist-1k", DEFAULT_CACHE_DIR), feature_stats(subset(real, slice(0, 1000))), 1000)

    rng = np.random.default_rng(args.seed)
    noise_images = (rng.standard_normal((args.n_noise, 28, 28, 1)) * 127.5 + 127.5).clip(0, 255).astype(np.uint8)
    noise = extractor(noise_images)
    perm = rng.permutation(len(real_images))
    half = len(perm) // 2
    report = {
        "real_half_vs_half (2500 vs 2500)": distances(subset(real, perm[:half]), subset(real, perm[half:])),
        "real_1000_vs_all_5000": distances(subset(real, perm[:1000]), real),
        f"gaussian_noise_{args.n_noise}_vs_all_5000": distances(noise, real),
    }
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, report)


if __name__ == "__main__":
    from common.errors import entry_point
    entry_point(main)
