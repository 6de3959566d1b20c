"""Quantization flags shared by the sampling scripts (Q-Diffusion's names, seed 003), their valid ranges, and
the typed settings they build. Every flag is checked before any work or any write (`check_quant_flags`)."""
from __future__ import annotations

import argparse
import json
import math
import re
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

import torch

from common.checkpoint import check_file
from common.errors import UsageError
from quant.deploy.file import is_int_file
from quant.dilation import Scaling
from quant.distill import BKDTraining, DistillConfig, LRSchedule
from quant.methods import QuantMode
from quant.methods.dilatequant import DilateQuantConfig
from quant.methods.qdiff import QDiffConfig
from quant.settings import ALLOWED_BITS, QuantConfig


# --cache_dtype: float32 keeps the model's precision (the default, bit for bit as before the flag existed)
CACHE_DTYPES = {"float32": None, "float16": torch.float16}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default and keeps the description's layout."""


def add_common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda if available, else cpu)")
    p.add_argument("--compile", action="store_true", help="sample with torch.compile (the first call compiles)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.add_argument("--fp_samples", default=None, help="samples.npz of the FP model drawn from the same noise (seed, "
                                                      "count): results also get FID/sFID and median PSNR to them")
    p.add_argument("--allow_download", action=argparse.BooleanOptionalAction, default=None,
                   help="IS: fetch the Inception classifier's weights when they are not on disk (default: when the "
                        "network is reachable); FID and CLIP never download")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished run with other settings in the log directory (its results stay until this "
                        "run has written its own); without it such a rerun is refused")


def add_quant_flags(p: argparse.ArgumentParser, resume_flag: bool = True) -> None:
    """The quantization flags. resume_flag=False leaves out the boolean --resume (the LDM script's -r/--resume
    names the checkpoint, as in Q-Diffusion); without it, --cali_ckpt is used as is, as with --resume."""
    q = p.add_argument_group("quantization")
    q.add_argument("--ptq", action="store_true", help="quantize the model")
    q.add_argument("--quant_mode", default=QuantMode.BASELINE.value, choices=[m.value for m in QuantMode])
    q.add_argument("--weight_bit", type=int, default=8, help="2..8")
    q.add_argument("--quant_act", action="store_true", help="quantize activations too")
    q.add_argument("--act_bit", type=int, default=8, help="2..8")
    q.add_argument("--a_sym", action="store_true", help="symmetric activation quantizers")
    q.add_argument("--sm_abit", type=int, default=None, help="bits of softmax outputs, 2..8 or 16 (default: --act_bit)")
    q.add_argument("--split", action="store_true", help="split shortcut quantization (Q-Diffusion)")
    q.add_argument("--cali_ckpt", default=None, help="load this calibrated checkpoint instead of calibrating: a "
                                                    "quantized.pt, or a packed integer file (tools/export_int.py)")
    q.add_argument("--backend", default="fake", choices=["fake", "int"],
                   help="how the quantized model runs: fake = the simulation calibration trains (the tables); int = "
                        "integer kernels (oneDNN int8 on the CPU, torch._int_mm elsewhere), the same function")
    q.add_argument("--cali_n", type=int, default=1024,
                   help="calibration samples: total, drawn at random over all steps (baseline, dilatequant); "
                        "per step (qdiff)")
    q.add_argument("--cali_st", type=int, default=20, help="qdiff: number of evenly spaced calibration steps")
    q.add_argument("--cali_per_traj", type=int, default=1,
                   help="baseline, dilatequant: calibration samples taken from each FP trajectory (distinct random "
                        "steps); 1 = every sample from its own trajectory")
    q.add_argument("--cali_batch_size", type=int, default=64)
    q.add_argument("--cali_data_path", default=None, help="a saved calibration set (calib.pt) to use")
    q.add_argument("--eps_correction", type=int, default=0, metavar="N",
                   help="beyond the paper, any method: subtract the per-timestep mean eps error, estimated on N "
                        "trajectories of the quantized model (quant/bias_correction.py); 0 = off")
    q.add_argument("--eps_rescale", action="store_true",
                   help="beyond the paper, any method: scale the quantized eps per timestep by the factor that "
                        "undoes its shrinkage against the FP eps, fitted on the calibration set (PTQD's "
                        "correlated-noise correction; quant/bias_correction.py)")
    r = p.add_argument_group("qdiff (BRECQ reconstruction with AdaRound)")
    r.add_argument("--cali_iters_a", type=int, default=QDiffConfig.act_iters, help="activation-step iterations per block")
    r.add_argument("--cali_lr", type=float, default=QDiffConfig.act_lr, help="activation-step learning rate")
    r.add_argument("--cali_p", type=float, default=QDiffConfig.lp, help="norm of the activation range search")
    r.add_argument("--running_stat", action="store_true", help="running min/max activation ranges")
    if resume_flag:
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
                   help="weight-quantizer step sizes and zero points (and activation ones unless --lr_act is given)")
    d.add_argument("--lr_act", type=float, default=DistillConfig.lr_act,
                   help="activation (TPQ) step sizes and zero points; default: --lr_quant")
    d.add_argument("--lr_scale", type=float, default=DistillConfig.lr_scale, help="--scaling learnable factors")
    d.add_argument("--lr_schedule", default=DistillConfig.lr_schedule.value, choices=[m.value for m in LRSchedule],
                   help="learning rate over each unit's iterations: distillation (dilatequant) and the activation "
                        "steps (qdiff); cosine anneals to 0")
    d.add_argument("--cache_dtype", default="float32", choices=sorted(CACHE_DTYPES),
                   help="dilatequant, qdiff: dtype of each unit's cached inputs/targets (float16 halves the memory)")
    d.add_argument("--cache_ram_gb", type=float, default=None,
                   help="dilatequant, qdiff: a unit cache larger than this goes to a memory-mapped file in the logdir "
                        "(the plan is printed first; default: always RAM)")
    d.add_argument("--t_weight_sigma", type=float, default=DistillConfig.t_weight_sigma,
                   help="(beyond the paper) weight each distillation sample by 1/(sigma_t^2 + this^2), mean 1: "
                        "more weight to small t, where feature errors become large eps errors; default: plain MSE")
    d.add_argument("--distill_fp_input", type=float, default=DistillConfig.fp_input,
                   help="dilatequant, qdiff (beyond the papers): probability that a reconstruction sample's block "
                        "input comes from the FP model instead of the quantized chain: 0 = the papers (eq. 17), "
                        "1 = FP inputs, 0.5 = mixed")
    d.add_argument("--bkd_training", default=DistillConfig.training.value, choices=[m.value for m in BKDTraining],
                   help="dilatequant: joint = the paper (weights and quantizers together, everything quantized); "
                        "staged (beyond the paper) = per block, the weights with FP activations, then the activation "
                        "quantizers with the weights frozen, --cali_iters each")


