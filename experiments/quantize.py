"""The quantization stage of a sampling run, for any network: --cali_ckpt checked against the flags, or
calibration by --quant_mode, cached in the log directory under a key of settings and input contents.

A run's log directory holds what it finished: `calib.pt` (the calibration set; its key inside the file),
per-unit reconstruction checkpoints (`distill/`, `recon_w/`, `recon_a/`; their key in `units.json`) and
`quantized.pt` (the calibrated model; its key in the payload). A rerun with the same key reuses them; units of
another key are removed only once the run has passed every check (and holds the directory's lock).
"""
from __future__ import annotations

import copy
import math
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn as nn

from common.checkpoint import check_finite
from common.errors import UsageError
from common.files import file_digest
from experiments.flags import (base_method, correction_suffix, corrects_output, method_config, method_name,
                               quant_config)
from experiments.runtime import (canonical, load_stage, peak_memory_mb, provenance, reset_peak_memory,
                                 retire_finished_run, save_stage, timer)
from quant import METHOD_VERSION
from quant.bias_correction import correct_eps_gain
from quant.calib_data import CalibSet, collect_trajectories, draw_over_steps, evenly_spaced_steps, trajectories_for
from quant.checkpoint import load_quantized, load_quantized_weights, read_quantized, save_quantized
from quant.deploy.file import is_int_file, load_int, read_header
from quant.methods import CalibrationDraw, MethodContext, quantize as quantize_with
from quant.methods.qdiff import reconstruct_activations
from quant.model import QuantModel
from quant.settings import QuantConfig

KEY_VERSION = 3                                         # bump when the meaning of a stage's key changes
UNIT_DIRS = ("distill", "recon_w", "recon_a")           # per-unit reconstruction checkpoints
# Flags that change neither the calibrated model nor the samples.
NOT_RESULT = ("logdir", "device", "ref", "no_fid", "compile", "debug", "overwrite", "allow_download")
# Flags added after runs were recorded, at the value that leaves every result as it was: left out of run
# identities and stage keys there, so that finished runs stay finished (a plugin's file counts by its contents).
OMITTED_AT = {"method_plugin": None, "ddim_sampler": "ddim"}


def recorded(settings: Mapping[str, object]) -> dict:
    """`settings` without the OMITTED_AT flags at their omitted values."""
    return {k: v for k, v in settings.items() if not (k in OMITTED_AT and v == OMITTED_AT[k])}


def result_settings(args, exclude: tuple[str, ...] = ()) -> dict:
    """The flags a run's results depend on, by name (NOT_RESULT, `exclude` and OMITTED_AT aside)."""
    return recorded({k: v for k, v in vars(args).items() if k not in NOT_RESULT + exclude})
# Flags and input files that change only what the samples are scored against: they are part of a run's
# identity (a task reruns the scoring when they change), but neither of its model nor of its samples.
EVALUATION = ("fp_samples",)


@dataclass
class QuantJob:
    """What the stage needs from the model family's pipeline."""
    fp: nn.Module
    schedule: Sequence[int]                                     # timesteps the sampler calls the network at
    sigmas: torch.Tensor | None                                 # σ_t per timestep (--t_weight_sigma)
    draw_calibration: Callable[[], tuple[CalibSet, float | None, bool]]   # -> (set, seconds to draw, reused)
    eps_correction: Callable[[QuantModel], dict] | None         # --eps_correction (None: not offered)
    inputs: Mapping[str, str | None]                            # content digests of input files
    sampling_flags: tuple[str, ...]                             # flags that change only the sampling
    calibration: "Preloaded"                                    # --cali_ckpt / --cali_data_path, read and checked
    network: dict                                               # how to build `fp` again (experiments/networks.py)


def stage_key(args, job: QuantJob) -> dict:
    """What the quantized model depends on: every setting but those of sampling and evaluation, and the input
    files' contents (evaluation inputs aside)."""
    settings = result_settings(args, EVALUATION + job.sampling_flags)
    inputs = {k: v for k, v in job.inputs.items() if k not in EVALUATION}
    return {"version": KEY_VERSION, "settings": settings, "inputs": inputs}


