"""DDIM task pipeline: check -> load -> quantize (or load --cali_ckpt) -> sample -> evaluate -> results.json.

Flags follow Q-Diffusion's `scripts/sample_diffusion_ddim.py` (seed 003), plus `--ckpt`. Every flag and input
file is checked before any work or write; the log directory is locked while the run writes it; finished stages
(calibration set, distilled units, quantized model, sampled batches) are reused by a rerun whose settings and
input contents match (experiments/quantize.py).
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from common.errors import UsageError
from common.files import file_digest
from ddim import load_config, make_betas
from ddim.checkpoint import load_unet
from ddim.sampling import SAMPLE_TYPES, SAMPLERS, make_sampler
from ddim.schedule import SKIP_TYPES, alphas_cumprod
from diffusion.sampling import initial_noise
from experiments import dist
from experiments.flags import (HelpFormatter, add_common_flags, add_quant_flags, check_input_files,
                               check_no_quant_flags, check_quant_flags, check_rules, parse_flags)
from experiments.quantize import Preloaded, QuantJob, cached_calibration, preload
from experiments.run import Family, check_logdir, execute, run_identity
from experiments.runtime import timer
from quant.bias_correction import correct_eps_bias
from quant.calib_data import CalibSet
from common.device import check_device, set_seed

SAMPLING_FLAGS = ("max_images", "batch_size", "backend")      # change what is sampled, not the calibrated model
CALIB_SETTINGS = ("timesteps", "skip_type", "eta", "sample_type", "ddim_sampler", "seed", "cali_n", "cali_st",
                  "cali_per_traj")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Sample (and optionally quantize) a DDIM model, then evaluate.",
                                formatter_class=HelpFormatter)
    p.add_argument("--config", required=True, help="configs/mnist.yml (embedded) or configs/cifar10.yml")
    p.add_argument("--ckpt", default=None, help="FP checkpoint (default: the config's shipped one)")
    p.add_argument("--use_pretrained", action="store_true", help="accepted for Q-Diffusion compatibility")
    p.add_argument("--timesteps", type=int, default=100, help="sampling steps, 1..T")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise, 0 (deterministic) .. 1 (DDPM-like)")
    p.add_argument("--skip_type", default="quad", choices=SKIP_TYPES)
    p.add_argument("--sample_type", default="generalized", choices=SAMPLE_TYPES)
    p.add_argument("--sampler", dest="ddim_sampler", default="ddim", choices=list(SAMPLERS),
                   help="ddim: the DDIM repository's sampler of --sample_type; plms, dpm: CompVis's PLMS (over the "
                        "--skip_type discretization) and DPM-Solver-2 (diffusion.samplers)")
    p.add_argument("--max_images", type=int, default=1000, help="number of images to sample")
    p.add_argument("--batch_size", type=int, default=250)
    p.add_argument("-l", "--logdir", required=True)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--ref", default=None, help="FID reference: 'mnist', 'mnist-1k' or an .npz of real uint8 NHWC "
                                                "images (default: mnist for the MNIST config)")
    p.add_argument("--no_fid", action="store_true", help="only sample (quick; FID needs a reference's Inception "
                                                         "statistics, cached after the first time)")
    add_common_flags(p)
    add_quant_flags(p)
    return p


def check_flags(args, cfg) -> None:
    """Every flag's range and every input file, before any work or write (one UsageError line)."""
    steps = cfg.diffusion.num_diffusion_timesteps
    check_rules(args, [("timesteps", lambda v: 1 <= v <= steps, f"1..{steps} (the config's diffusion steps)"),
                       ("eta", lambda v: 0.0 <= v <= 1.0, "[0, 1]"), ("max_images", lambda v: v >= 1, ">= 1"),
                       ("batch_size", lambda v: v >= 1, ">= 1")])
    if args.ddim_sampler != "ddim":
        if args.eta > 0 or args.sample_type != "generalized":
            raise UsageError(f"--sampler {args.ddim_sampler} is deterministic and has no --sample_type",
                             "drop --eta and --sample_type, or use --sampler ddim")
        try:
            make_sampler(make_betas(cfg.diffusion), args.timesteps, args.skip_type, 0.0, sampler=args.ddim_sampler)
        except ValueError as e:                        # e.g. CompVis's +1 shift leaving the schedule
            raise UsageError(f"--timesteps {args.timesteps} (--sampler {args.ddim_sampler}): {e}") from None
    check_device(args.device)
    check_no_quant_flags(args)
    if args.ptq:
        check_quant_flags(args)
    check_input_files(args, args.max_images, "--max_images")
    if not args.no_fid:
        from evaluation.fid import check_reference
        check_reference(reference(args, cfg))