INPUT_FILES = ("ckpt", "cali_data_path", "cali_ckpt", "fp_samples")


def check_input_files(args, n_images: int, count_flag: str) -> None:
    """Every input file named by a flag is a file; --fp_samples holds as many images as this run samples
    (`n_images`, set by `count_flag`) and, when a run record (results.json) lies beside it, was drawn from this
    run's noise seed (PSNR and FID to FP pair samples drawn from the same noise)."""
    for flag in INPUT_FILES:
        path = getattr(args, flag, None)
        if path is not None:
            check_file(path, f"--{flag}", error=UsageError)
    if args.fp_samples is None:
        return
    count = npz_images(args.fp_samples, "--fp_samples")
    if count != n_images:
        raise UsageError(f"--fp_samples {args.fp_samples} holds {count} images, this run samples {n_images} "
                         f"({count_flag})", f"pass the FP samples of a run with the same {count_flag}")
    record = Path(args.fp_samples).parent / "results.json"
    try:
        seed = json.loads(record.read_text()).get("seed") if record.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        seed = None                                           # an unreadable record says nothing of the seed
    if seed is not None and seed != args.seed:
        raise UsageError(f"--fp_samples {args.fp_samples} was drawn with --seed {seed} ({record}), this run has "
                         f"--seed {args.seed}", "pass the FP samples drawn from this run's seed")