@dataclass(frozen=True)
class Preloaded:
    """The quantization inputs a run reads before any work or write, checked: the --cali_ckpt payload and the
    --cali_data_path set (with what was stored beside it)."""
    payload: dict | None = None
    calib: CalibSet | None = None
    calib_meta: dict | None = None


def uses_tpq(args) -> bool:
    """Activation quantizers with one step size per timestep (DilateQuant's TPQ)."""
    return args.quant_act and method_config(args).temporal


def missing_timesteps(calib: CalibSet, schedule: Sequence[int]) -> list[int]:
    """The timesteps of the sampler that no calibration sample is at."""
    return sorted({int(t) for t in schedule} - set(torch.unique(calib.t).tolist()))


def check_calibration_set(calib: CalibSet, source: str, schedule: Sequence[int], args,
                          shape: Sequence[int] | None = None) -> list[int]:
    """Before the work that needs it: the set's samples have the network's input shape and lie at timesteps this
    run's sampler visits, and with --eps_rescale (one gain per timestep) reach every one of them; one UsageError
    line otherwise. A TPQ slot without samples takes the range of all the data (quant/calibrate.py): one line
    says which. -> the timesteps without samples."""
    if shape is not None and tuple(calib.x.shape[1:]) != tuple(shape):
        raise UsageError(f"{source} holds samples of shape {list(calib.x.shape[1:])}, but this model takes "
                         f"{list(shape)}", "it was drawn for another model: drop --cali_data_path to draw a new set")
    visited = {int(t) for t in schedule}
    foreign = sorted(set(torch.unique(calib.t).tolist()) - visited)
    if foreign:
        raise UsageError(f"{source} holds samples at timestep(s) {foreign[:5]}{' ...' if len(foreign) > 5 else ''} "
                         f"that this run's sampler never visits ({len(visited)} timesteps)",
                         "it was drawn with other sampling steps: sample with those, or drop --cali_data_path")
    missing = missing_timesteps(calib, schedule)
    listed = f"{len(missing)} of the sampler's {len(visited)} timesteps ({missing[:6]}{' ...' if len(missing) > 6 else ''})"
    if missing and args.eps_rescale:
        raise UsageError(f"{source} has no sample at {listed}, and --eps_rescale fits one gain per timestep",
                         "raise --cali_n (its samples fall at random steps), or use fewer sampling steps")
    if missing and uses_tpq(args):
        print(f"[calibration] {source} has no sample at {listed}: their TPQ slots take the range of all the "
              f"data (raise --cali_n to calibrate them)", flush=True)
    return missing


def preload(args, schedule: Sequence[int], sample_shape: Sequence[int]) -> Preloaded:
    """Read and check --cali_ckpt (against the flags and the sampler, finite values) and --cali_data_path
    (shape, timesteps, finite values), before any work or write."""
    if not args.ptq:
        return Preloaded()
    payload = calib = meta = None
    if args.cali_ckpt:
        payload = int_payload(args.cali_ckpt) if is_int_file(args.cali_ckpt) else read_quantized(args.cali_ckpt)
        check_cali_ckpt(payload, args.cali_ckpt, args, schedule)
    if args.cali_data_path:
        calib, meta = CalibSet.read(args.cali_data_path)
        check_calibration_set(calib, f"--cali_data_path {args.cali_data_path}", schedule, args, sample_shape)
    return Preloaded(payload, calib, meta)


def int_payload(path: str) -> dict:
    """What a packed integer file's header says, in the form of a quantized.pt payload (its tensors are checked
    when it is loaded)."""
    header = read_header(path)
    return {"format": header["format"], "method": header["method"], "config": header["config"],
            "schedule": header["schedule"], "meta": {"sampler": header.get("sampler")}, "state_dict": {},
            "int_header": header}


