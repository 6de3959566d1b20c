"""Which timesteps' quantization error costs FID: sample with the quantized model inside one band of
timesteps and the FP model everywhere else, then FID/sFID against the real digits and PSNR to FP.

    .venv/bin/python studies/band_fid.py runs/mnist/dilatequant_w4a4_split/quantized.pt \\
        --bands 0:50 50:200 --fp_npz runs/mnist/fp/samples.npz --out results/mnist_band_fid_w4a4.json

A band lo:hi holds the sampler calls whose timestep t satisfies lo <= t < hi. Same noise, seed and sampler
as the checkpoint's run (`--seed`, timesteps and skip type from the checkpoint), so with --fp_npz (the FP
run's samples.npz) each image is compared with the FP image from the same noise. Every band's result is
written to --out as soon as it is done and a rerun skips the bands already there.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from common.files import write_json  # noqa: E402
from ddim import load_config, make_betas  # noqa: E402
from ddim.checkpoint import load_unet  # noqa: E402
from ddim.sampling import generate, make_sampler  # noqa: E402
from quant.checkpoint import load_quantized  # noqa: E402
from evaluation.fidelity import paired_psnr_db  # noqa: E402
from evaluation.fid import evaluate, load_images_npz  # noqa: E402


class BandModel(nn.Module):
    """The quantized model for samples whose timestep lies in [lo, hi), the FP model for the others."""

    def __init__(self, fp: nn.Module, quantized: nn.Module, lo: int, hi: int):
        super().__init__()
        self.fp, self.quantized, self.lo, self.hi = fp, quantized, lo, hi

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        inside = (t >= self.lo) & (t < self.hi)
        if bool(inside.all()):
            return self.quantized(x, t)
        out = self.fp(x, t)
        if bool(inside.any()):
            out[inside] = self.quantized(x[inside], t[inside])
        return out


def parse_band(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in text.split(":"))
    except ValueError:
        raise SystemExit(f"band {text!r}: give lo:hi in timesteps, e.g. 0:50") from None
    if not 0 <= lo < hi:
        raise SystemExit(f"band {text!r}: need 0 <= lo < hi")
    return lo, hi


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="quantized.pt of a run")
    p.add_argument("--bands", nargs="+", required=True, help="timestep bands lo:hi (quantized inside)")
    p.add_argument("--config", default="configs/mnist.yml")
    p.add_argument("--ckpt", default=None, help="FP weights (default: the config's)")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=250)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--ref", default="mnist", help="FID reference (default: the 5,000 real MNIST digits)")
    p.add_argument("--fp_npz", default=None, help="the FP run's samples.npz (same seed) for PSNR to FP")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    bands = [parse_band(b) for b in args.bands]
    cfg = load_config(args.config)
    fp = load_unet(cfg, args.ckpt)
    try:
        qmodel, payload = load_quantized(args.checkpoint, fp)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    qmodel.eval()
    meta = payload["meta"]
    sample = make_sampler(make_betas(cfg.diffusion), meta["timesteps"], meta["skip_type"], eta=0.0)
    fp_images = load_images_npz(args.fp_npz)[:args.n] if args.fp_npz else None
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {}
    report |= {"checkpoint": args.checkpoint, "n": args.n, "seed": args.seed, "ref": args.ref,
               "timesteps": meta["timesteps"], "skip_type": meta["skip_type"]}
    report.setdefault("bands", {})
    seq = torch.as_tensor(sample.seq)
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    for lo, hi in bands:
        name = f"{lo}:{hi}"
        if name in report["bands"]:
            print(f"[done] band {name}: {report['bands'][name]}")
            continue
        images, _ = generate(BandModel(fp, qmodel, lo, hi), sample, args.n, shape, args.batch_size, args.seed,
                             torch.device("cpu"))
        row = {"quantized_calls": int(((seq >= lo) & (seq < hi)).sum())}
        row |= {k: v for k, v in evaluate(images, ref=args.ref).items() if k in ("fid", "sfid")}
        if fp_images is not None:
            row["psnr_to_fp_median_db"] = float(np.median(paired_psnr_db(fp_images, images)))
        report["bands"][name] = row
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, report)
        print(f"band {name}: {row}", flush=True)
    return report


if __name__ == "__main__":
    from common.errors import entry_point
    entry_point(main)
