"""Latent Diffusion pipeline (`scripts/sample_diffusion_ldm.py`): check -> load -> quantize the UNet (or load
--cali_ckpt) -> sample with guidance -> decode -> evaluate -> results.json, through the run shared with DDIM
(experiments/run.py).

Flags follow Q-Diffusion's `sample_diffusion_ldm.py` (seed 003): -r/--resume (a checkpoint, its config.yaml
beside it) or --config (a config that names its own checkpoint, like the embedded one), -n, --batch_size,
-c/--custom_steps, -e/--eta, --seed, -l, plus the quantization flags of the DDIM script, --scale, --sampler.
Only the UNet is quantized; the first stage and the conditioner stay FP. Class-conditional models sample
classes 0, 1, ... in turn (image i gets class i mod classes) with classifier-free guidance against the null
class; calibration data comes from guided FP trajectories of random classes, both halves of each guided call.
"""
from __future__ import annotations

import argparse
import math
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn

from common.device import check_device, set_seed
from common.errors import UsageError
from common.files import file_digest
from diffusion.samplers import Sampler, make_sampler
from diffusion.sampling import initial_noise
from experiments import dist
from experiments.flags import (HelpFormatter, add_common_flags, add_quant_flags, check_input_files,
                               check_no_quant_flags, check_quant_flags, check_rules, parse_flags)
from experiments.quantize import Preloaded, QuantJob, cached_calibration, preload
from experiments.run import Family, check_logdir, execute, run_identity
from experiments.runtime import timer
from ldm.checkpoint import load_model_from_config
from ldm.modules.diffusionmodules.util import make_beta_schedule
from ldm.util import load_config
from quant.bias_correction import correct_eps_bias
from quant.calib_data import CalibSet

SAMPLERS = {"ddim": "ddim", "plms": "plms", "dpm": "dpm_solver"}
SAMPLING_FLAGS = ("n_samples", "batch_size", "backend")
CALIB_SETTINGS = ("custom_steps", "eta", "sampler", "scale", "seed", "cali_n", "cali_st", "cali_per_traj")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Sample (and optionally quantize) a latent diffusion model, then evaluate.",
                                formatter_class=HelpFormatter)
    p.add_argument("-r", "--resume", default=None, help="a checkpoint (model.ckpt) with its config.yaml beside it")
    p.add_argument("--config", default=None, help="a config; it may name its checkpoint (ckpt:), like "
                                                  "configs/latent-diffusion/mnist-ldm-kl-4.yaml")
    p.add_argument("--ckpt", default=None, help="the checkpoint for --config (default: the one it names)")
    p.add_argument("-n", "--n_samples", type=int, default=1000, help="number of images to sample")
    p.add_argument("--batch_size", type=int, default=100)
    p.add_argument("-c", "--custom_steps", type=int, default=20, help="sampling steps")
    p.add_argument("-e", "--eta", type=float, default=0.0, help="DDIM noise, 0..1 (DDIM only)")
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    p.add_argument("--dpm", action="store_true", help="Q-Diffusion's flag: the DPM-Solver sampler (= --sampler dpm)")
    p.add_argument("--scale", type=float, default=3.0, help="classifier-free guidance scale (conditional models)")
    p.add_argument("--cond", action="store_true",
                   help="Q-Diffusion compatibility: conditional models always calibrate on guided trajectories")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("-l", "--logdir", required=True)
    p.add_argument("--ref", default=None, help="FID reference: a name (e.g. mnist) or an .npz of real uint8 NHWC "
                                                "images (default: the config's image.reference, if any)")
    p.add_argument("--no_fid", action="store_true", help="only sample")
    add_common_flags(p)
    add_quant_flags(p, resume_flag=False)        # -r/--resume is the checkpoint here, as in Q-Diffusion
    return p


# ---------------------------------------------------------------------------------------------------
# Config and checkpoint, checks
# ---------------------------------------------------------------------------------------------------

