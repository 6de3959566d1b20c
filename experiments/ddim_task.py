"""DDIM task pipeline: load -> (calibrate + quantize) -> sample -> evaluate -> results.json.

Flags follow Q-Diffusion's `scripts/sample_diffusion_ddim.py` (seed 003), plus `--ckpt`.
"""
from __future__ import annotations

import argparse
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch

from ddim import load_config, make_betas
from ddim.checkpoint import load_unet
from ddim.sampling import SAMPLE_TYPES, initial_noise, join_batches, make_sampler, sample_batches, save_samples
from experiments import dist
from ddim.schedule import alphas_cumprod
from experiments.runtime import (load_stage, peak_memory_mb, reset_peak_memory, save_args, save_stage, stage_record,
                                 timer, write_results)
from quant.bias_correction import correct_eps_bias
from quant.calib_data import CalibSet, collect_trajectories, draw_over_steps, evenly_spaced_steps, trajectories_for
from quant.checkpoint import load_quantized, save_quantized
from quant.methods import QuantMode
from quant.dilation import Scaling
from quant.distill import DistillConfig, LRSchedule
from quant.methods.baseline import quantize_baseline
from quant.methods.dilatequant import DilateQuantConfig, quantize_dilatequant
from quant.methods.qdiff import QDiffConfig, quantize_qdiff, reconstruct_activations
from quant.model import QuantModel, frozen
from quant.settings import QuantConfig
from tools.common import pick_device, set_seed


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Sample (and optionally quantize) a DDIM model, then evaluate.")
    p.add_argument("--config", required=True, help="configs/mnist.yml (embedded) or configs/cifar10.yml")
    p.add_argument("--ckpt", default=None, help="FP checkpoint (default: the config's shipped one)")
    p.add_argument("--use_pretrained", action="store_true", help="accepted for Q-Diffusion compatibility")
    p.add_argument("--timesteps", type=int, default=100, help="sampling steps")
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--skip_type", default="quad", choices=["uniform", "quad"])
    p.add_argument("--sample_type", default="generalized", choices=SAMPLE_TYPES)
    p.add_argument("--max_images", type=int, default=1000, help="number of images to sample")
    p.add_argument("--batch_size", type=int, default=250)
    p.add_argument("-l", "--logdir", required=True)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default=None)
    p.add_argument("--ref", default=None, help="FID reference: 'mnist' or an .npz of real uint8 NHWC images "
                                                "(default: mnist for the MNIST config)")
    p.add_argument("--no_fid", action="store_true", help="only sample")
    p.add_argument("--compile", action="store_true", help="sample with torch.compile (first call compiles)")
    q = p.add_argument_group("quantization")
    q.add_argument("--ptq", action="store_true", help="quantize the model")
    q.add_argument("--quant_mode", default="baseline", choices=[m.value for m in QuantMode])
    q.add_argument("--weight_bit", type=int, default=8)
    q.add_argument("--quant_act", action="store_true", help="quantize activations too")
    q.add_argument("--act_bit", type=int, default=8)
    q.add_argument("--a_sym", action="store_true", help="symmetric activation quantizers")
    q.add_argument("--sm_abit", type=int, default=None, help="bits of softmax outputs (default: --act_bit)")
    q.add_argument("--split", action="store_true", help="split shortcut quantization (Q-Diffusion)")
    q.add_argument("--cali_ckpt", default=None, help="load this calibrated checkpoint instead of calibrating")
    q.add_argument("--cali_n", type=int, default=1024,
                   help="calibration samples: total, drawn at random over all steps (baseline, dilatequant); "
                        "per step (qdiff)")
    q.add_argument("--cali_st", type=int, default=20, help="qdiff: number of evenly spaced calibration steps")
    q.add_argument("--cali_per_traj", type=int, default=1,
                   help="baseline, dilatequant: calibration samples taken from each FP trajectory (distinct random "
                        "steps); 1 = every sample from its own trajectory, --cali_n trajectories")
    q.add_argument("--cali_batch_size", type=int, default=64)
    q.add_argument("--cali_data_path", default=None, help="a saved calibration set (calib.pt) to use")
    q.add_argument("--eps_correction", type=int, default=0, metavar="N",
                   help="beyond the paper, any method: subtract the per-timestep mean eps error, estimated on N "
                        "trajectories of the quantized model (quant/bias_correction.py); 0 = off")
    r = p.add_argument_group("qdiff (BRECQ reconstruction with AdaRound)")
    r.add_argument("--cali_iters_a", type=int, default=QDiffConfig.act_iters, help="activation-step iterations per block")
    r.add_argument("--cali_lr", type=float, default=QDiffConfig.act_lr, help="activation-step learning rate")
    r.add_argument("--cali_p", type=float, default=QDiffConfig.lp, help="norm of the activation range search")
    r.add_argument("--running_stat", action="store_true", help="running min/max activation ranges")
    r.add_argument("--resume", action="store_true", help="with --cali_ckpt: use the calibrated model as is")
    r.add_argument("--resume_w", action="store_true",
                   help="with --cali_ckpt: keep its quantized weights, recalibrate the activations")
    d = p.add_argument_group("dilatequant (Table 3 switches: --no-wd, --no-tpq, --no-bkd)")
    d.add_argument("--wd", action=argparse.BooleanOptionalAction, default=True, help="Weight Dilation")
    d.add_argument("--tpq", action=argparse.BooleanOptionalAction, default=True, help="Temporal Parallel Quantizer")
    d.add_argument("--bkd", action=argparse.BooleanOptionalAction, default=True, help="Block-wise Knowledge Distillation")
    d.add_argument("--scaling", default=Scaling.WEIGHT_DILATION.value, choices=[m.value for m in Scaling],
                   help="equivalent scaling rule for --wd (Table 9: wd, smoothquant, awq, osplus, learnable)")
    d.add_argument("--cali_iters", type=int, default=DistillConfig.iters,
                   help="iterations per block: distillation (dilatequant) or AdaRound (qdiff)")
    d.add_argument("--distill_batch_size", type=int, default=DistillConfig.batch_size)
    d.add_argument("--lr_weight", type=float, default=DistillConfig.lr_weight)
    d.add_argument("--lr_quant", type=float, default=DistillConfig.lr_quant,
                   help="weight-quantizer steps and zero points (and activation ones unless --lr_act is given)")
    d.add_argument("--lr_act", type=float, default=DistillConfig.lr_act,
                   help="activation (TPQ) steps and zero points; default: --lr_quant")
    d.add_argument("--lr_scale", type=float, default=DistillConfig.lr_scale, help="--scaling learnable factors")
    d.add_argument("--lr_schedule", default=DistillConfig.lr_schedule.value, choices=[m.value for m in LRSchedule],
                   help="learning rate over each unit's iterations: distillation (dilatequant) and the activation "
                        "steps (qdiff); cosine anneals to 0")
    d.add_argument("--t_weight_sigma", type=float, default=DistillConfig.t_weight_sigma,
                   help="(beyond the paper) weight each distillation sample by 1/(sigma_t^2 + this^2), mean 1: "
                        "more weight to small t, where feature errors become large eps errors (embedded model: 0.2 at "
                        "W4A4, 1.0 at W6A6, README); default: plain MSE")
    return p


