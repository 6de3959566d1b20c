"""One sampling run, for any model family: lock the log directory -> quantize once (or load --cali_ckpt) ->
sample, sharded over torchrun processes, cached per batch -> FID -> publish samples and results.json.

A model family's pipeline (experiments/ddim_task.py, experiments/ldm_task.py) checks its flags and the log
directory (`check_logdir`), loads its model, and describes the run as a `Family`; everything after that is here,
shared. A finished run is never lost to a rerun: a rerun with other settings is refused unless --overwrite, and
even then the old samples and record stay in place until the new ones are published, record last.
"""
from __future__ import annotations

import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from common.errors import UsageError
from common.files import file_digest
from diffusion.sampling import SAMPLE_FILES, join_batches, run_batches, save_samples
from experiments import dist
from experiments.flags import corrects_output
from experiments.quantize import EVALUATION, QuantJob, quantize, result_settings
from experiments.runtime import (PREVIOUS_RUN, canonical, load_stage, locked, provenance, recorded_identity,
                                 save_args, save_stage, write_results)
from quant import METHOD_VERSION
from quant.checkpoint import load_quantized
from quant.deploy import IntModel, convert
from quant.model import QuantModel, frozen


@dataclass
class Family:
    """What a model family supplies to a sampling run."""
    job: QuantJob                                   # the network the quantizer wraps, and its calibration
    install: Callable[[nn.Module], None]            # makes the family's sampler call this network (FP, quantized)
    draw: Callable[[int, torch.Generator, Callable], torch.Tensor]   # batch b's images in [-1, 1] (run_batches)
    n_images: int
    batch_size: int
    count_flag: str                                 # the flag giving n_images (batches do not depend on it)
    steps: int                                      # sampling steps per batch (progress bar)
    sampler: dict                                   # how samples are drawn (results.json, checkpoint meta)
    reference: str | None                           # FID reference (None with --no_fid)
    fp_samples: str | None = None                   # the FP model's samples (same noise): FID/PSNR to FP
    record: dict = field(default_factory=dict)      # more fields for results.json
    metrics: Callable[[object], dict] | None = None  # more metrics of the samples (txt2img: CLIP score)


def run_identity(args, inputs: dict) -> dict:
    """What makes a run's results: its settings and input contents (recorded in results.json; run_task skips a
    run only when they match)."""
    plugin = getattr(args, "method_plugin", None)
    inputs = inputs | ({"method_plugin": file_digest(plugin)} if plugin else {})
    return {"settings": canonical(result_settings(args)), "inputs": inputs}


def samples_identity(identity: dict) -> dict:
    """The part of a run's identity its samples depend on: evaluation-only flags and inputs (EVALUATION) aside."""
    return {"settings": {k: v for k, v in (identity.get("settings") or {}).items() if k not in EVALUATION},
            "inputs": {k: v for k, v in (identity.get("inputs") or {}).items() if k not in EVALUATION}}


def _differences(old: dict, new: dict) -> str:
    """'--max_images 12 -> 200, the ckpt file's contents' for a one-line message."""
    diff = [f"--{k} {old['settings'].get(k)} -> {new['settings'].get(k)}"
            for k in sorted(set(old["settings"]) | set(new["settings"]))
            if old["settings"].get(k) != new["settings"].get(k)]
    diff += [f"the {k} file's contents" for k in sorted(set(old["inputs"]) | set(new["inputs"]))
             if old["inputs"].get(k) != new["inputs"].get(k)]
    return ", ".join(diff[:3]) + (f" and {len(diff) - 3} more" if len(diff) > 3 else "")


