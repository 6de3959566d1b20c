"""Quantization flags shared by the sampling scripts (Q-Diffusion's names, seed 003), their valid ranges, and
the typed settings they build. Every flag is checked before any work or any write (`check_quant_flags`)."""
from __future__ import annotations

import argparse
import json
import re
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from common.checkpoint import check_file
from common.errors import UsageError
from quant.deploy.file import is_int_file
from quant.methods import Flag, method_type, methods
from quant.methods.options import at_least, optional
from quant.settings import ALLOWED_BITS, QuantConfig


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
    """The quantization flags: the shared ones, then one group per registered method with its own options
    (quant.methods; an option two methods share is listed under the first and named in the other's group).
    resume_flag=False leaves out the boolean --resume (the LDM script's -r/--resume names the checkpoint, as in
    Q-Diffusion); without it, --cali_ckpt is used as is, as with --resume."""
    q = p.add_argument_group("quantization")
    q.add_argument("--ptq", action="store_true", help="quantize the model")
    q.add_argument("--quant_mode", default="baseline", choices=list(methods()),
                   help="the method (registered in quant.methods; --method_plugin adds one)")
    q.add_argument("--method_plugin", default=None, metavar="FILE.py",
                   help="a Python file that registers a quantization method (quant.methods.register_method), "
                        "loaded before the flags are read")
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
    if resume_flag:
        q.add_argument("--resume", action="store_true", help="with --cali_ckpt: use the calibrated model as is")
    q.add_argument("--resume_w", action="store_true",
                   help="qdiff, with --cali_ckpt: keep its quantized weights, recalibrate the activations")
    added: set[str] = set()
    for name, kind in methods().items():
        shared = [f.name for f in kind.flags if f.dest in added]
        summary = (kind.__doc__ or "").strip().split("\n")[0]
        group = p.add_argument_group(f"--quant_mode {name}", " ".join(
            [summary] + ([f"Also: {', '.join(shared)} (above)."] if shared else [])) or None)
        for flag in kind.flags:
            if flag.dest not in added:
                _add_flag(group, flag)
                added.add(flag.dest)


def _add_flag(group, flag: Flag) -> None:
    if flag.kind == "switch":
        group.add_argument(flag.name, action="store_true", help=flag.help)
    elif flag.kind == "toggle":
        group.add_argument(flag.name, action=argparse.BooleanOptionalAction, default=flag.default, help=flag.help)
    else:
        group.add_argument(flag.name, type=flag.type, default=flag.default, choices=flag.choices, help=flag.help)


def method_flags() -> dict[str, Flag]:
    """Every registered method's options by destination (a shared option once)."""
    return {f.dest: f for kind in methods().values() for f in kind.flags}


def parse_flags(build_parser: Callable[[], argparse.ArgumentParser], argv=None) -> argparse.Namespace:
    """Load --method_plugin (if given), then build the parser and parse argv (default: the command line)."""
    import sys
    argv = sys.argv[1:] if argv is None else list(argv)
    load_method_plugin(argv)
    return build_parser().parse_args(argv)


def load_method_plugin(argv) -> None:
    """--method_plugin FILE.py: run the file (it registers a method) before the parser is built, so that its
    name and options are flags."""
    argv = list(argv)
    for i, a in enumerate(argv):
        path = argv[i + 1] if a == "--method_plugin" and i + 1 < len(argv) else (
            a.split("=", 1)[1] if a.startswith("--method_plugin=") else None)
        if path is None:
            continue
        import importlib.util
        if not Path(path).is_file():
            raise UsageError(f"--method_plugin {path}: no such file", "pass a Python file that calls "
                             "quant.methods.register_method")
        resolved = str(Path(path).resolve())
        if resolved in _PLUGINS:                     # run once per process (it registers its method)
            continue
        spec = importlib.util.spec_from_file_location(f"method_plugin_{Path(path).stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _PLUGINS[resolved] = module


_PLUGINS: dict[str, object] = {}


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


QUANT_RULES: list[Rule] = [              # the shared flags; each method's options carry their own (quant.methods)
    ("weight_bit", lambda v: 2 <= v <= 8, BITS), ("act_bit", lambda v: 2 <= v <= 8, BITS),
    ("sm_abit", optional(lambda v: v in ALLOWED_BITS), "2..8 or 16"),
    ("cali_n", at_least(1), ">= 1"), ("cali_st", at_least(1), ">= 1"), ("cali_per_traj", at_least(1), ">= 1"),
    ("cali_batch_size", at_least(1), ">= 1"), ("eps_correction", at_least(0), ">= 0 trajectories (0 = off)"),
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
    return {a.dest: a.default for a in p._actions if a.dest not in ("help", "ptq", "method_plugin")}


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
    for flag in method_flags().values():
        flag.check(getattr(args, flag.dest))
    if getattr(args, "resume", None) is True and not args.cali_ckpt:
        raise UsageError("--resume needs --cali_ckpt (the calibrated checkpoint to resume from)")
    if args.resume_w and not (args.cali_ckpt and args.quant_mode == "qdiff"):
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
    own = {f.dest for f in method_type(args.quant_mode).flags}
    for flag in method_flags().values():           # an exclusive option of other methods would be ignored
        value = getattr(args, flag.dest)
        if flag.exclusive and flag.dest not in own and value != flag.default:
            owners = [n for n, kind in methods().items() if flag.dest in {f.dest for f in kind.flags}]
            raise UsageError(f"{flag.name} {value} is a setting of {' and '.join(owners)}, not of "
                             f"{args.quant_mode}", f"use --quant_mode {' or '.join(owners)}")


# ---------------------------------------------------------------------------------------------------
# Typed settings from flags
# ---------------------------------------------------------------------------------------------------

def quant_config(args) -> QuantConfig:
    return QuantConfig(weight_bit=args.weight_bit, act_bit=args.act_bit if args.quant_act else None,
                       a_sym=args.a_sym, sm_abit=args.sm_abit, split=args.split)


def method_config(args):
    """The typed config of --quant_mode's method, from its options."""
    kind = method_type(args.quant_mode)
    return kind.from_flags({f.dest: getattr(args, f.dest) for f in kind.flags}, args.seed)


EPS_CORRECTED = "+epsbc"   # method-name suffix of a model with the eps-mean correction (--eps_correction)
EPS_RESCALED = "+rescale"  # method-name suffix of a model with the eps rescale (--eps_rescale)


def method_name(args) -> str:
    """The method's label (quant.methods: e.g. 'dilatequant[wd,tpq]' for a Table 3 ablation row, '+tw0.2',
    '+fpin0.5', '+staged' for options beyond the paper), then '+epsbc' with --eps_correction, '+rescale' with
    --eps_rescale."""
    return method_config(args).label() + correction_suffix(args)


def corrects_output(args) -> bool:
    """A per-timestep correction of the quantized eps is asked for (--eps_correction, --eps_rescale)."""
    return bool(args.eps_correction or getattr(args, "eps_rescale", False))


def correction_suffix(args) -> str:
    return EPS_CORRECTED if args.eps_correction else EPS_RESCALED if getattr(args, "eps_rescale", False) else ""


def base_method(method: str) -> str:
    """'dilatequant+tw0.2' -> 'dilatequant', 'dilatequant[wd,tpq]' -> 'dilatequant', 'qdiff+epsbc' -> 'qdiff'."""
    return re.split(r"[\[+]", method, maxsplit=1)[0]