def quant_config(args) -> QuantConfig:
    return QuantConfig(weight_bit=args.weight_bit, act_bit=args.act_bit if args.quant_act else None,
                       a_sym=args.a_sym, sm_abit=args.sm_abit, split=args.split)


def dilatequant_config(args) -> DilateQuantConfig:
    try:
        distill = DistillConfig(iters=args.cali_iters, batch_size=args.distill_batch_size, lr_weight=args.lr_weight,
                                lr_quant=args.lr_quant, lr_act=args.lr_act, lr_scale=args.lr_scale,
                                lr_schedule=LRSchedule(args.lr_schedule), t_weight_sigma=args.t_weight_sigma,
                                seed=args.seed)
    except ValueError as e:   # setting -> flag: iters -> --cali_iters, batch_size -> --distill_batch_size, else --name
        raise SystemExit(f"{e}: fix --cali_iters / --distill_batch_size / --lr_* / --t_weight_sigma on the command "
                         "line") from None
    return DilateQuantConfig(weight_dilation=args.wd, scaling=Scaling(args.scaling), temporal=args.tpq,
                             distillation=args.bkd, distill=distill)


def qdiff_settings(args) -> QDiffConfig:
    return QDiffConfig(weight_iters=args.cali_iters, act_iters=args.cali_iters_a, act_lr=args.cali_lr, lp=args.cali_p,
                       act_lr_schedule=LRSchedule(args.lr_schedule), running_stat=args.running_stat,
                       batch_size=args.distill_batch_size, seed=args.seed)