def check_logdir(logdir: Path, flag: str, identity: dict, overwrite: bool) -> None:
    """Before any work or write: `logdir` (given by `flag`) can be a directory this process writes, and it holds
    no finished run (results.json) whose samples came from other settings or inputs, unless `overwrite`."""
    if logdir.exists() and not logdir.is_dir():
        raise UsageError(f"{flag} {logdir} is a file, not a directory", f"give {flag} a directory (it is created)")
    existing = next(p for p in [logdir, *logdir.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise UsageError(f"{flag} {logdir} lies under {existing}, which is a file", f"give {flag} another directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {logdir} cannot be written ({existing} is read-only to this user)",
                         f"give {flag} a writable directory")
    old = recorded_identity(logdir / "results.json")
    if old is None or overwrite:
        return
    old, new = samples_identity(old), samples_identity(identity)
    if old != new:
        raise UsageError(f"{flag} {logdir} holds a finished run with other settings ({_differences(old, new)})",
                         f"use a new {flag}, or add --overwrite (the finished results stay until this run has "
                         f"written its own)")


def publish(logdir: Path, images, record: dict, args) -> None:
    """Put this run's samples (samples.npz, images/, grid.png), args.json and results.json in place of any
    earlier run's. Everything is written beside the old files first; then the old record goes, the new files
    are swapped in, and the new record is written last: at no moment does a results.json sit beside samples
    it does not describe, and a failure before the swap leaves the old run whole. A run moved aside by
    --overwrite (previous_run/) is removed once this one is published."""
    staging = logdir / f".publish.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_samples(staging, images)
        (logdir / "results.json").unlink(missing_ok=True)
        for name in SAMPLE_FILES:
            old = logdir / name
            if old.is_dir():
                trash = logdir / f".{name}.{os.getpid()}.old"
                old.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(staging / name, old)
        save_args(logdir, args)
        write_results(logdir, record)
        shutil.rmtree(logdir / PREVIOUS_RUN, ignore_errors=True)      # a run replaced with --overwrite
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def quantize_once(job: QuantJob, args, logdir: Path, device, shard: dist.Shard, sampler: dict):
    """quantize() on rank 0; the other ranks wait for its quantized.pt and load it."""
    payload = job.calibration.payload
    if shard.world == 1 or args.cali_ckpt and not corrects_output(args) and not args.resume_w:
        return quantize(job, args, logdir, device, sampler, payload)
    result = quantize(job, args, logdir, device, sampler, payload) if shard.main else None
    dist.barrier(shard)
    if shard.main:
        return result
    qmodel, saved = load_quantized(logdir / "quantized.pt", job.fp)
    return qmodel.eval(), {"method": saved["method"], "weight_bit": args.weight_bit,
                           "act_bit": args.act_bit if args.quant_act else None}


def sample_cache(logdir: Path, identity: dict, count_flag: str, model_digest: str | None, device) -> Path:
    """<logdir>/sample_batches: finished sampling batches of this model (by content) and these settings (the
    number of images and evaluation inputs aside: a batch's images do not depend on them)."""
    samples = samples_identity(identity)
    settings = {k: v for k, v in samples["settings"].items() if k != count_flag}
    key = {"settings": settings, "inputs": samples["inputs"], "model": model_digest, "device": device.type}
    cache = logdir / "sample_batches"
    if load_stage(cache / "key.json", key) is None:
        shutil.rmtree(cache, ignore_errors=True)
        save_stage(cache / "key.json", key, {})
    return cache


def backend_record(model) -> dict:
    """How the quantized model runs, for results.json and the log: the backend, its kernels, and what stays
    simulated (with the reason)."""
    if not isinstance(model, IntModel):
        return {"backend": "fake"}
    for entry in model.simulated:
        print(f"[backend int] {entry['name']} stays {entry['kind']}: {entry['reason']}", flush=True)
    return {"backend": "int", "int_kernels": model.kernels, "simulated_layers": model.simulated,
            "int_note": "4-bit operands run on int8 units with values in the 4-bit range (no int4 multiply-accumulate "
                        "on this hardware)"}


def inference(model, compile_model: bool):
    """(context, callable) to sample with: a QuantModel's weights are quantized once (quant.model.frozen);
    --compile wraps the callable in torch.compile."""
    context = frozen(model) if isinstance(model, QuantModel) else nullcontext(model)
    return context, (torch.compile(model) if compile_model else model)


def execute(args, family: Family, identity: dict, shard: dist.Shard, device, logdir: Path) -> dict | None:
    """The run after its checks (see module doc); -> the results record on rank 0, None elsewhere."""
    with locked(logdir) if shard.main else nullcontext():
        return _execute(args, family, identity, shard, device, logdir)


def _execute(args, family: Family, identity: dict, shard, device, logdir: Path) -> dict | None:
    job = family.job
    model, record, model_digest = job.fp, {"method": "fp", "weight_bit": 32, "act_bit": None}, None
    if args.ptq:
        model, record = quantize_once(job, args, logdir, device, shard, family.sampler)
        if args.backend == "int" and not isinstance(model, IntModel):
            model = convert(model)
        model.check_timesteps(job.schedule)
        record |= backend_record(model)
        made = logdir / "quantized.pt"
        from_ckpt = args.cali_ckpt and not corrects_output(args) and not args.resume_w
        model_digest = file_digest(args.cali_ckpt if from_ckpt else made)
        record["unquantized_layers"] = model.unquantized              # listed, never counted as quantized
    cache = sample_cache(logdir, identity, family.count_flag, model_digest, device) if shard.main \
        else logdir / "sample_batches"
    dist.barrier(shard)
    n_batches = -(-family.n_images // family.batch_size)
    context, eps = inference(model, args.compile)
    family.install(eps)
    try:
        with context:
            mine = run_batches(family.draw, family.n_images, family.batch_size, args.seed, device, family.steps,
                               shard.batches(n_batches), cache, progress=shard.main)
    finally:
        family.install(job.fp)
    done = dist.gather_to_main(shard, mine)
    if not shard.main:
        return None
    images, seconds = join_batches(done)
    record |= family.sampler | family.record | {"n_samples": len(images), "seed": args.seed,
                                                "sampling_seconds": seconds, "processes": shard.world,
                                                "compiled": args.compile}
    if family.reference is not None:
        from evaluation.fid import evaluate                       # FID's packages are needed only here
        record |= evaluate(images, ref=family.reference, device=device, fp_samples=family.fp_samples,
                           allow_download=args.allow_download)
    if family.metrics is not None:
        record |= family.metrics(images)
    record |= identity | {"method_version": METHOD_VERSION, "provenance": provenance(device)}
    publish(logdir, images, record, args)
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                   if not isinstance(v, (dict, list))))
    return record

