"""DDIM task pipeline: check -> load -> quantize (or load --cali_ckpt) -> sample -> evaluate -> results.json.

Flags follow Q-Diffusion's `scripts/sample_diffusion_ddim.py` (seed 003), plus `--ckpt`. Every flag and input
file is checked before any work or write; the log directory is locked while the run writes it; finished stages
(calibration set, distilled units, quantized model, sampled batches) are reused by a rerun whose settings and
input contents match (experiments/quantize.py).
"""
from __future__ import annotations

import argparse
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch

from common.errors import UsageError
from common.files import file_digest
from ddim import load_config, make_betas
from ddim.checkpoint import load_unet
from ddim.sampling import SAMPLE_TYPES, initial_noise, join_batches, make_sampler, sample_batches, save_samples
from ddim.schedule import SKIP_TYPES, alphas_cumprod
from experiments import dist
from experiments.flags import HelpFormatter, add_common_flags, add_quant_flags, check_quant_flags, check_rules
from experiments.quantize import NOT_RESULT, QuantJob, check_cali_ckpt, quantize
from experiments.runtime import (canonical, load_stage, locked, provenance, recorded_identity, save_args, save_stage,
                                 timer, write_results)
from quant import METHOD_VERSION
from quant.bias_correction import correct_eps_bias
from quant.calib_data import CalibSet, collect_trajectories, draw_over_steps, evenly_spaced_steps, trajectories_for
from quant.checkpoint import load_quantized, read_quantized
from quant.methods import QuantMode
from quant.model import QuantModel, frozen
from common.device import set_seed

SAMPLING_FLAGS = ("max_images", "batch_size")      # change what is sampled, not the calibrated model
CALIB_SETTINGS = ("timesteps", "skip_type", "eta", "sample_type", "seed", "cali_n", "cali_st", "cali_per_traj")


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
    if args.ptq:
        check_quant_flags(args)
    for flag in ("ckpt", "cali_data_path", "cali_ckpt"):
        path = getattr(args, flag)
        if path is not None and not Path(path).is_file():
            raise UsageError(f"--{flag} {path}: no such file")
    if not args.no_fid:
        from evaluation.fid import check_reference
        check_reference(reference(args, cfg))


def reference(args, cfg) -> str | None:
    return args.ref or ("mnist" if cfg.name == "mnist" else None)


def input_digests(args, cfg) -> dict:
    """Content hashes of every input file: a file replaced at the same path is another input."""
    return {"config": file_digest(args.config), "ckpt": file_digest(args.ckpt or cfg.ckpt),
            "cali_data": file_digest(args.cali_data_path) if args.ptq else None,
            "cali_ckpt": file_digest(args.cali_ckpt) if args.ptq else None}


def run_identity(args, cfg) -> dict:
    """What makes this run's results: its settings and input contents (recorded in results.json; run_task
    skips a run only when they match)."""
    return {"settings": canonical({k: v for k, v in vars(args).items() if k not in NOT_RESULT}),
            "inputs": input_digests(args, cfg)}


def calibration_set(fp, sample, args, logdir: Path, device, inputs: dict) -> tuple[CalibSet, float | None, bool]:
    """--cali_data_path, or <logdir>/calib.pt drawn with the same settings and inputs (its key is inside the
    file), or drawn anew from FP trajectories started from their own noise seed and saved there.
    -> (calibration set, seconds its draw took (None if not recorded), whether it was reused)."""
    if args.cali_data_path:
        drawn = CalibSet.meta(Path(args.cali_data_path)).get("record", {})
        return CalibSet.load(args.cali_data_path), drawn.get("seconds"), True
    mode = QuantMode(args.quant_mode)
    path = logdir / "calib.pt"
    key = canonical({k: getattr(args, k) for k in CALIB_SETTINGS} | {"evenly_spaced": mode is QuantMode.QDIFF,
                                                                      "config": inputs["config"],
                                                                      "ckpt": inputs["ckpt"]})
    if path.exists():
        meta = CalibSet.meta(path)
        if meta.get("key") == key:
            return CalibSet.load(path), meta.get("record", {}).get("seconds"), True
    n_traj = args.cali_n if mode is QuantMode.QDIFF else trajectories_for(args.cali_n, args.cali_per_traj)
    x_T = initial_noise(n_traj, (fp.cfg.in_channels, fp.cfg.resolution, fp.cfg.resolution), args.seed + 7)
    fp_sample = lambda x, on_step: sample(fp, x.to(device), on_step=on_step)  # noqa: E731
    gen = torch.Generator().manual_seed(args.seed)
    with timer() as t:
        if mode is QuantMode.QDIFF:
            calib = evenly_spaced_steps(collect_trajectories(fp_sample, x_T), args.cali_n, args.cali_st, gen)
        else:
            calib = draw_over_steps(fp_sample, x_T, args.cali_n, len(sample.seq), args.cali_per_traj, gen,
                                    batch_size=args.batch_size)
    calib.save(path, key=key, record={"samples": len(calib.t), "seconds": t["seconds"]})
    return calib, t["seconds"], False


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
    return {"timesteps": args.timesteps, "skip_type": args.skip_type, "eta": args.eta, "sample_type": args.sample_type}


