"""A full-size smoke run of one public LDM/SD config with random weights of the full architecture: build, wrap,
calibrate on a handful of guided FP samples, dilate, distil a few iterations per unit, save, reload, and sample
one image in a few steps with guidance; for DilateQuant W4A4 (split, TPQ) or Q-Diffusion W4A8 (split).

    python tools/smoke_run.py --config configs/stable-diffusion/v1-inference.yaml --method dilatequant \\
        --out runs/smoke/sd_v1_dq
    # which unit's distillation peaks: the memory of each call of these functions instead of the method's stages
    python tools/smoke_run.py --config configs/latent-diffusion/lsun_bedrooms-ldm-vq-4.yaml --out runs/smoke/watch \\
        --watch quant.distill:cache_unit_io,train_stages

Measured, for tools/dry_run.py --smoke (which runs this in a fresh process per config and method and sets the
numbers next to its predictions): the peak resident memory of the quantization (calibration, dilation and
distillation: the process's high-water mark, reset before it), counted as the dry run counts it (FP UNet +
quantized UNet + ...; the autoencoder, the conditioner and the runtime that were resident before are taken
out), and (DilateQuant) the seconds per distillation iteration of the largest unit (by cache, the dry run's), trained
once more afterwards on its own cached inputs at the run's batch: (time of N iterations - time of 0) / N.

Weights are N(0, 1/fan_in) (the public configs zero-initialise some output layers, which would hide errors);
text conditioning is random CLIP token ids (no tokenizer is needed), class conditioning random labels.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import importlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from common.device import release_free_memory  # noqa: E402
from common.files import write_json  # noqa: E402
from common.errors import UsageError  # noqa: E402
from diffusion.samplers import make_sampler  # noqa: E402
from ldm.util import instantiate_from_config, load_config  # noqa: E402
from quant.calib_data import draw_over_steps, trajectories_for  # noqa: E402
from quant.checkpoint import load_quantized, save_quantized  # noqa: E402
from quant.distill import DistillConfig, DistillObjective, cache_unit_io, train_unit  # noqa: E402
from quant.methods.dilatequant import DilateQuantConfig, quantize_dilatequant  # noqa: E402
from quant.methods.qdiff import QDiffConfig, quantize_qdiff  # noqa: E402
from quant.model import frozen  # noqa: E402
from quant.settings import QuantConfig  # noqa: E402

METHODS = {"dilatequant": QuantConfig(weight_bit=4, act_bit=4, split=True, temporal=True),
           "qdiff": QuantConfig(weight_bit=4, act_bit=8, split=True)}
GB = 1024 ** 3


def memory_gb(field: str) -> float:
    """VmRSS (now) or VmHWM (the high-water mark) of this process, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / GB
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_memory() -> None:
    """Reset VmHWM to the current RSS (Linux: `echo 5 > /proc/self/clear_refs`)."""
    Path("/proc/self/clear_refs").write_text("5")


# the top-level steps of each method's function (quant/methods/*.py), whose peaks are recorded one by one
STAGES = {"dilatequant": ("quant.methods.dilatequant", ("QuantModel", "dilate", "calibrate", "distill")),
          "qdiff": ("quant.methods.qdiff", ("QuantModel", "reconstruct_weights", "reconstruct_activations"))}


class StageMemory:
    """The resident high-water mark of each stage of a run, relative to a baseline RSS: a stage is a call of one
    of the named functions of a module (wrapped while `watching`), or a block under `stage(name)`; calls nested
    inside a stage belong to it. Records: {stage, seconds, rss_before_gb, peak_gb, rss_after_gb}."""

    def __init__(self, baseline_gb: float):
        self.baseline, self.records, self._depth = baseline_gb, [], 0

    @contextlib.contextmanager
    def stage(self, name: str):
        if self._depth:
            yield
            return
        self._depth += 1
        release_free_memory()
        before, start = memory_gb("VmRSS"), time.perf_counter()
        reset_peak_memory()
        try:
            yield
        finally:
            self._depth -= 1
            self.records.append({"stage": name, "seconds": time.perf_counter() - start,
                                 "rss_before_gb": before - self.baseline, "peak_gb": memory_gb("VmHWM") - self.baseline,
                                 "rss_after_gb": memory_gb("VmRSS") - self.baseline})

    @contextlib.contextmanager
    def watching(self, module_name: str, names: tuple[str, ...]):
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise UsageError(f"cannot watch {module_name}: {e}", "name an importable module, e.g. quant.distill")
        missing = [n for n in names if not callable(getattr(module, n, None))]
        if missing:
            raise UsageError(f"{module_name} has no function {missing[0]} to watch",
                             f"name functions of {module_name}")
        originals = {n: getattr(module, n) for n in names}

        def wrapped(name, fn):
            @functools.wraps(fn, updated=())
            def call(*args, **kwargs):
                with self.stage(name):
                    return fn(*args, **kwargs)
            return call
        for n, fn in originals.items():
            setattr(module, n, wrapped(n, fn))
        try:
            yield self
        finally:
            for n, fn in originals.items():
                setattr(module, n, fn)

    def peak_gb(self) -> float:
        return max(r["peak_gb"] for r in self.records)


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights N(0, 1/fan_in) for every tensor of dim >= 2, biases 0, norms as their own init."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
        elif name.endswith("bias"):
            p.zero_()
    return model