def checkpoint_summary(path: str, payload: dict) -> dict:
    """What a quantized checkpoint is, for results.json."""
    cfg = payload["config"]
    return {"path": str(path), "sha256": file_digest(path), "method": payload["method"], "weight_bit": cfg["weight_bit"],
            "act_bit": cfg["act_bit"], "split": cfg["split"], "temporal": cfg["temporal"],
            "calibrated_for": payload.get("meta", {}).get("sampler")}


def check_cali_ckpt(payload: dict, path: str, args, schedule: Sequence[int]) -> None:
    """One line naming both sides where the checkpoint and the flags disagree on bits, method, split or the
    timestep schedule (a TPQ model has parameters for the timesteps it was calibrated for only)."""
    cfg = QuantConfig.from_dict(payload["config"])
    want = quant_config(args)
    pairs = [("--weight_bit", cfg.weight_bit, want.weight_bit), ("--split", cfg.split, want.split),
             ("--quant_mode", saved_method(payload), args.quant_mode)]
    if not args.resume_w:                              # --resume_w keeps the weights and recalibrates activations
        pairs += [("--act_bit (with --quant_act)", cfg.act_bit, want.act_bit), ("--a_sym", cfg.a_sym, want.a_sym),
                  ("--sm_abit", cfg.sm_abit, want.sm_abit)]
    for flag, saved, given in pairs:
        if saved != given:
            raise UsageError(f"--cali_ckpt {path} was calibrated with {flag} = {saved}, but this run has {given}",
                             "give the checkpoint's settings, or calibrate anew without --cali_ckpt")
    check_finite(payload["state_dict"], f"--cali_ckpt {path}")
    if cfg.temporal and not args.resume_w:
        missing = sorted(set(int(t) for t in schedule) - set(int(t) for t in payload["schedule"]))
        if missing:
            sampler = payload.get("meta", {}).get("sampler", {})
            raise UsageError(f"--cali_ckpt {path} has TPQ parameters for {len(set(payload['schedule']))} timesteps "
                             f"({sampler or 'its calibration schedule'}); this run's sampler visits {missing[:4]}... "
                             "that it has none for", "sample with the steps and schedule it was calibrated for, or "
                             "recalibrate")


def output_correction(args) -> dict | None:
    """--eps_correction / --eps_rescale as fields of the method identity."""
    if args.eps_correction:
        return {"kind": "eps_mean", "trajectories": args.eps_correction}
    return {"kind": "eps_rescale"} if args.eps_rescale else None


def method_identity(args) -> dict:
    """What the quantized model is, as fields: the method's structured identity (quant.methods) and the output
    correction; results.json and quantized.pt hold it beside the short label."""
    return method_config(args).identity() | {"output_correction": output_correction(args)}


def saved_method(payload: dict) -> str:
    """The method name of a checkpoint: its identity's (quant.methods), or parsed from the label of a checkpoint
    written before identities were stored."""
    identity = payload.get("meta", {}).get("method_identity")
    return identity["name"] if identity else base_method(payload["method"])


def _calibrate(job: QuantJob, args, logdir: Path, device: torch.device) -> tuple[QuantModel, dict]:
    config, method = quant_config(args), method_config(args)
    needs_data = config.quant_act or method.needs_data(config) or args.eps_rescale
    reset_peak_memory(device)
    calib, data_seconds, reused = None, None, False
    with timer() as t, warnings.catch_warnings():
        # slots without samples were named when the set was checked (check_calibration_set), with its file
        warnings.filterwarnings("ignore", message="the calibration set has no sample")
        if needs_data:
            calib, data_seconds, reused = job.draw_calibration()
        _clear_stale_units(logdir, canonical(stage_key(args, job)))   # the calibration set passed its checks
        if args.resume_w:                              # qdiff (check_quant_flags): keep the weights
            qmodel = load_quantized_weights(args.cali_ckpt, job.fp, config)
            reconstruct_activations(qmodel, job.fp, calib, method, logdir, args.cali_batch_size)
        else:
            context = MethodContext(job.schedule, calib, logdir, args.cali_batch_size, args.seed, job.sigmas)
            qmodel = quantize_with(job.fp, config, method, context)
        stats = correct_output(job, args, qmodel, calib)
    # a reused calibration set counts with the seconds of its original draw (None: not recorded, not counted)
    seconds = t["seconds"] + ((data_seconds or 0.0) if reused else 0.0)
    if calib is not None and uses_tpq(args):                   # slots that took the range of all the data
        stats["tpq_timesteps_without_samples"] = missing_timesteps(calib, job.schedule)
    return qmodel, stats | {"calib_seconds": seconds, "calib_data_seconds": data_seconds,
                            "calib_data_reused": reused, "peak_mem_mb": peak_memory_mb(device)}