def quantize_once(job: QuantJob, args, logdir: Path, device, shard: dist.Shard, payload: dict | None):
    """quantize() on rank 0; the other ranks wait for its quantized.pt and load it."""
    if shard.world == 1 or args.cali_ckpt and not args.eps_correction and not args.resume_w:
        return quantize(job, args, logdir, device, sampler_record(args), payload)
    result = quantize(job, args, logdir, device, sampler_record(args), payload) if shard.main else None
    dist.barrier(shard)
    if shard.main:
        return result
    qmodel, saved = load_quantized(logdir / "quantized.pt", job.fp)
    return qmodel.eval(), {"method": saved["method"], "weight_bit": args.weight_bit,
                           "act_bit": args.act_bit if args.quant_act else None}


def sample_cache(logdir: Path, args, identity: dict, model_digest: str | None, device) -> Path:
    """<logdir>/sample_batches: finished sampling batches of this model (by content) and these settings."""
    settings = {k: v for k, v in identity["settings"].items() if k != "max_images"}
    key = {"settings": settings, "inputs": identity["inputs"], "model": model_digest, "device": device.type}
    cache = logdir / "sample_batches"
    if load_stage(cache / "key.json", key) is None:
        shutil.rmtree(cache, ignore_errors=True)
        save_stage(cache / "key.json", key, {})
    return cache


def clear_stale_outputs(logdir: Path, identity: dict) -> None:
    """A results.json (and its samples) made with other settings or inputs is removed before this run writes:
    the directory never shows one run's record beside another's samples."""
    old = recorded_identity(logdir / "results.json")
    if old is not None and old != identity:
        for name in ("results.json", "samples.npz", "grid.png"):
            (logdir / name).unlink(missing_ok=True)
        shutil.rmtree(logdir / "images", ignore_errors=True)


def inference(model, compile_model: bool):
    """(context, eps callable) to sample with: a QuantModel's weights are quantized once (quant.model.frozen);
    --compile wraps the callable in torch.compile."""
    context = frozen(model) if isinstance(model, QuantModel) else nullcontext(model)
    return context, (torch.compile(model) if compile_model else model)


def main(argv=None) -> dict | None:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config)
    check_flags(args, cfg)
    sample = make_sampler(make_betas(cfg.diffusion), args.timesteps, args.skip_type, args.eta, args.sample_type)
    payload = read_quantized(args.cali_ckpt) if args.ptq and args.cali_ckpt else None
    if payload is not None:
        check_cali_ckpt(payload, args.cali_ckpt, args, sample.seq)
    set_seed(args.seed)
    shard, device = dist.setup(args.device)
    logdir = Path(args.logdir)
    try:
        with locked(logdir) if shard.main else nullcontext():
            return run(args, cfg, sample, payload, shard, device, logdir)
    finally:
        dist.teardown(shard)


def run(args, cfg, sample, payload, shard: dist.Shard, device, logdir: Path) -> dict | None:
    identity = run_identity(args, cfg)
    if shard.main:
        clear_stale_outputs(logdir, identity)
        save_args(logdir, args)
    fp = load_unet(cfg, args.ckpt).to(device)
    model, record, model_digest = fp, {"method": "fp", "weight_bit": 32, "act_bit": None}, None
    if args.ptq:
        job = QuantJob(fp=fp, schedule=sample.seq, sigmas=(1 - alphas_cumprod(sample.betas)).sqrt(),
                       draw_calibration=lambda: calibration_set(fp, sample, args, logdir, device, identity["inputs"]),
                       eps_correction=lambda q: eps_correction(q, fp, sample, args, device),
                       inputs=identity["inputs"], sampling_flags=SAMPLING_FLAGS)
        model, record = quantize_once(job, args, logdir, device, shard, payload)
        model.check_timesteps(sample.seq)
        made = logdir / "quantized.pt"
        model_digest = file_digest(made if made.exists() and not (args.cali_ckpt and not args.eps_correction)
                                   else args.cali_ckpt)

    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    cache = (sample_cache(logdir, args, identity, model_digest, device) if shard.main
             else logdir / "sample_batches")
    dist.barrier(shard)
    n_batches = -(-args.max_images // args.batch_size)
    context, eps = inference(model, args.compile)
    with context:
        mine = sample_batches(eps, sample, args.max_images, shape, args.batch_size, args.seed, device,
                              shard.batches(n_batches), cache, progress=shard.main)
    done = dist.gather_to_main(shard, mine)
    if not shard.main:
        return None
    images, seconds = join_batches(done)
    save_samples(logdir, images)
    record |= {"n_samples": len(images), "steps": args.timesteps, "skip_type": args.skip_type, "eta": args.eta,
               "seed": args.seed, "config": str(args.config), "sampling_seconds": seconds,
               "processes": shard.world, "compiled": args.compile}
    if not args.no_fid:
        from evaluation.fid import evaluate                       # FID's packages are needed only here
        record |= evaluate(images, ref=reference(args, cfg), device=device)
    record |= identity | {"method_version": METHOD_VERSION, "provenance": provenance(device)}
    write_results(logdir, record)
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                   if not isinstance(v, dict)))
    return record