class Conditions:
    """(cond, uncond) of n images: random CLIP token ids against the empty prompt's, random class labels against
    the null class, or nothing for an unconditional model."""

    def __init__(self, ldm):
        self.ldm, encoder = ldm, getattr(ldm, "cond_stage_model", None)
        self.kind = None if encoder is None else type(encoder).__name__
        self.encoder = encoder

    @torch.no_grad()
    def pair(self, n: int, gen: torch.Generator):
        if self.kind is None:
            return None, None
        if self.kind == "ClassEmbedder":
            classes = self.encoder.embedding.num_embeddings
            labels = torch.randint(0, classes - 1, (n,), generator=gen)
            key = self.ldm.cond_stage_key
            return (self.ldm.get_learned_conditioning({key: labels}),
                    self.ldm.get_learned_conditioning({key: torch.full_like(labels, classes - 1)}))
        vocab, length = self.encoder.transformer.get_input_embeddings().weight.shape[0], self.encoder.max_length
        bos, eos = vocab - 2, vocab - 1                                 # CLIP's <|startoftext|>, <|endoftext|>
        ids = torch.randint(0, vocab - 2, (n, length), generator=gen)
        ids[:, 0], ids[:, length // 2:] = bos, eos
        empty = torch.full((n, length), eos)
        empty[:, 0] = bos
        return self.ldm.get_learned_conditioning(ids), self.ldm.get_learned_conditioning(empty)


MARKER = ".smoke_run"


def fresh_directory(out: Path) -> None:
    """An empty `out` for this run: a smoke run measures a run from scratch, and the distillation would reload the
    units a previous run left there. A previous smoke run's directory (marked) is cleared; any other non-empty
    directory is refused."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise UsageError(f"--out {out} is not empty and not a smoke run's directory",
                             "choose a new --out (a smoke run starts from an empty directory)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by tools/smoke_run.py; cleared by its next run here\n")


def calibration(ldm, sampler, cond: Conditions, cali_n: int, scale: float, seed: int):
    """cali_n network inputs of guided FP trajectories (every step of each: per_traj = steps), with their contexts."""
    unet, halves = ldm.model.diffusion_model, 1 if cond.kind is None else 2
    per_traj = len(sampler.timesteps)
    n_traj = trajectories_for(math.ceil(cali_n / halves), per_traj)
    shape = (ldm.channels, ldm.image_size, ldm.image_size)
    x_T = torch.randn((n_traj, *shape), generator=torch.Generator().manual_seed(seed + 7))
    pairs = cond.pair(n_traj, torch.Generator().manual_seed(seed + 13))

    def fp_sample(x, on_step, rows=None):
        rows = list(range(len(x))) if rows is None else [int(r) for r in rows]
        c, u = (None, None) if pairs[0] is None else (pairs[0][rows], pairs[1][rows])
        hook = unet.register_forward_pre_hook(lambda m, a, kw: on_step(a[0], a[1], kw), with_kwargs=True)
        try:
            sampler.sample(ldm.apply_model, x, c, u, scale)
        finally:
            hook.remove()
    return draw_over_steps(fp_sample, x_T, cali_n, sampler.calls, per_traj, torch.Generator().manual_seed(seed),
                           halves=halves)


def seconds_per_iteration(qmodel, fp, unit: str, calib, cfg: DistillConfig, iters: int = 3) -> float:
    """(time of `iters` distillation iterations of `unit` - time of 0) / iters, on a copy of the model."""
    q = copy.deepcopy(qmodel)
    data = cache_unit_io(q, fp, unit, calib, cfg.cache_batch_size)
    times = {}
    for n in (0, iters):
        start = time.perf_counter()
        train_unit(q, unit, data, DistillObjective(cfg), dataclasses.replace(cfg, iters=n), seed=0)
        times[n] = time.perf_counter() - start
    data.release()
    return (times[iters] - times[0]) / iters


def smoke(config_path: Path, method: str, out: Path, cali_n: int = 4, steps: int = 2, batch: int = 2,
          iters: int = 2, scale: float = 3.0, seed: int = 0, watch: tuple[str, tuple[str, ...]] | None = None) -> dict:
    """One smoke run (see module doc) -> measurements and what was checked."""
    from tools.dry_run import describe
    if method not in METHODS:
        raise UsageError(f"--method {method}: choose one of {sorted(METHODS)}")
    fresh_directory(out)
    torch.manual_seed(seed)
    config = load_config(config_path)
    ldm = randomize(instantiate_from_config(config["model"]), seed).eval()
    unet = ldm.model.diffusion_model
    fp_unet_gb = sum(p.numel() * p.element_size() for p in unet.parameters()) / GB
    num_timesteps = int(config["model"]["params"].get("timesteps", 1000))
    sampler = make_sampler("ddim", steps, ldm.alphas_cumprod)
    cond = Conditions(ldm)
    config_q = METHODS[method]
    distill = DistillConfig(iters=iters, batch_size=batch, cache_batch_size=batch, seed=seed)
    release_free_memory()
    rss_before = memory_gb("VmRSS")
    stages = StageMemory(rss_before)
    start = time.perf_counter()
    with stages.stage("calibration data"):
        calib = calibration(ldm, sampler, cond, cali_n, scale, seed)
    with stages.watching(*(watch or STAGES[method])):
        if method == "dilatequant":
            qmodel = quantize_dilatequant(unet, config_q, sampler.timesteps, calib,
                                          DilateQuantConfig(distill=distill), out, batch_size=batch)
        else:
            qdiff = QDiffConfig(weight_iters=iters, act_iters=iters, batch_size=batch, seed=seed)
            qmodel = quantize_qdiff(unet, config_q, calib, qdiff, out, batch_size=batch)
    quant_seconds = time.perf_counter() - start
    peak = stages.peak_gb() + rss_before
    save_quantized(out / "quantized.pt", qmodel, method)
    reloaded, _ = load_quantized(out / "quantized.pt", unet)
    reloaded.check_timesteps(sampler.timesteps)
    c, u = cond.pair(1, torch.Generator().manual_seed(seed + 1))
    shape = (1, ldm.channels, ldm.image_size, ldm.image_size)
    ldm.model.diffusion_model = reloaded
    with torch.no_grad(), frozen(reloaded):
        image = ldm.decode_first_stage(sampler.sample(ldm.apply_model, torch.randn(shape), c, u, scale))
    ldm.model.diffusion_model = unet
    if not bool(torch.isfinite(image).all()):
        raise RuntimeError(f"{config_path.name} {method}: the sampled image is not finite")
    row, _ = describe(config_path, cali_n, steps, [(4, 4)])
    largest = row["largest"]
    # BKD's iteration (the dry run plans DilateQuant); Q-Diffusion's passes train other parameters
    measured_iter = seconds_per_iteration(qmodel, unet, largest, calib, distill) if method == "dilatequant" else None
    return {"config": config_path.stem, "method": method, "cali_n": len(calib.t), "steps": steps, "batch": batch,
            "iters": iters, "num_timesteps": num_timesteps, "image_shape": list(image.shape),
            "quantization_seconds": quant_seconds, "largest_unit": largest,
            "rss_before_gb": rss_before, "peak_rss_gb": peak, "fp_unet_gb": fp_unet_gb,
            "quantization_peak_gb": peak - rss_before + fp_unet_gb, "seconds_per_iteration": measured_iter,
            "stages": stages.records,
            "threads": torch.get_num_threads()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a public LDM/SD config")
    p.add_argument("--method", default="dilatequant", choices=sorted(METHODS))
    p.add_argument("--out", required=True, help="run directory (units, quantized.pt)")
    p.add_argument("--cali_n", type=int, default=4)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=2, help="distillation batch (and the timed iterations')")
    p.add_argument("--iters", type=int, default=2, help="distillation iterations per unit")
    p.add_argument("--json", default=None, help="write the measurements here")
    p.add_argument("--watch", default=None, metavar="MODULE:NAME,...",
                   help="record the memory of calls of these functions of MODULE instead of the method's stages "
                        "(e.g. quant.distill:cache_unit_io,train_stages: which unit's distillation peaks)")
    args = p.parse_args(argv)
    watch = None
    if args.watch is not None:
        module, _, names = args.watch.partition(":")
        if not module or not names:
            raise UsageError(f"--watch {args.watch}: expected MODULE:NAME[,NAME...]",
                             "e.g. --watch quant.distill:cache_unit_io,train_stages")
        watch = (module, tuple(names.split(",")))
    for flag in ("cali_n", "steps", "batch", "iters"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} {getattr(args, flag)} is out of range: use >= 1")
    record = smoke(Path(args.config), args.method, Path(args.out), args.cali_n, args.steps, args.batch, args.iters,
                   watch=watch)
    print(json.dumps(record, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, record)
    return record


if __name__ == "__main__":
    from common.errors import entry_point
    entry_point(main)