def npz_images(path: str | Path, flag: str) -> int:
    """How many images an .npz of samples holds under arr_0, read from the array's header (no image is loaded)."""
    try:
        with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape = read(f)[0]
    except (KeyError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise UsageError(f"{flag} {path} is not an .npz of images under arr_0 ({type(e).__name__}: {e})",
                         "pass the samples.npz of a run") from None
    if len(shape) != 4:
        raise UsageError(f"{flag} {path} holds an array of shape {shape}, not images [N, H, W, C]")
    return int(shape[0])


# ---------------------------------------------------------------------------------------------------
# Ranges
# ---------------------------------------------------------------------------------------------------

Rule = tuple[str, Callable[[object], bool], str]   # (flag, valid(value), the valid range in words)

BITS = "2..8"


def at_least(n: float) -> Callable[[object], bool]:
    """v >= n, and finite (NaN and inf are refused by every numeric rule)."""
    return lambda v: math.isfinite(v) and v >= n


def finite(ok: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda v: math.isfinite(v) and ok(v)


def optional(ok: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda v: v is None or ok(v)


QUANT_RULES: list[Rule] = [
    ("weight_bit", lambda v: 2 <= v <= 8, BITS), ("act_bit", lambda v: 2 <= v <= 8, BITS),
    ("sm_abit", optional(lambda v: v in ALLOWED_BITS), "2..8 or 16"),
    ("cali_n", at_least(1), ">= 1"), ("cali_st", at_least(1), ">= 1"), ("cali_per_traj", at_least(1), ">= 1"),
    ("cali_batch_size", at_least(1), ">= 1"), ("eps_correction", at_least(0), ">= 0 trajectories (0 = off)"),
    ("cali_iters", at_least(0), ">= 0"), ("cali_iters_a", at_least(0), ">= 0"),
    ("distill_batch_size", at_least(1), ">= 1"),
    ("lr_weight", at_least(0), ">= 0"), ("lr_quant", at_least(0), ">= 0"), ("lr_act", optional(at_least(0)), ">= 0"),
    ("lr_scale", at_least(0), ">= 0"), ("cali_lr", finite(lambda v: v > 0), "> 0"),
    ("cali_p", finite(lambda v: v > 0), "> 0"), ("t_weight_sigma", optional(finite(lambda v: v > 0)), "> 0"),
    ("cache_ram_gb", optional(finite(lambda v: v > 0)), "> 0"),
    ("distill_fp_input", finite(lambda v: 0 <= v <= 1), "0..1 (a probability)"),
]


def check_rules(args, rules: Iterable[Rule], names: Mapping[str, str] | None = None) -> None:
    """One UsageError naming the first flag outside its range, and the range. `names`: the flag a setting is
    given by where that is not --<setting> (txt2img's --ddim_steps gives custom_steps)."""
    for name, ok, valid in rules:
        value = getattr(args, name)
        if not ok(value):
            raise UsageError(f"{(names or {}).get(name, '--' + name)} {value} is out of range: use {valid}")


@lru_cache(maxsize=1)
def quant_flag_defaults() -> dict[str, object]:
    """The default of every quantization flag, by its attribute name (--ptq and the boolean --resume aside)."""
    p = argparse.ArgumentParser()
    add_quant_flags(p, resume_flag=False)
    return {a.dest: a.default for a in p._actions if a.dest not in ("help", "ptq")}


def check_no_quant_flags(args) -> None:
    """Without --ptq nothing is quantized: a quantization flag given anyway is refused (it would be ignored and
    an FP run made)."""
    given = [dest for dest, default in quant_flag_defaults().items() if getattr(args, dest, default) != default]
    if given and not args.ptq:
        raise UsageError(f"--{given[0]} is a quantization flag, but --ptq is not given: the run would be FP",
                         "add --ptq to quantize, or drop the quantization flags")


def check_quant_flags(args) -> None:
    """Ranges and combinations of the quantization flags (before any work)."""
    check_rules(args, QUANT_RULES)
    if getattr(args, "resume", None) is True and not args.cali_ckpt:
        raise UsageError("--resume needs --cali_ckpt (the calibrated checkpoint to resume from)")
    if args.resume_w and not (args.cali_ckpt and args.quant_mode == QuantMode.QDIFF.value):
        raise UsageError("--resume_w needs --quant_mode qdiff and --cali_ckpt")
    if args.eps_rescale and args.eps_correction:
        raise UsageError("--eps_rescale and --eps_correction are two corrections of the same output: use one")
    if args.backend == "int" and getattr(args, "compile", False):
        raise UsageError("--compile compiles the simulated model; the integer backend fuses its own quantize step",
                         "drop --compile with --backend int")
    if args.cali_ckpt and is_int_file(args.cali_ckpt):
        if args.backend != "int":
            raise UsageError(f"--cali_ckpt {args.cali_ckpt} is a packed integer model: it runs with --backend int")
        if corrects_output(args) or args.resume_w:
            raise UsageError(f"--cali_ckpt {args.cali_ckpt} is a packed integer model: --eps_rescale, "
                             "--eps_correction and --resume_w need the simulated model", "give its quantized.pt")
    if args.distill_fp_input > 0 and args.quant_mode == QuantMode.BASELINE.value:
        raise UsageError("--distill_fp_input sets the inputs of block reconstruction, which the baseline does not run: "
                         "use --quant_mode dilatequant or qdiff")
    for flag, default in (("scaling", Scaling.WEIGHT_DILATION.value), ("bkd_training", BKDTraining.JOINT.value)):
        if args.quant_mode != QuantMode.DILATEQUANT.value and getattr(args, flag) != default:
            raise UsageError(f"--{flag} {getattr(args, flag)} is a DilateQuant setting: add --quant_mode dilatequant")


# ---------------------------------------------------------------------------------------------------
# Typed settings from flags
# ---------------------------------------------------------------------------------------------------

def quant_config(args) -> QuantConfig:
    return QuantConfig(weight_bit=args.weight_bit, act_bit=args.act_bit if args.quant_act else None,
                       a_sym=args.a_sym, sm_abit=args.sm_abit, split=args.split)


def dilatequant_config(args) -> DilateQuantConfig:
    distill = DistillConfig(iters=args.cali_iters, batch_size=args.distill_batch_size, lr_weight=args.lr_weight,
                            lr_quant=args.lr_quant, lr_act=args.lr_act, lr_scale=args.lr_scale,
                            lr_schedule=LRSchedule(args.lr_schedule), t_weight_sigma=args.t_weight_sigma,
                            cache_dtype=CACHE_DTYPES[args.cache_dtype], cache_ram_gb=args.cache_ram_gb,
                            fp_input=args.distill_fp_input, training=BKDTraining(args.bkd_training), seed=args.seed)
    return DilateQuantConfig(weight_dilation=args.wd, scaling=Scaling(args.scaling), temporal=args.tpq,
                             distillation=args.bkd, distill=distill)


def qdiff_settings(args) -> QDiffConfig:
    return QDiffConfig(weight_iters=args.cali_iters, act_iters=args.cali_iters_a, act_lr=args.cali_lr, lp=args.cali_p,
                       act_lr_schedule=LRSchedule(args.lr_schedule), running_stat=args.running_stat,
                       batch_size=args.distill_batch_size, cache_dtype=CACHE_DTYPES[args.cache_dtype],
                       cache_ram_gb=args.cache_ram_gb, fp_input=args.distill_fp_input, seed=args.seed)


EPS_CORRECTED = "+epsbc"   # method-name suffix of a model with the eps-mean correction (--eps_correction)
EPS_RESCALED = "+rescale"  # method-name suffix of a model with the eps rescale (--eps_rescale)


def method_name(args) -> str:
    """'dilatequant', e.g. 'dilatequant[wd,tpq]' for a Table 3 ablation row; '+epsbc' with --eps_correction,
    '+rescale' with --eps_rescale, '+tw0.2' with --t_weight_sigma 0.2, '+fpin0.5' with --distill_fp_input 0.5,
    '+staged' with --bkd_training staged (beyond the paper)."""
    suffix = correction_suffix(args)
    reconstructs = args.quant_mode == QuantMode.QDIFF.value or (args.quant_mode == QuantMode.DILATEQUANT.value and
                                                                 args.bkd)
    if reconstructs and args.distill_fp_input > 0:
        suffix = f"+fpin{args.distill_fp_input:g}" + suffix
    if args.quant_mode != QuantMode.DILATEQUANT.value:
        return args.quant_mode + suffix
    if args.bkd and args.t_weight_sigma is not None:
        suffix = f"+tw{args.t_weight_sigma:g}" + suffix
    if args.bkd and args.bkd_training != BKDTraining.JOINT.value:
        suffix = f"+{args.bkd_training}" + suffix
    if args.wd and args.tpq and args.bkd and args.scaling == Scaling.WEIGHT_DILATION.value:
        return args.quant_mode + suffix
    scaling = "wd" if args.scaling == Scaling.WEIGHT_DILATION.value else args.scaling
    parts = [n for n, on in ((scaling, args.wd), ("tpq", args.tpq), ("bkd", args.bkd)) if on]
    return f"dilatequant[{','.join(parts) or 'none'}]{suffix}"


def corrects_output(args) -> bool:
    """A per-timestep correction of the quantized eps is asked for (--eps_correction, --eps_rescale)."""
    return bool(args.eps_correction or getattr(args, "eps_rescale", False))


def correction_suffix(args) -> str:
    return EPS_CORRECTED if args.eps_correction else EPS_RESCALED if getattr(args, "eps_rescale", False) else ""


def base_method(method: str) -> str:
    """'dilatequant+tw0.2' -> 'dilatequant', 'dilatequant[wd,tpq]' -> 'dilatequant', 'qdiff+epsbc' -> 'qdiff'."""
    return re.split(r"[\[+]", method, maxsplit=1)[0]