def resolve(args) -> tuple[Path, Path | None]:
    """(config path, checkpoint path or None for the config's own): -r finds config.yaml beside the checkpoint."""
    if args.resume:
        ckpt = Path(args.resume)
        config = Path(args.config) if args.config else ckpt.parent / "config.yaml"
        if not config.is_file():
            raise UsageError(f"-r {ckpt}: no config.yaml beside it", "put the model's config.yaml there, or pass "
                             "--config configs/latent-diffusion/<model>.yaml")
        return config, ckpt
    if not args.config:
        raise UsageError("give the model: -r path/to/model.ckpt (config.yaml beside it) or --config CONFIG.yaml",
                         "the embedded model: --config configs/latent-diffusion/mnist-ldm-kl-4.yaml")
    return Path(args.config), Path(args.ckpt) if args.ckpt else None


# How this script's flags name its settings (txt2img passes its own: --ddim_steps gives custom_steps).
FLAG_NAMES = {"custom_steps": "-c/--custom_steps", "eta": "-e/--eta", "n_samples": "-n/--n_samples",
              "batch_size": "--batch_size", "scale": "--scale", "sampler ddim": "--sampler ddim",
              "sampler plms": "--sampler plms", "sampler dpm": "--sampler dpm", "logdir": "-l/--logdir"}


def check_flags(args, config: dict, names: dict = FLAG_NAMES) -> None:
    """Every flag's range and input file, before any work or write; errors name the flags by `names`."""
    if args.dpm:
        args.sampler = "dpm"
    steps = int(config["model"]["params"].get("timesteps", 1000))
    check_rules(args, [("custom_steps", lambda v: 1 <= v < steps, f"1..{steps - 1}"),
                       ("eta", lambda v: 0.0 <= v <= 1.0, "[0, 1]"), ("n_samples", lambda v: v >= 1, ">= 1"),
                       ("batch_size", lambda v: v >= 1, ">= 1"),
                       ("scale", lambda v: math.isfinite(v) and v >= 1.0, ">= 1, finite (1 = no guidance)")], names)
    try:
        make_sampler(SAMPLERS[args.sampler], args.custom_steps, config_alphas_cumprod(config)).timesteps
    except ValueError as e:                            # e.g. CompVis's uniform rule leaving the schedule
        raise UsageError(f"{names['custom_steps']} {args.custom_steps} ({args.sampler}): {e}") from None
    if args.eta > 0 and args.sampler != "ddim":
        raise UsageError(f"{names['eta']} {args.eta} is a DDIM setting; {names['sampler ' + args.sampler]} is "
                         f"deterministic", f"use {names['eta']} 0, or {names['sampler ddim']}")
    check_device(args.device)
    check_no_quant_flags(args)
    if args.ptq:
        check_quant_flags(args)
    check_image_settings(config, args)
    check_input_files(args, args.n_samples, names["n_samples"])
    model_ckpt = checkpoint_path(config, resolve(args)[1])
    if model_ckpt is None or not model_ckpt.is_file():
        raise UsageError(f"no model checkpoint at {model_ckpt}" if model_ckpt else "the config names no checkpoint",
                         "pass -r path/to/model.ckpt or --ckpt PATH")
    if not args.no_fid:
        from evaluation.fid import check_reference
        check_reference(reference(args, config))


def decoded_size(config: dict, args=None) -> int:
    """Height of a decoded image: the latent size times the first stage's downsampling (2 per level)."""
    p = config["model"]["params"]
    levels = len(p.get("first_stage_config", {}).get("params", {}).get("ddconfig", {}).get("ch_mult", [1]))
    return latent_shape(config, args)[1] * 2 ** (levels - 1)


def check_image_settings(config: dict, args) -> None:
    """The config's `image:` section (not part of the CompVis format) fits its model: the crop leaves an image,
    the null class is one of the class embedder's labels."""
    image = config.get("image", {}) or {}
    crop, size = int(image.get("crop", 0)), decoded_size(config, args)
    if crop < 0 or 2 * crop >= size:
        raise UsageError(f"config image.crop {crop} leaves nothing of the {size}x{size} decoded images",
                         f"use 0 <= crop < {(size + 1) // 2}")
    cond = config["model"]["params"].get("cond_stage_config")
    if isinstance(cond, dict) and str(cond.get("target", "")).endswith("ClassEmbedder"):
        n_classes = int((cond.get("params") or {}).get("n_classes", 1000))
        null = image.get("null_class", n_classes - 1)
        if not (isinstance(null, int) and 0 <= null < n_classes):
            raise UsageError(f"config image.null_class {null} is not one of the model's {n_classes} class labels",
                             f"use 0..{n_classes - 1} (the class trained as unconditional)")