def cached_calibration(args, logdir: Path, key_settings: Sequence[str], inputs: Mapping[str, str | None],
                       start: Callable[[int], tuple[torch.Tensor, Callable]], n_steps: int,
                       schedule: Sequence[int], preloaded: Preloaded, halves: int = 1) -> tuple[CalibSet, float | None, bool]:
    """The calibration set of a run, for any model family: --cali_data_path, or <logdir>/calib.pt drawn with
    the same settings (`key_settings` of args) and inputs (its key is inside the file), or drawn anew and saved
    there. `start(n_traj)` -> (x_T of n_traj FP trajectories, fp_sample(x, on_step, rows=None)); the
    trajectories are n_steps network calls of `halves` rows each (2 under classifier-free guidance), at the
    timesteps of `schedule`.
    A set is checked (check_calibration_set) before it is returned: no calibration starts on a set that misses
    a timestep the method needs.
    Q-Diffusion takes --cali_n samples at each of --cali_st evenly spaced steps, the others --cali_n samples at
    random steps, --cali_per_traj per trajectory.
    -> (calibration set, seconds its draw took (None if not recorded), whether it was reused)."""
    if args.cali_data_path:                       # read and checked before any work (preload)
        return preloaded.calib, (preloaded.calib_meta or {}).get("record", {}).get("seconds"), True
    evenly_spaced = method_config(args).calibration is CalibrationDraw.EVENLY_SPACED
    path = logdir / "calib.pt"
    key = canonical(recorded({k: getattr(args, k) for k in key_settings})
                    | {"evenly_spaced": evenly_spaced, "config": inputs["config"], "ckpt": inputs["ckpt"]})
    if path.exists():
        calib, meta = CalibSet.read(path, "calib.pt")
        if meta.get("key") == key:
            check_calibration_set(calib, str(path), schedule, args)
            return calib, meta.get("record", {}).get("seconds"), True
    n_traj = args.cali_n if evenly_spaced else trajectories_for(math.ceil(args.cali_n / halves), args.cali_per_traj)
    x_T, fp_sample = start(n_traj)
    gen = torch.Generator().manual_seed(args.seed)
    with timer() as t:
        if evenly_spaced:
            calib = evenly_spaced_steps(collect_trajectories(fp_sample, x_T), args.cali_n, args.cali_st, gen)
        else:
            calib = draw_over_steps(fp_sample, x_T, args.cali_n, n_steps, args.cali_per_traj, gen,
                                    batch_size=args.batch_size, halves=halves)
    calib.save(path, key=key, record={"samples": len(calib.t), "seconds": t["seconds"]})
    check_calibration_set(calib, f"the calibration set drawn ({path})", schedule, args)
    return calib, t["seconds"], False


def correct_output(job: QuantJob, args, qmodel: QuantModel, calib: CalibSet | None) -> dict:
    """--eps_correction (on the quantized model's own trajectories) or --eps_rescale (on the calibration set):
    installs the correction on qmodel; -> its statistics."""
    if args.eps_correction:
        return job.eps_correction(qmodel)
    if args.eps_rescale:
        return correct_eps_gain(qmodel, job.fp, calib, job.schedule, args.cali_batch_size)
    return {}