# Settings that change neither the quantized model nor (beyond SAMPLING_ONLY) the sampled images: a finished
# stage made with other values of these is still reused.
NOT_RESULT = ("logdir", "device", "ref", "no_fid")
SAMPLING_ONLY = NOT_RESULT + ("max_images", "batch_size")
UNIT_DIRS = ("distill", "recon_w", "recon_a")                 # per-unit reconstruction checkpoints
CALIB_SETTINGS = ("config", "ckpt", "timesteps", "skip_type", "eta", "sample_type", "seed", "cali_n", "cali_st",
                  "cali_per_traj")


# Flags added after runs were made, with the default that reproduces those runs: left out of a stage's key
# while at that default, so finished stages made before the flag existed stay valid.
LATER_FLAGS = {"lr_act": None, "t_weight_sigma": None}


def stage_key(args, ignore: tuple[str, ...]) -> dict:
    return {k: v for k, v in vars(args).items()
            if k not in ignore and not (k in LATER_FLAGS and v == LATER_FLAGS[k])}


def sample_cache(logdir: Path, args, device) -> Path:
    """<logdir>/sample_batches: finished sampling batches of this model and these settings. Emptied when
    the settings (or, through --ptq settings and quantize.json, the calibrated model) differ."""
    cache, key = logdir / "sample_batches", stage_key(args, NOT_RESULT) | {"device": device.type}
    if args.cali_ckpt:
        key["cali_ckpt_mtime_ns"] = Path(args.cali_ckpt).stat().st_mtime_ns
    if load_stage(cache / "key.json", key) is None:
        shutil.rmtree(cache, ignore_errors=True)
        save_stage(cache / "key.json", key, {})
    return cache


EPS_CORRECTED = "+epsbc"   # method-name suffix of a model with the eps-mean correction (--eps_correction)


def method_name(args) -> str:
    """'dilatequant', e.g. 'dilatequant[wd,tpq]' for a Table 3 ablation row; '+epsbc' with --eps_correction,
    '+tw0.2' with --t_weight_sigma 0.2 (beyond the paper)."""
    suffix = EPS_CORRECTED if args.eps_correction else ""
    if args.quant_mode != QuantMode.DILATEQUANT.value:
        return args.quant_mode + suffix
    if args.bkd and args.t_weight_sigma is not None:
        suffix = f"+tw{args.t_weight_sigma:g}" + suffix
    if args.wd and args.tpq and args.bkd and args.scaling == Scaling.WEIGHT_DILATION.value:
        return args.quant_mode + suffix
    scaling = "wd" if args.scaling == Scaling.WEIGHT_DILATION.value else args.scaling
    parts = [n for n, on in ((scaling, args.wd), ("tpq", args.tpq), ("bkd", args.bkd)) if on]
    return f"dilatequant[{','.join(parts) or 'none'}]{suffix}"


def calibration_set(fp, sample, args, logdir: Path, device) -> tuple[CalibSet, float | None, bool]:
    """--cali_data_path, or <logdir>/calib.pt made with the same settings (calib.json), or drawn anew from FP
    trajectories started from their own noise seed and cached there. -> (calibration set, seconds its draw
    took (None if not recorded), whether it was reused rather than drawn by this call)."""
    if args.cali_data_path:
        if not Path(args.cali_data_path).is_file():
            raise SystemExit(f"--cali_data_path {args.cali_data_path}: no such file (a calib.pt of an earlier run)")
        drawn = stage_record(Path(args.cali_data_path).with_name("calib.json")) or {}
        return CalibSet.load(args.cali_data_path), drawn.get("seconds"), True
    mode = QuantMode(args.quant_mode)
    path, stage = logdir / "calib.pt", logdir / "calib.json"
    key = {k: getattr(args, k) for k in CALIB_SETTINGS} | {"evenly_spaced": mode is QuantMode.QDIFF}
    done = load_stage(stage, key)
    if path.exists() and done is not None:
        return CalibSet.load(path), done.get("seconds"), True
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
    calib.save(path)
    save_stage(stage, key, {"samples": len(calib.t), "seconds": t["seconds"]})
    return calib, t["seconds"], False