def reference(args, cfg) -> str | None:
    return args.ref or ("mnist" if cfg.name == "mnist" else None)


def input_digests(args, cfg) -> dict:
    """Content hashes of every input file: a file replaced at the same path is another input."""
    return {"config": file_digest(args.config), "ckpt": file_digest(args.ckpt or cfg.ckpt),
            "cali_data": file_digest(args.cali_data_path) if args.ptq else None,
            "cali_ckpt": file_digest(args.cali_ckpt) if args.ptq else None, "fp_samples": file_digest(args.fp_samples)}


def identity(args) -> dict:
    """The run's settings and input digests (experiments.run.run_identity), from its parsed flags."""
    return run_identity(args, input_digests(args, load_config(args.config)))


def calibration_set(fp, sample, args, logdir: Path, device, inputs: dict,
                    preloaded: Preloaded) -> tuple[CalibSet, float | None, bool]:
    """The run's calibration set (experiments.quantize.cached_calibration), drawn from FP trajectories started
    from their own noise seed."""
    def start(n_traj: int):
        x_T = initial_noise(n_traj, (fp.cfg.in_channels, fp.cfg.resolution, fp.cfg.resolution), args.seed + 7)
        return x_T, lambda x, on_step, rows=None: sample(fp, x.to(device), on_step=on_step)

    return cached_calibration(args, logdir, CALIB_SETTINGS, inputs, start, sample.calls, sample.seq, preloaded)


def eps_correction(qmodel, fp, sample, args, device) -> dict:
    """--eps_correction N: estimate and install the per-timestep eps-mean correction on N quantized-model
    trajectories started from their own noise seed (not the evaluation's)."""
    x_T = initial_noise(args.eps_correction, (fp.cfg.in_channels, fp.cfg.resolution, fp.cfg.resolution),
                        args.seed + 11)
    gen = torch.Generator(device=device).manual_seed(args.seed + 12)
    with timer() as t:
        stats = correct_eps_bias(qmodel, fp, sample, x_T.to(device), args.cali_batch_size, gen)
    return stats | {"eps_correction_seconds": t["seconds"]}


def sampler_record(args) -> dict:
    return {"steps": args.timesteps, "skip_type": args.skip_type, "eta": args.eta, "sample_type": args.sample_type,
            "sampler": args.ddim_sampler}


def main(argv=None) -> dict | None:
    args = parse_flags(build_parser, argv)
    cfg = load_config(args.config)
    check_flags(args, cfg)
    sample = make_sampler(make_betas(cfg.diffusion), args.timesteps, args.skip_type, args.eta, args.sample_type,
                          args.ddim_sampler)
    calibration = preload(args, sample.seq, (cfg.channels, cfg.image_size, cfg.image_size))
    identity = run_identity(args, input_digests(args, cfg))
    check_logdir(Path(args.logdir), "-l", identity, args.overwrite)
    set_seed(args.seed)
    shard, device = dist.setup(args.device)
    try:
        return execute(args, family(args, cfg, sample, device, calibration), identity, shard, device,
                       Path(args.logdir))
    finally:
        dist.teardown(shard)


def family(args, cfg, sample, device, calibration: Preloaded) -> Family:
    """The DDIM model and sampler as a run's Family (experiments/run.py)."""
    fp = load_unet(cfg, args.ckpt).to(device)
    logdir = Path(args.logdir)
    inputs = input_digests(args, cfg)
    job = QuantJob(fp=fp, schedule=sample.seq, sigmas=(1 - alphas_cumprod(sample.betas)).sqrt(),
                   draw_calibration=lambda: calibration_set(fp, sample, args, logdir, device, inputs, calibration),
                   eps_correction=lambda q: eps_correction(q, fp, sample, args, device),
                   inputs=inputs, sampling_flags=SAMPLING_FLAGS, calibration=calibration,
                   network={"family": "ddim", "config": dataclasses.asdict(cfg.model)})
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    noise = initial_noise(args.max_images, shape, args.seed)
    current = {"model": fp}

    def draw(b: int, gen: torch.Generator, tick) -> torch.Tensor:
        x_T = noise[b * args.batch_size:(b + 1) * args.batch_size].to(device)
        return sample(current["model"], x_T, generator=gen, on_step=tick)
    return Family(job=job, install=lambda m: current.update(model=m), draw=draw, n_images=args.max_images,
                  batch_size=args.batch_size, count_flag="max_images", steps=sample.calls,
                  sampler=sampler_record(args), reference=None if args.no_fid else reference(args, cfg),
                  fp_samples=None if args.no_fid else args.fp_samples,
                  record={"skip_type": args.skip_type, "eta": args.eta, "config": str(args.config)})
