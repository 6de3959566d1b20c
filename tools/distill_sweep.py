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

from quant.distill import DistillConfig  # noqa: E402
from quant.methods.dilatequant import DilateQuantConfig, quantize_dilatequant  # noqa: E402
from quant.settings import QuantConfig  # noqa: E402
from tools.quant_report import add_setup_args, setup, sqnr_db  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_args(p, cali_n=512)
    p.add_argument("--bits", default="4/4")
    p.add_argument("--cali_iters", type=int, default=200)
    p.add_argument("--lrs", nargs="+", default=["1e-5,1e-4", "1e-4,1e-4", "1e-3,1e-4", "1e-2,1e-4", "1e-5,1e-3"])
    args = p.parse_args(argv)
    fp, sample, calib, held = setup(args)
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