def eps_correction(qmodel, fp, sample, args, device) -> dict:
    """--eps_correction N: estimate and install the per-timestep eps-mean correction on N quantized-model
    trajectories started from their own noise seed (not the evaluation's)."""
    x_T = initial_noise(args.eps_correction, (fp.cfg.in_channels, fp.cfg.resolution, fp.cfg.resolution),
                        args.seed + 11)
    gen = torch.Generator(device=device).manual_seed(args.seed + 12)
    with timer() as t:
        stats = correct_eps_bias(qmodel.to(device), fp.to(device), sample, x_T.to(device), args.cali_batch_size, gen)
    return stats | {"eps_correction_seconds": t["seconds"]}


def quantize(fp, sample, args, logdir: Path, device):
    """Load --cali_ckpt, or calibrate by --quant_mode and save <logdir>/quantized.pt. -> (model, record)."""
    record = {"method": method_name(args), "weight_bit": args.weight_bit,
              "act_bit": args.act_bit if args.quant_act else None}
    if args.eps_correction < 0:
        raise SystemExit(f"--eps_correction {args.eps_correction}: give a number of trajectories >= 0 (0 = off)")
    if args.resume and not args.cali_ckpt:
        raise SystemExit("--resume needs --cali_ckpt (the calibrated checkpoint to resume from)")
    if args.resume_w and not (args.cali_ckpt and args.quant_mode == QuantMode.QDIFF.value):
        raise SystemExit("--resume_w needs --quant_mode qdiff and --cali_ckpt")
    # built here so that bad distillation flags fail before the calibration draw
    dq_config = dilatequant_config(args) if args.quant_mode == QuantMode.DILATEQUANT.value else None
    if args.cali_ckpt and not args.resume_w:
        qmodel, payload = load_quantized(args.cali_ckpt, fp)
        qmodel = qmodel.eval()
        record["method"] = payload["method"]                  # what it was calibrated with, not these flags
        if args.eps_correction and not record["method"].endswith(EPS_CORRECTED):
            record["method"] += EPS_CORRECTED
        if not args.eps_correction:
            return qmodel, record | {"calib_seconds": None, "peak_mem_mb": None}
        stats = eps_correction(qmodel, fp, sample, args, device)   # calib_seconds: the correction alone
        save_quantized(logdir / "quantized.pt", qmodel, record["method"], timesteps=args.timesteps,
                       skip_type=args.skip_type, cali_ckpt=str(args.cali_ckpt))
        return qmodel, record | stats | {"calib_seconds": stats["eps_correction_seconds"], "peak_mem_mb": None}
    stage, key = logdir / "quantize.json", stage_key(args, SAMPLING_ONLY)
    done = load_stage(stage, key)
    if done and (logdir / "quantized.pt").exists():
        print(f"[resume] {logdir / 'quantized.pt'} was calibrated with these settings: reusing it")
        qmodel, _ = load_quantized(logdir / "quantized.pt", fp)
        return qmodel.eval(), record | done
    if done is None and stage.exists():                       # units of other settings: start over
        print(f"[settings changed] {logdir}: earlier calibration units are removed")
        for unit_dir in UNIT_DIRS:
            shutil.rmtree(logdir / unit_dir, ignore_errors=True)
    save_stage(stage, key, {})                                # started; units written from here belong to it
    config, mode = quant_config(args), QuantMode(args.quant_mode)
    needs_data = config.quant_act or mode is QuantMode.QDIFF or (mode is QuantMode.DILATEQUANT and args.bkd)
    reset_peak_memory(device)
    calib, data_seconds, reused = None, None, False
    with timer() as t:
        if needs_data:
            calib, data_seconds, reused = calibration_set(fp, sample, args, logdir, device)
        if mode is QuantMode.BASELINE:
            qmodel = quantize_baseline(fp, config, calib, batch_size=args.cali_batch_size, seed=args.seed)
        elif mode is QuantMode.DILATEQUANT:
            qmodel = quantize_dilatequant(fp, config, sample.seq, calib, dq_config, logdir,
                                          batch_size=args.cali_batch_size, seed=args.seed,
                                          sigmas=(1 - alphas_cumprod(sample.betas)).sqrt())
        elif args.resume_w:
            qmodel, _ = load_quantized(args.cali_ckpt, fp)
            reconstruct_activations(qmodel, fp, calib, qdiff_settings(args), logdir, args.cali_batch_size)
        else:
            qmodel = quantize_qdiff(fp, config, calib, qdiff_settings(args), logdir, batch_size=args.cali_batch_size)
        stats = eps_correction(qmodel, fp, sample, args, device) if args.eps_correction else {}
    save_quantized(logdir / "quantized.pt", qmodel, record["method"], timesteps=args.timesteps,
                   skip_type=args.skip_type)
    # a reused calibration set counts with the seconds of its original draw (None: not recorded, not counted)
    seconds = t["seconds"] + ((data_seconds or 0.0) if reused else 0.0)
    cost = stats | {"calib_seconds": seconds, "calib_data_seconds": data_seconds, "calib_data_reused": reused,
                    "peak_mem_mb": peak_memory_mb(device)}
    save_stage(stage, key, cost)
    shutil.rmtree(logdir / "sample_batches", ignore_errors=True)    # samples of an earlier model
    return qmodel.eval(), record | cost