def reference(args, config: dict) -> str | None:
    return args.ref or config.get("image", {}).get("reference")


def checkpoint_path(config: dict, ckpt: Path | None) -> Path | None:
    path = ckpt or (Path(config["ckpt"]) if config.get("ckpt") else None)
    if path is not None and not path.is_absolute() and not path.exists():
        path = Path(__file__).resolve().parents[1] / path
    return path


def input_digests(args) -> dict:
    config_path, ckpt = resolve(args)
    config = load_config(config_path)
    path = checkpoint_path(config, ckpt)
    return {"config": file_digest(config_path), "ckpt": file_digest(path) if path and path.is_file() else None,
            "cali_data": file_digest(args.cali_data_path) if args.ptq else None,
            "cali_ckpt": file_digest(args.cali_ckpt) if args.ptq else None, "fp_samples": file_digest(args.fp_samples)}


def identity(args) -> dict:
    """The run's settings and input digests (experiments.run.run_identity), from its parsed flags."""
    return run_identity(args, input_digests(args))


# ---------------------------------------------------------------------------------------------------
# Conditioning and the guided sampler
# ---------------------------------------------------------------------------------------------------

class Conditioning:
    """How a LatentDiffusion is conditioned: None (unconditional), class labels (ClassEmbedder; images take
    classes 0, 1, ... in turn, calibration trajectories random classes, guidance against the null class) or
    text (FrozenCLIPEmbedder; prompts given per image and per calibration trajectory, guidance against "")."""

    def __init__(self, ldm: nn.Module, config: dict, prompts: list[str] | None = None,
                 cali_prompts: list[str] | None = None):
        self.ldm = ldm
        encoder = getattr(ldm, "cond_stage_model", None)
        self.kind = None if encoder is None else type(encoder).__name__
        if self.kind not in (None, "ClassEmbedder", "FrozenCLIPEmbedder"):
            raise UsageError(f"no sampling route for a model conditioned by {self.kind}")
        if self.kind == "FrozenCLIPEmbedder" and not prompts:
            raise UsageError("a text-conditioned model samples from prompts", "use scripts/txt2img.py --prompt ...")
        self.prompts, self.cali_prompts = prompts, cali_prompts or prompts
        if self.kind == "ClassEmbedder":
            self.n_labels = encoder.embedding.num_embeddings
            self.null = config.get("image", {}).get("null_class", self.n_labels - 1)
            self.classes = self.n_labels - 1                     # all but the null class

    def for_images(self, lo: int, hi: int):
        """What images lo..hi-1 are conditioned on (labels, prompts, or None)."""
        if self.kind == "ClassEmbedder":
            return torch.arange(lo, hi) % self.classes
        if self.kind == "FrozenCLIPEmbedder":
            return [self.prompts[i % len(self.prompts)] for i in range(lo, hi)]
        return None

    def for_trajectories(self, n: int, seed: int):
        """What n calibration trajectories are conditioned on: random classes (seeded), prompts in turn."""
        if self.kind == "ClassEmbedder":
            return torch.randint(0, self.classes, (n,), generator=torch.Generator().manual_seed(seed))
        if self.kind == "FrozenCLIPEmbedder":
            return [self.cali_prompts[i % len(self.cali_prompts)] for i in range(n)]
        return None

    @torch.no_grad()
    def pair(self, items, device):
        """(cond, uncond) for the sampler; (None, None) for an unconditional model."""
        if self.kind is None:
            return None, None
        key = self.ldm.cond_stage_key
        if self.kind == "ClassEmbedder":
            labels = items.to(device)
            return (self.ldm.get_learned_conditioning({key: labels}),
                    self.ldm.get_learned_conditioning({key: torch.full_like(labels, self.null)}))
        return self.ldm.get_learned_conditioning(list(items)), self.ldm.get_learned_conditioning([""] * len(items))


def guided_halves(cond: Conditioning, scale: float) -> int:
    """Network rows per trajectory and call: 2 under classifier-free guidance (uncond, cond), else 1."""
    return 2 if cond.kind is not None and scale != 1.0 else 1


