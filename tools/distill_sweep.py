"""Choose distillation learning rates: held-out eps SQNR of DilateQuant for a grid of (lr_weight, lr_quant).

    python tools/distill_sweep.py --bits 4/4 --lrs 1e-5,1e-4 1e-4,1e-4 1e-2,1e-4 --out results/distill_sweep.json

Rows: the PTQ start (WD + TPQ, no distillation) and each learning-rate pair after distillation
(--cali_iters per block). SQNR as in tools/quant_report.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddim import load_config, make_betas  # noqa: E402
from ddim.checkpoint import load_unet  # noqa: E402
from ddim.sampling import make_sampler  # noqa: E402
from quant.distill import DistillConfig  # noqa: E402
from quant.methods.dilatequant import DilateQuantConfig, quantize_dilatequant  # noqa: E402
from quant.settings import QuantConfig  # noqa: E402
from tools.common import set_seed  # noqa: E402
from tools.quant_report import draw, sqnr_db  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/mnist.yml")
    p.add_argument("--ckpt", default=None)
    p.add_argument("--timesteps", type=int, default=100)
    p.add_argument("--bits", default="4/4")
    p.add_argument("--cali_n", type=int, default=512)
    p.add_argument("--cali_iters", type=int, default=200)
    p.add_argument("--lrs", nargs="+", default=["1e-5,1e-4", "1e-4,1e-4", "1e-3,1e-4", "1e-2,1e-4", "1e-5,1e-3"])
    p.add_argument("--out", default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    set_seed(args.seed)
    cfg = load_config(args.config)
    fp = load_unet(cfg, args.ckpt)
    sample = make_sampler(make_betas(cfg.diffusion), args.timesteps, "quad", 0.0)
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    calib = draw(fp, sample, max(16, 2 * args.cali_n // args.timesteps), args.cali_n, 100 + args.seed, shape)
    held = draw(fp, sample, max(8, 1024 // args.timesteps), 512, 200 + args.seed, shape)
    w, a = (int(v) for v in args.bits.split("/"))
    rows = []
    for lrs in ["none"] + args.lrs:
        lr_w, lr_q = (0.0, 0.0) if lrs == "none" else (float(v) for v in lrs.split(","))
        dq = DilateQuantConfig(distillation=lrs != "none", distill=DistillConfig(
            iters=args.cali_iters, lr_weight=lr_w, lr_quant=lr_q, seed=args.seed))
        start = time.perf_counter()
        q = quantize_dilatequant(fp, QuantConfig(weight_bit=w, act_bit=a), sample.seq, calib, dq,
                                 Path(tempfile.mkdtemp(prefix="sweep-")))
        rows.append({"lr_weight": lr_w, "lr_quant": lr_q, "sqnr_db": sqnr_db(fp, q, held),
                     "seconds": time.perf_counter() - start})
        print(rows[-1], flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