def inference(model, compile_model: bool):
    """The eps callable to sample with: a QuantModel's weights are quantized once (quant.model.frozen);
    --compile wraps it in torch.compile."""
    context = frozen(model) if isinstance(model, QuantModel) else nullcontext(model)
    return context, (torch.compile(model) if compile_model else model)


def quantize_once(fp, sample, args, logdir: Path, device, shard: dist.Shard):
    """quantize() on rank 0; the other ranks wait for its quantized.pt and load it."""
    if shard.world == 1 or args.cali_ckpt and not args.eps_correction and not args.resume_w:
        return quantize(fp, sample, args, logdir, device)
    result = quantize(fp, sample, args, logdir, device) if shard.main else None
    dist.barrier(shard)
    if shard.main:
        return result
    qmodel, payload = load_quantized(logdir / "quantized.pt", fp)
    return qmodel.eval(), {"method": payload["method"], "weight_bit": args.weight_bit,
                           "act_bit": args.act_bit if args.quant_act else None}


def main(argv=None) -> dict | None:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config)
    set_seed(args.seed)
    shard, device = dist.setup(args.device)
    logdir = Path(args.logdir)
    if shard.main:
        save_args(logdir, args)

    fp = load_unet(cfg, args.ckpt).to(device)
    sample = make_sampler(make_betas(cfg.diffusion), args.timesteps, args.skip_type, args.eta, args.sample_type)
    model, record = fp, {"method": "fp", "weight_bit": 32, "act_bit": None}
    if args.ptq:
        model, record = quantize_once(fp, sample, args, logdir, device, shard)
        model.check_timesteps(sample.seq)

    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    cache = sample_cache(logdir, args, device) if shard.main else logdir / "sample_batches"
    dist.barrier(shard)
    n_batches = -(-args.max_images // args.batch_size)
    context, eps = inference(model, args.compile)
    with context:
        mine = sample_batches(eps, sample, args.max_images, shape, args.batch_size, args.seed, device,
                              shard.batches(n_batches), cache, progress=shard.main)
    done = dist.gather_to_main(shard, mine)
    if not shard.main:
        dist.teardown(shard)
        return None
    images, seconds = join_batches(done)
    save_samples(logdir, images)
    record |= {"n_samples": len(images), "steps": args.timesteps, "skip_type": args.skip_type, "eta": args.eta,
               "seed": args.seed, "config": str(args.config), "sampling_seconds": seconds,
               "processes": shard.world, "compiled": args.compile}
    ref = args.ref or ("mnist" if cfg.name == "mnist" else None)
    if not args.no_fid:
        if ref is None:
            raise SystemExit(f"no FID reference for {cfg.name} offline: pass --ref real_images.npz or --no_fid")
        from tools.metrics import evaluate                       # FID's packages are needed only here
        record |= evaluate(images, ref=ref, device=device)
    write_results(logdir, **record)
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    dist.teardown(shard)
    return record