def _clear_stale_units(logdir: Path, key: dict) -> None:
    """Units of another key are removed (the run has passed its checks, its calibration set too); then the key
    of those to come."""
    if load_stage(logdir / "units.json", key) is None:
        for unit_dir in UNIT_DIRS:
            shutil.rmtree(logdir / unit_dir, ignore_errors=True)
        save_stage(logdir / "units.json", key, {})


def quantize(job: QuantJob, args, logdir: Path, device: torch.device, sampler: dict,
             payload: dict | None = None) -> tuple[QuantModel, dict]:
    """Load --cali_ckpt (its `payload`, already checked against the flags), or calibrate and save
    <logdir>/quantized.pt. -> (model, record of what the model is and what it cost)."""
    record = {"method": method_name(args), "method_identity": method_identity(args), "weight_bit": args.weight_bit,
              "act_bit": args.act_bit if args.quant_act else None}
    if args.cali_ckpt and "int_header" in (payload or {}):     # a packed integer model: sampled as it is
        model, _ = load_int(args.cali_ckpt, lambda network: copy.deepcopy(job.fp), device)
        cfg = payload["config"]
        return model, record | {"method": payload["method"], "weight_bit": cfg["weight_bit"], "act_bit": cfg["act_bit"],
                                "quantized_from": checkpoint_summary(args.cali_ckpt, payload), "calib_seconds": None,
                                "peak_mem_mb": None}
    if args.cali_ckpt and not args.resume_w:
        qmodel, payload = load_quantized(args.cali_ckpt, job.fp, payload)
        cfg = payload["config"]
        record |= {"method": payload["method"], "method_identity": payload.get("meta", {}).get("method_identity"),
                   "weight_bit": cfg["weight_bit"], "act_bit": cfg["act_bit"],
                   "quantized_from": checkpoint_summary(args.cali_ckpt, payload)}
        if not corrects_output(args):
            return qmodel.eval(), record | {"calib_seconds": None, "peak_mem_mb": None}
        suffix = correction_suffix(args)
        if not record["method"].endswith(suffix):
            record["method"] += suffix
        if record["method_identity"] is not None:
            record["method_identity"] = record["method_identity"] | {"output_correction": output_correction(args)}
        with timer() as t:                                       # calib_seconds: the correction alone
            stats = correct_output(job, args, qmodel, job.draw_calibration()[0] if args.eps_rescale else None)
        retire_finished_run(logdir)
        save_quantized(logdir / "quantized.pt", qmodel, record["method"], sampler=sampler, network=job.network,
                       method_identity=record["method_identity"], cali_ckpt=str(args.cali_ckpt),
                       stage_key=canonical(stage_key(args, job)))
        seconds = stats.get("eps_correction_seconds", t["seconds"])
        return qmodel.eval(), record | stats | {"calib_seconds": seconds, "peak_mem_mb": None}
    key = canonical(stage_key(args, job))
    path = logdir / "quantized.pt"
    if path.exists():
        saved = torch_payload_key(path)
        if saved == key:
            print(f"[resume] {path} was calibrated with these settings and inputs: reusing it")
            qmodel, _ = load_quantized(path, job.fp)
            cost = {k: v for k, v in (load_stage(logdir / "quantize.json", key) or {}).items() if k != "provenance"}
            return qmodel.eval(), record | cost
    qmodel, cost = _calibrate(job, args, logdir, device)
    retire_finished_run(logdir)                 # --overwrite: the finished run moves aside with its model
    save_quantized(path, qmodel, record["method"], sampler=sampler, network=job.network,
                   method_identity=record["method_identity"], stage_key=key)
    save_stage(logdir / "quantize.json", key, cost | {"method_version": METHOD_VERSION, "provenance": provenance(device)})
    return qmodel.eval(), record | cost


def torch_payload_key(path: Path) -> dict | None:
    """The stage key stored in a quantized.pt (None if it has none or is unreadable)."""
    from quant.checkpoint import read_quantized
    try:
        return read_quantized(path, "quantized.pt").get("meta", {}).get("stage_key")
    except Exception:                                          # noqa: BLE001 (a damaged file is recomputed)
        return None