def calibration_set(ldm, cond: Conditioning, sampler: Sampler, args, logdir: Path, device, inputs: dict,
                    shape: tuple[int, int, int], preloaded: Preloaded) -> tuple[CalibSet, float | None, bool]:
    """The run's calibration set (experiments.quantize.cached_calibration), drawn from guided FP trajectories
    of random classes (their own noise seed), every network input of a chosen call kept with its conditioning
    (both halves of a guided call)."""
    unet = ldm.model.diffusion_model

    def start(n_traj: int):
        items = cond.for_trajectories(n_traj, args.seed + 13)

        def fp_sample(x, on_step, rows=None):
            rows = list(range(len(x))) if rows is None else [int(r) for r in rows]
            c, u = cond.pair(_take(items, rows), device)
            hook = unet.register_forward_pre_hook(lambda m, a, kw: on_step(a[0], a[1], kw), with_kwargs=True)
            try:
                sampler.sample(ldm.apply_model, x.to(device), c, u, args.scale,
                               generator=torch.Generator(device=device).manual_seed(args.seed + 17))
            finally:
                hook.remove()

        return initial_noise(n_traj, shape, args.seed + 7), fp_sample

    return cached_calibration(args, logdir, CALIB_SETTINGS, inputs, start, sampler.calls, sampler.timesteps,
                              preloaded, halves=guided_halves(cond, args.scale))


