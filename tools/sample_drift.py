"""How calibrated models' samples differ from FP's, image by image (same noise): SQNR, and the intensity
statistics FID is sensitive to on MNIST (mean pixel, share of near-black background pixels).

    python tools/sample_drift.py runs/mnist/qdiff_w8a8/quantized.pt runs/mnist/baseline_w8a8/quantized.pt \\
        --n 48 --out results/mnist_sample_drift.json

Each checkpoint is measured as saved and with its activation quantizers off (weights only); the sampling
schedule is the one stored in the checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ddim import load_config, make_betas  # noqa: E402
from ddim.checkpoint import load_unet  # noqa: E402
from ddim.sampling import initial_noise, make_sampler  # noqa: E402
from quant.checkpoint import load_quantized  # noqa: E402
from quant.model import quant_enabled  # noqa: E402

BLACK = 20      # pixel values (0-255) below this count as background


def pixel_stats(x: torch.Tensor) -> dict:
    """x in [-1, 1] -> mean pixel (0-255) and the share of pixels below BLACK."""
    u = (x.clamp(-1, 1) + 1) * 127.5
    return {"mean_px": u.mean().item(), "black_share": (u < BLACK).float().mean().item()}


def drift(ref: torch.Tensor, out: torch.Tensor) -> dict:
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean()).item()
    return {"sample_sqnr_db": sqnr} | pixel_stats(out)


@torch.no_grad()
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="quantized.pt files of runs")
    p.add_argument("--config", default="configs/mnist.yml")
    p.add_argument("--ckpt", default=None, help="FP weights (default: the config's)")
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    fp = load_unet(cfg, args.ckpt)
    x_T = initial_noise(args.n, (cfg.channels, cfg.image_size, cfg.image_size), args.seed)
    report, refs = {"n": args.n, "seed": args.seed, "runs": {}}, {}
    for path in args.checkpoints:
        qmodel, payload = load_quantized(path, fp)
        key = (payload["meta"]["timesteps"], payload["meta"]["skip_type"])
        sample = make_sampler(make_betas(cfg.diffusion), *key, eta=0.0)
        if key not in refs:
            refs[key] = sample(fp, x_T)
            report[f"fp {key[0]} {key[1]}"] = pixel_stats(refs[key])
        row = {"method": payload["method"], "as saved": drift(refs[key], sample(qmodel, x_T))}
        with quant_enabled(qmodel, weight=True, act=False):
            row["weights only"] = drift(refs[key], sample(qmodel, x_T))
        report["runs"][str(path)] = row
        print(path, json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
