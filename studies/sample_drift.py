"""How calibrated models' samples differ from FP's, image by image (same noise): SQNR, and the intensity
statistics FID is sensitive to on MNIST (mean pixel, shares of pure-black and faint background pixels).

    python studies/sample_drift.py runs/mnist/{baseline_w8a8,qdiff_w8a8,qdiff_w4a8,qdiff_w4a4}/quantized.pt \\
        --research_acts --npz results/mnist_runs/*.npz --n 48 --out results/mnist_sample_drift.json

Each checkpoint is measured as saved, with its activation quantizers off (weights only) and, with
--research_acts, with its activation ranges re-searched on its run's calib.pt (the state before any
learned steps). The sampling schedule is the one stored in the checkpoint. --npz adds pixel statistics of
saved sample sets beside the real digits'. --eps_bias adds, on the run's calib.pt (FP-trajectory inputs), the
signed mean of the eps error per timestep band, the x_0-prediction shift it implies in 0-255 pixel units, and
the share of the eps error that is a per-image mean shift (a bias the sampler accumulates, not noise).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.files import write_json  # noqa: E402
from ddim import load_config, make_betas  # noqa: E402
from ddim.data import mnist_uint8  # noqa: E402
from diffusion.sampling import to_uint8  # noqa: E402
from ddim.checkpoint import load_unet  # noqa: E402
from ddim.sampling import make_sampler  # noqa: E402
from diffusion.sampling import initial_noise  # noqa: E402
from ddim.schedule import alphas_cumprod  # noqa: E402
from quant.calib_data import CalibSet  # noqa: E402
from quant.calibrate import calibrate_activations  # noqa: E402
from quant.checkpoint import load_quantized  # noqa: E402
from quant.model import quant_enabled  # noqa: E402
from evaluation.fid import load_images_npz  # noqa: E402
from tools.quant_report import t_bands, tensor_sqnr_db  # noqa: E402

FAINT = 20      # pixel values 1..FAINT (0-255) count as faint background


def pixel_stats(images: np.ndarray) -> dict:
    """uint8 images -> mean pixel, share of pure-black pixels, share of faint (1..FAINT) pixels."""
    u = images.astype(np.int64)
    return {"mean_px": float(u.mean()), "zero_share": float((u == 0).mean()),
            "faint_share": float(((u > 0) & (u <= FAINT)).mean())}


def drift(ref: torch.Tensor, out: torch.Tensor) -> dict:
    return {"sample_sqnr_db": tensor_sqnr_db(ref, out)} | pixel_stats(to_uint8(out))


@torch.no_grad()
def eps_bias(fp, qmodel, data: CalibSet, a_bar: torch.Tensor, batch: int = 128) -> dict:
    """Per timestep band: mean of eps_q - eps_fp; the mean x_0-prediction shift it implies,
    -sqrt(1 - a_t) / sqrt(a_t) (eps_q - eps_fp), in 0-255 pixel units (x_0 in [-1, 1]; > 0 brightens);
    and bias_share = E[per-image mean error^2] / E[error^2]."""
    errs, shifts = [], []
    for x, t, cond in data.batches(batch):
        err = (qmodel(x, t, **cond) - fp(x, t, **cond)).flatten(1)
        a = a_bar[t].to(err)
        errs.append(err)
        shifts.append(-((1 - a) / a).sqrt()[:, None] * err * 127.5)
    err, shift = torch.cat(errs), torch.cat(shifts)
    return {label: {"eps_mean_err": float(err[sel].mean()), "x0_shift_px": float(shift[sel].mean()),
                    "bias_share": float(err[sel].mean(1).pow(2).mean() / err[sel].pow(2).mean()),
                    "n": int(sel.sum())} for label, sel in t_bands(data.t)}


def step_ratios(qmodel, searched: dict) -> dict:
    """Range of (saved Δ_x) / (re-searched Δ_x) over activation quantizers."""
    r = [float((q.delta / s).mean()) for n, m in qmodel.act_quant_modules() for q, s in zip(m.a_quant, searched[n])]
    return {"min": min(r), "max": max(r), "median": float(np.median(r))}


@torch.no_grad()
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="quantized.pt files of runs")
    p.add_argument("--config", default="configs/mnist.yml")
    p.add_argument("--ckpt", default=None, help="FP weights (default: the config's)")
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--research_acts", action="store_true",
                   help="also measure each checkpoint with its activation ranges re-searched on its run's calib.pt")
    p.add_argument("--eps_bias", action="store_true",
                   help="also measure each checkpoint's eps bias on its run's calib.pt (see above)")
    p.add_argument("--npz", nargs="*", default=[], help="sample files (samples.npz, results/*_runs/*.npz): pixel stats")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    fp = load_unet(cfg, args.ckpt)
    x_T = initial_noise(args.n, (cfg.channels, cfg.image_size, cfg.image_size), args.seed)
    report, refs = {"n": args.n, "seed": args.seed, "runs": {}}, {}
    a_bar = alphas_cumprod(make_betas(cfg.diffusion)).float()
    report["pixel stats"] = {"real (mnist_uint8, 5,000)": pixel_stats(mnist_uint8())}
    for path in args.npz:
        images = load_images_npz(path)
        report["pixel stats"][f"{path} ({len(images)})"] = pixel_stats(images)
    print(json.dumps(report["pixel stats"], indent=1), flush=True)
    for path in args.checkpoints:
        qmodel, payload = load_quantized(path, fp)
        key = (payload["meta"]["timesteps"], payload["meta"]["skip_type"])
        sample = make_sampler(make_betas(cfg.diffusion), *key, eta=0.0)
        if key not in refs:
            refs[key] = sample(fp, x_T)
            report[f"fp {key[0]} {key[1]}"] = pixel_stats(to_uint8(refs[key]))
        row = {"method": payload["method"], "as saved": drift(refs[key], sample(qmodel, x_T))}
        with quant_enabled(qmodel, weight=True, act=False):
            row["weights only"] = drift(refs[key], sample(qmodel, x_T))
        calib_path = Path(path).parent / "calib.pt"
        calib = CalibSet.load(calib_path) if (args.eps_bias or args.research_acts) and calib_path.exists() else None
        if args.eps_bias and calib is not None:
            row["eps bias on calib.pt"] = eps_bias(fp, qmodel, calib, a_bar)
        if args.research_acts and qmodel.config.quant_act and calib is not None:
            calibrate_activations(qmodel, calib, 64, seed=0)
            row["activation ranges re-searched"] = drift(refs[key], sample(qmodel, x_T))
            searched = {n: [q.delta.detach().clone() for q in m.a_quant] for n, m in qmodel.act_quant_modules()}
            qmodel.load_state_dict(payload["state_dict"])                # back to the saved steps
            row["saved / re-searched step"] = step_ratios(qmodel, searched)
        report["runs"][str(path)] = row
        print(path, json.dumps(row), flush=True)
    if args.out:
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    from common.errors import entry_point
    entry_point(main)