class _Network(nn.Module):
    """A callable network(x, t, **cond) in the UNet's place (ldm.model.diffusion_model must be a module)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, t, **cond):
        return self.fn(x, t, **cond)


def eps_correction(qmodel, ldm, cond: Conditioning, sampler: Sampler, args, device,
                   shape: tuple[int, int, int]) -> dict:
    """--eps_correction N: estimate and install the per-timestep eps-mean correction (quant.bias_correction) on N
    guided trajectories of the quantized model through this run's sampler, with their own noise seed and the
    calibration trajectories' kind of conditioning (random classes, the calibration prompts), both guidance
    halves included."""
    unet = ldm.model.diffusion_model
    n = args.eps_correction
    c, u = cond.pair(cond.for_trajectories(n, args.seed + 19), device)

    def sample(network, x_T: torch.Tensor, generator=None) -> torch.Tensor:
        ldm.model.diffusion_model = _Network(network)
        try:
            return sampler.sample(ldm.apply_model, x_T, c, u, args.scale, generator=generator)
        finally:
            ldm.model.diffusion_model = unet

    x_T = initial_noise(n, shape, args.seed + 11).to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed + 12)
    with timer() as t:
        stats = correct_eps_bias(qmodel, unet, sample, x_T, args.cali_batch_size, gen)
    return stats | {"eps_correction_seconds": t["seconds"]}


def config_alphas_cumprod(config: dict):
    """ᾱ_t of the config's schedule (what the model computes), to know the sampler's timesteps before loading."""
    import numpy as np
    p = config["model"]["params"]
    betas = make_beta_schedule(p.get("beta_schedule", "linear"), int(p.get("timesteps", 1000)),
                               p.get("linear_start", 1e-4), p.get("linear_end", 2e-2), p.get("cosine_s", 8e-3))
    return np.cumprod(1.0 - betas)


def latent_shape(config: dict, args) -> tuple[int, int, int]:
    """[C, h, w] of the latents, from the config (or txt2img's --C, --H/--f, --W/--f), before loading."""
    if getattr(args, "latent_shape", None):
        return tuple(args.latent_shape)
    p = config["model"]["params"]
    size = int(p.get("image_size", 256))
    return int(p.get("channels", 3)), size, size


def _take(items, rows: list[int]):
    if items is None:
        return None
    return items[torch.as_tensor(rows)] if isinstance(items, torch.Tensor) else [items[r] for r in rows]


def load_model(args, device) -> tuple[nn.Module, dict]:
    config_path, ckpt = resolve(args)
    config = load_config(config_path)
    return load_model_from_config(config, checkpoint_path(config, ckpt), config_path=config_path).to(device), config


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------

def sampler_record(args, sampler: Sampler) -> dict:
    return {"sampler": args.sampler, "steps": args.custom_steps, "eta": args.eta, "scale": args.scale,
            "network_calls": sampler.calls}


def family(args, ldm, config: dict, sampler: Sampler, device, inputs: dict, calibration: Preloaded,
           cond: Conditioning | None = None, count_flag: str = "n_samples", record: dict | None = None,
           autocast: bool = False, metrics=None) -> Family:
    """The LDM and its guided sampler as a run's Family: the quantizer wraps the UNet
    (ldm.model.diffusion_model); sampling swaps the network in and decodes with the FP first stage.
    autocast: sample under float16 autocast (CUDA only); metrics(images) -> more fields of results.json."""
    cond = cond or Conditioning(ldm, config)
    unet, logdir = ldm.model.diffusion_model, Path(args.logdir)
    abar = ldm.alphas_cumprod.double().cpu()
    shape = latent_shape(config, args)
    job = QuantJob(fp=unet, schedule=sampler.timesteps, sigmas=(1 - abar).sqrt(),
                   draw_calibration=lambda: calibration_set(ldm, cond, sampler, args, logdir, device, inputs,
                                                            shape, calibration),
                   eps_correction=lambda q: eps_correction(q, ldm, cond, sampler, args, device, shape),
                   inputs=inputs, sampling_flags=SAMPLING_FLAGS, calibration=calibration,
                   network={"family": "ldm", "unet_config": config["model"]["params"]["unet_config"]})
    noise = initial_noise(args.n_samples, shape, args.seed)
    crop = int(config.get("image", {}).get("crop", 0))

    def install(network: nn.Module) -> None:
        ldm.model.diffusion_model = network

    @torch.no_grad()
    def draw(b: int, gen: torch.Generator, tick) -> torch.Tensor:
        lo, hi = b * args.batch_size, min((b + 1) * args.batch_size, args.n_samples)
        c, u = cond.pair(cond.for_images(lo, hi), device)
        start = 0 if getattr(args, "fixed_code", False) else lo      # txt2img --fixed_code: the first batch's noise
        x_T = noise[start:start + hi - lo].to(device)
        with torch.autocast("cuda", dtype=torch.float16) if autocast and device.type == "cuda" else nullcontext():
            z = sampler.sample(ldm.apply_model, x_T, c, u, args.scale, on_step=tick, generator=gen)
            x = ldm.decode_first_stage(z).float()
        return x[..., crop:-crop, crop:-crop] if crop else x

    record = {"config": str(resolve(args)[0]), "conditioning": cond.kind,
              "guided": guided_halves(cond, args.scale) == 2} | (record or {})
    return Family(job=job, install=install, draw=draw, n_images=args.n_samples, batch_size=args.batch_size,
                  count_flag=count_flag, steps=sampler.calls, sampler=sampler_record(args, sampler),
                  reference=None if args.no_fid else reference(args, config),
                  fp_samples=None if args.no_fid else args.fp_samples, record=record, metrics=metrics)


def run(args, make_conditioning=None, names: dict = FLAG_NAMES, **family_options) -> dict | None:
    """Check everything (flags, files, --cali_ckpt and --cali_data_path against the sampler, the log directory)
    before any work or write, then load and execute. make_conditioning(ldm, config) -> Conditioning (default:
    the model's own, unconditional or class labels); `names`: how the caller's flags name the settings;
    family_options go to family() (count_flag, record, autocast)."""
    config = load_config(resolve(args)[0])
    check_flags(args, config, names)
    timesteps = make_sampler(SAMPLERS[args.sampler], args.custom_steps, config_alphas_cumprod(config)).timesteps
    calibration = preload(args, timesteps, latent_shape(config, args))
    inputs = input_digests(args)
    identity = run_identity(args, inputs)
    check_logdir(Path(args.logdir), names["logdir"], identity, args.overwrite)
    set_seed(args.seed)
    shard, device = dist.setup(args.device)
    try:
        ldm, config = load_model(args, device)
        sampler = make_sampler(SAMPLERS[args.sampler], args.custom_steps, ldm.alphas_cumprod, args.eta)
        cond = make_conditioning(ldm, config) if make_conditioning else None
        fam = family(args, ldm, config, sampler, device, inputs, calibration, cond, **family_options)
        return execute(args, fam, identity, shard, device, Path(args.logdir))
    finally:
        dist.teardown(shard)


def main(argv=None) -> dict | None:
    return run(parse_flags(build_parser, argv))
