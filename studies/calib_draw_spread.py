"""How much a method's result depends on the calibration draw: calibrate the same model on several draws
of calibration data and compare what reaches the images.

    python studies/calib_draw_spread.py --method baseline --bits 4/4 --per_traj 49 --seeds 1241:1234 1 2 3 4 \\
        --calib runs/mnist/dilatequant_w4a4/calib.pt --out results/calib_draw_spread_baseline_w4a4.json

A draw is (--per_traj, seeds): --cali_n samples at random steps of FP trajectories, per_traj from each
(49 per trajectory is the rule used before commit 583624c, 1 the rule since). Seeds `s` start the
trajectories from noise s and pick the steps with generator s; `noise:gen` sets the two apart (the task
pipeline draws with noise seed+7 and generator seed: `1241:1234` is a --seed 1234 run's draw). --calib adds
saved calibration sets (a run's calib.pt). For each draw it reports the paired PSNR to FP of --sample_n final
samples (same noise for every draw, median), their mean pixel, and how far the calibrated activation steps
are from the first draw's (median and max |log2 ratio| over all activation quantizers and slots).
`--method dilatequant` runs WD + TPQ without distillation (a PTQ start; distillation is studies/distill_sweep.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common.files import write_json  # noqa: E402
from diffusion.sampling import to_uint8  # noqa: E402
from diffusion.sampling import initial_noise  # noqa: E402
from quant.calib_data import CalibSet  # noqa: E402
from quant.methods.baseline import quantize_baseline  # noqa: E402
from quant.methods.dilatequant import DilateQuantConfig, quantize_dilatequant  # noqa: E402
from quant.settings import QuantConfig  # noqa: E402
from evaluation.fidelity import paired_psnr_db  # noqa: E402
from tools.common import parse_bits  # noqa: E402
from tools.quant_report import draw, load_model  # noqa: E402

METHODS = ("baseline", "dilatequant")


def act_steps(q) -> torch.Tensor:
    """Every activation step size of the model (all quantizers, all slots), flattened in module order."""
    return torch.cat([a.delta.detach().flatten().cpu() for _, m in q.act_quant_modules() for a in m.a_quant])


def calibrate_on(fp, sample, calib: CalibSet, method: str, config: QuantConfig, seed: int):
    if method == "baseline":
        return quantize_baseline(fp, config, calib, seed=seed).eval()
    return quantize_dilatequant(fp, config, sample.seq, calib, DilateQuantConfig(distillation=False),
                                Path("."), seed=seed).eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/mnist.yml")
    p.add_argument("--ckpt", default=None)
    p.add_argument("--timesteps", type=int, default=100)
    p.add_argument("--skip_type", default="quad")
    p.add_argument("--method", default="baseline", choices=METHODS)
    p.add_argument("--bits", default="4/4")
    p.add_argument("--cali_n", type=int, default=1024)
    p.add_argument("--per_traj", type=int, default=49, help="calibration samples per FP trajectory of the drawn sets")
    p.add_argument("--seeds", nargs="*", default=["1", "2", "3"], help="seeds of the drawn sets: s or noise:gen")
    p.add_argument("--calib", nargs="*", default=[], help="saved calibration sets (calib.pt) to add")
    p.add_argument("--sample_n", type=int, default=32, help="images sampled per draw for PSNR to FP")
    p.add_argument("--seed", type=int, default=1234, help="noise seed of the sampled images")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    missing = [c for c in args.calib if not Path(c).is_file()]
    if missing:
        raise SystemExit(f"--calib {missing[0]}: no such file (a calib.pt of an earlier run)")
    w, a = parse_bits(args.bits)
    config = QuantConfig(weight_bit=w, act_bit=a)            # validates the bit widths
    fp, sample, shape = load_model(args.config, args.ckpt, args.timesteps, args.skip_type)
    x_T = initial_noise(args.sample_n, shape, args.seed)
    with torch.no_grad():
        fp_images = to_uint8(sample(fp, x_T))
    sources = [(f"per_traj={args.per_traj},seed={s}", s) for s in args.seeds] + [(c, None) for c in args.calib]
    rows, first = [], None
    for label, seed in tqdm(sources, desc="calibration draws", dynamic_ncols=True):
        if seed is None:
            calib = CalibSet.load(label)
        else:
            noise, _, gen = seed.partition(":")
            calib = draw(fp, sample, args.cali_n, int(noise), shape, args.per_traj, int(gen) if gen else None)
        q = calibrate_on(fp, sample, calib, args.method, config, seed=args.seed)
        with torch.no_grad():
            images = to_uint8(sample(q, x_T))
        steps = act_steps(q)
        first = steps if first is None else first
        drift = (steps / first).log2().abs()
        rows.append({"draw": label, "samples": len(calib.t),
                     "psnr_to_fp_db": float(np.median(paired_psnr_db(fp_images, images))),
                     "mean_pixel": float(images.mean()), "fp_mean_pixel": float(fp_images.mean()),
                     "steps_vs_first_median_abs_log2": float(drift.median()),
                     "steps_vs_first_max_abs_log2": float(drift.max())})
        print(rows[-1], flush=True)
    psnr = [r["psnr_to_fp_db"] for r in rows]
    summary = {"psnr_min": min(psnr), "psnr_max": max(psnr), "psnr_std": float(np.std(psnr))}
    print(summary)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, {"command": " ".join(sys.argv), "args": vars(args), "rows": rows, "summary": summary})
    return rows


if __name__ == "__main__":
    from common.errors import entry_point
    entry_point(main)
