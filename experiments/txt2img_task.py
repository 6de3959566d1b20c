"""Text-to-image with Stable Diffusion (`scripts/txt2img.py`): CompVis's flags (--prompt / --from-file, --plms,
--dpm, --ddim_steps, --scale, --H, --W, --n_samples, --n_iter, --ckpt, --config, --outdir, --seed, --precision)
plus the quantization flags, through the LDM pipeline (experiments/ldm_task.py) and the run shared with DDIM.

Images: prompts in batches of --n_samples (one --prompt is repeated n_samples times; a short last batch is filled
with its last prompt), the whole list --n_iter times; image i starts from noise image i of --seed (--fixed_code:
every batch from the first batch's noise).
Only the UNet is quantized; the CLIP text encoder and the autoencoder stay FP. Calibration trajectories take the
prompts (or --cali_prompts) in turn, with classifier-free guidance (both halves of each guided call kept).
Outputs in --outdir: samples.npz, images/, grid.png, results.json. FID needs --ref (real images, e.g. COCO);
CLIP score (evaluation/clip_score.py) is computed when CLIP weights are on disk (--clip_model), else noted.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import UsageError
from common.checkpoint import check_file
from experiments.flags import HelpFormatter, add_common_flags, add_quant_flags, check_rules, parse_flags
from experiments.ldm_task import Conditioning, input_digests, run
from experiments.run import run_identity
from evaluation.clip_score import DEFAULT_CLIP

DEFAULT_PROMPT = "a painting of a virus monster playing guitar"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Text-to-image with a (quantized) Stable Diffusion model.",
                                formatter_class=HelpFormatter)
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt to render")
    p.add_argument("--from-file", dest="from_file", default=None, help="a text file of prompts, one per line")
    p.add_argument("--cali_prompts", default=None, help="prompts for calibration trajectories (default: the prompts)")
    p.add_argument("--outdir", required=True, help="where samples.npz, images/, grid.png, results.json go")
    p.add_argument("--skip_grid", action="store_true", help="write no grid.png")
    p.add_argument("--skip_save", action="store_true", help="write no per-image PNGs")
    p.add_argument("--ddim_steps", type=int, default=50, help="sampling steps")
    p.add_argument("--plms", action="store_true", help="PLMS sampler")
    p.add_argument("--dpm", action="store_true", help="DPM-Solver sampler")
    p.add_argument("--fixed_code", action="store_true", help="every batch starts from the same noise")
    p.add_argument("--ddim_eta", type=float, default=0.0, help="DDIM noise, 0..1 (DDIM only)")
    p.add_argument("--n_iter", type=int, default=2, help="how many times the prompts are sampled")
    p.add_argument("--H", type=int, default=512, help="image height")
    p.add_argument("--W", type=int, default=512, help="image width")
    p.add_argument("--C", type=int, default=4, help="latent channels")
    p.add_argument("--f", type=int, default=8, help="downsampling factor of the autoencoder")
    p.add_argument("--n_samples", type=int, default=3, help="batch size: images per prompt batch")
    p.add_argument("--n_rows", type=int, default=0, help="accepted for compatibility (the grid is square-ish)")
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--config", default="configs/stable-diffusion/v1-inference.yaml")
    p.add_argument("--ckpt", default="models/ldm/stable-diffusion-v1/model.ckpt")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--precision", default="autocast", choices=["full", "autocast"],
                   help="autocast: float16 autocast on CUDA (full precision on a CPU)")
    p.add_argument("--cond", action="store_true",
                   help="Q-Diffusion compatibility: calibration always uses guided (conditional) trajectories")
    p.add_argument("--no_grad_ckpt", action="store_true", help="accepted for Q-Diffusion compatibility")
    p.add_argument("--ref", default=None, help="FID reference: real images (an .npz of uint8 NHWC, or a folder, e.g. "
                                                "COCO val) or pytorch-fid statistics (mu, sigma)")
    p.add_argument("--clip_model", default=DEFAULT_CLIP,
                   help="CLIP score's model: a local folder, or a name in the Hugging Face cache (never downloaded)")
    add_common_flags(p)
    add_quant_flags(p)
    return p


# How txt2img's flags name the LDM pipeline's settings (its errors name these flags).
FLAG_NAMES = {"custom_steps": "--ddim_steps", "eta": "--ddim_eta", "n_samples": "--n_iter (images = n_iter x "
              "batches of --n_samples)", "batch_size": "--n_samples", "scale": "--scale",
              "sampler ddim": "the DDIM sampler (no --plms, no --dpm)", "sampler plms": "--plms",
              "sampler dpm": "--dpm", "logdir": "--outdir"}


def read_prompts(path: str | None, flag: str, default: list[str]) -> list[str]:
    """The prompts of a text file, one per line (blank lines skipped); `default` without a file."""
    if path is None:
        return default
    path = Path(path)
    check_file(path, flag, "one prompt per line (e.g. COCO captions)", error=UsageError)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{flag} {path} is not UTF-8 text (byte {e.start})", "save it as UTF-8, one prompt per "
                         "line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"{flag} {path} holds no prompts", "one prompt per line")
    return prompts


def as_ldm_args(args) -> argparse.Namespace:
    """The LDM pipeline's names for txt2img's flags (custom_steps, eta, sampler, batch size, image count...)."""
    check_rules(args, [(flag, lambda v: v >= 1, ">= 1") for flag in ("n_samples", "n_iter", "f", "C")])
    for flag, value in (("H", args.H), ("W", args.W)):
        if value % args.f or value <= 0:
            raise UsageError(f"--{flag} {value} must be a positive multiple of --f {args.f}")
    if args.plms and args.dpm:
        raise UsageError("--plms and --dpm: choose one sampler")
    prompts = read_prompts(args.from_file, "--from-file", [args.prompt] * args.n_samples)
    chunks = -(-len(prompts) // args.n_samples)
    extra = dict(custom_steps=args.ddim_steps, eta=args.ddim_eta, sampler="plms" if args.plms else "dpm" if args.dpm
                 else "ddim", batch_size=args.n_samples, n_samples=args.n_iter * chunks * args.n_samples,
                 logdir=args.outdir, no_fid=args.ref is None, resume=None, dpm_flag=args.dpm,
                 latent_shape=(args.C, args.H // args.f, args.W // args.f))
    out = argparse.Namespace(**(vars(args) | extra))
    out.dpm = False
    return out


def identity(args) -> dict:
    """The run's settings and input digests (experiments.run.run_identity), from its parsed flags."""
    args = as_ldm_args(args)
    return run_identity(args, input_digests(args))


