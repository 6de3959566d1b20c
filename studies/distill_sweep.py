"""Compare distillation settings of DilateQuant on held-out data: calibration-set rule, learning-rate schedule,
iterations and learning rates.

    python studies/distill_sweep.py --bits 4/4 \\
        --variants per_traj=49,schedule=constant per_traj=49,schedule=cosine \\
                   per_traj=1,schedule=constant per_traj=1,schedule=cosine \\
        --out results/distill_sweep_calib_w4a4.json

A variant is comma-separated key=value pairs over per_traj (calibration samples per FP trajectory),
schedule (cosine | constant), iters (per unit), lr_w and lr_q; unset keys take the command-line defaults.
For each variant (WD + TPQ + BKD, --cali_n samples) it reports:
- per distillation unit, the MSE against the FP unit output on the calibration set and on held-out samples
  from other trajectories, both through the final distilled chain: held / calibration > 1 is overfitting;
- eps SQNR on the held-out samples, overall and per timestep band (small t dominates the overall number);
- paired PSNR to FP of final samples (--sample_n images, same noise, median) and their mean pixel: what
  reaches the images.
Rows run in the order given; the PTQ start (no distillation) comes first.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.files import write_json  # noqa: E402
from diffusion.sampling import to_uint8  # noqa: E402
from diffusion.sampling import initial_noise  # noqa: E402
from quant.distill import DistillConfig, LRSchedule  # noqa: E402
from quant.methods.dilatequant import DilateQuantConfig, quantize_dilatequant  # noqa: E402
from quant.settings import QuantConfig  # noqa: E402
from tools.common import parse_bits  # noqa: E402
from evaluation.fidelity import paired_psnr_db  # noqa: E402
from tools.quant_report import add_setup_args, draw, load_setup, sqnr_by_t, sqnr_db  # noqa: E402


@dataclass(frozen=True)
class Variant:
    per_traj: int
    schedule: LRSchedule
    iters: int
    lr_w: float
    lr_q: float

    @classmethod
    def parse(cls, text: str, defaults: "Variant") -> "Variant":
        fields = vars(defaults).copy()
        for item in filter(None, text.split(",")):
            key, _, value = item.partition("=")
            if key not in fields:
                raise SystemExit(f"unknown variant key {key!r} in {text!r}; use {sorted(fields)}")
            fields[key] = LRSchedule(value) if key == "schedule" else type(fields[key])(value)
        return cls(**fields)

    def label(self) -> str:
        return f"per_traj={self.per_traj},schedule={self.schedule.value},iters={self.iters},lr_w={self.lr_w:g},lr_q={self.lr_q:g}"


@torch.no_grad()
def unit_mse(q, fp, data, batch_size: int = 64) -> dict[str, float]:
    """MSE of every unit against the FP unit's output, its input from the quantized chain (eq. 17), all units
    in one quantized and one FP forward per batch."""
    units = q.adapter.units(q.model)
    err, count = dict.fromkeys(units, 0.0), dict.fromkeys(units, 0)
    for x, t, _ in data.batches(batch_size):
        ins, outs = {}, {}
        hooks = [q.model.get_submodule(u).register_forward_pre_hook(lambda m, a, u=u: ins.__setitem__(u, a))
                 for u in units]
        hooks += [fp.get_submodule(u).register_forward_hook(lambda m, a, o, u=u: outs.__setitem__(u, o)) for u in units]
        try:
            q(x, t)
            fp(x, t)
        finally:
            for h in hooks:
                h.remove()
        with q.slots.active(q.slots.lookup(t)):
            for u in units:
                diff = q.model.get_submodule(u)(*ins[u]) - outs[u]
                err[u] += float(diff.pow(2).sum())
                count[u] += diff.numel()
    return {u: err[u] / count[u] for u in units}


def unit_gaps(q, fp, calib, held) -> list[dict]:
    """Per unit: MSE to the FP unit output on calibration and held-out data, through the final quantized chain."""
    cal, out = unit_mse(q, fp, calib), unit_mse(q, fp, held)
    return [{"unit": u, "calib_mse": cal[u], "held_mse": out[u], "held_over_calib": out[u] / cal[u]} for u in cal]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_args(p, cali_n=1024)
    p.add_argument("--bits", default="4/4")
    p.add_argument("--cali_iters", type=int, default=200)
    p.add_argument("--lr_weight", type=float, default=DistillConfig.lr_weight)
    p.add_argument("--lr_quant", type=float, default=DistillConfig.lr_quant)
    p.add_argument("--variants", nargs="+", default=["schedule=constant", "schedule=cosine"])
    p.add_argument("--sample_n", type=int, default=64, help="images sampled per variant for PSNR to FP")
    args = p.parse_args(argv)
    fp, sample, held, shape = load_setup(args)
    defaults = Variant(args.cali_per_traj, LRSchedule.COSINE, args.cali_iters, args.lr_weight, args.lr_quant)
    variants = [Variant.parse(v, defaults) for v in args.variants]
    x_T = initial_noise(args.sample_n, shape, 300 + args.seed)
    with torch.no_grad():
        fp_images = to_uint8(sample(fp, x_T))
    w, a = parse_bits(args.bits)
    calib_sets, rows = {}, []
    for v in [None] + variants:
        per_traj = args.cali_per_traj if v is None else v.per_traj
        if per_traj not in calib_sets:
            calib_sets[per_traj] = draw(fp, sample, args.cali_n, 100 + args.seed, shape, per_traj)
        calib = calib_sets[per_traj]
        dq = DilateQuantConfig(distillation=v is not None, distill=DistillConfig() if v is None else DistillConfig(
            iters=v.iters, lr_weight=v.lr_w, lr_quant=v.lr_q, lr_schedule=v.schedule, seed=args.seed))
        start = time.perf_counter()
        q = quantize_dilatequant(fp, QuantConfig(weight_bit=w, act_bit=a), sample.seq, calib, dq,
                                 Path(tempfile.mkdtemp(prefix="sweep-")), seed=args.seed)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            images = to_uint8(sample(q, x_T))
        units = unit_gaps(q, fp, calib, held)
        row = {"variant": "PTQ start (no distillation)" if v is None else v.label(), "seconds": seconds,
               "sqnr_db": sqnr_db(fp, q, held), "sqnr_db_by_t": sqnr_by_t(fp, q, held),
               "psnr_to_fp_db": float(np.median(paired_psnr_db(fp_images, images))),
               "mean_pixel": float(images.mean()), "fp_mean_pixel": float(fp_images.mean()),
               "held_over_calib_median": float(np.median([u["held_over_calib"] for u in units])),
               "held_over_calib_max": max(u["held_over_calib"] for u in units), "units": units}
        rows.append(row)
        print({k: v for k, v in row.items() if k != "units"}, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, {"command": " ".join(sys.argv), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    from common.errors import entry_point
    entry_point(main)