def main(argv=None) -> dict | None:
    args = as_ldm_args(parse_flags(build_parser, argv))
    prompts = read_prompts(args.from_file, "--from-file", [args.prompt] * args.batch_size)
    cali_prompts = read_prompts(args.cali_prompts, "--cali_prompts", prompts)
    batch = args.batch_size                                   # txt2img's --n_samples
    chunks = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
    per_image = [p for _ in range(args.n_iter) for chunk in chunks for p in chunk + chunk[-1:] * (batch - len(chunk))]
    return run(args, lambda ldm, config: Conditioning(ldm, config, prompts=per_image, cali_prompts=cali_prompts),
               FLAG_NAMES, count_flag="n_iter", record={"prompts": len(prompts)}, autocast=args.precision == "autocast",
               metrics=lambda images: clip_record(images, per_image, args.clip_model, args.device))


def clip_record(images, captions: list[str], model: str, device) -> dict:
    """{"clip_score", "clip_model", "clip_note"}: the paper's CLIP score of each image with its prompt, or None
    with the reason it is unavailable."""
    from evaluation.clip_score import ClipUnavailable, clip_score
    try:
        return {"clip_score": clip_score(images, captions[:len(images)], model, device), "clip_model": model,
                "clip_note": None}
    except ClipUnavailable as e:
        return {"clip_score": None, "clip_model": model, "clip_note": str(e)}
