"""Run a task: every (method, bit width) of a task config through the DDIM pipeline, then tabulate.

    python scripts/run_task.py --task configs/tasks/mnist.yml [--preset quick] [--only fp,dilatequant_w4a4]

Each run is its own process and lands in <out>/<run name>/ (results.json, samples, quantized.pt, distill/ units); a run whose
results.json records the same settings and input contents is skipped, so an interrupted task resumes. The table goes
to <out>/report.md, or to --report (e.g. results/mnist.md, to regenerate a committed table on purpose).
"""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import yaml

from common.errors import RunError, UsageError
from experiments.flags import HelpFormatter, quant_flag_defaults
from experiments.runtime import recorded_identity
from experiments.report import write_report

ROOT = Path(__file__).resolve().parents[1]


def _flags(options: dict) -> list[str]:
    out = []
    for key, value in options.items():
        if value is True:
            out.append(f"--{key}")
        elif value is False:
            out.append(f"--no-{key}")
        elif value is not None:
            out += [f"--{key}", str(value)]
    return out


def load_task(path: Path, preset: str | None) -> dict:
    if not path.is_file():
        raise UsageError(f"task {path} not found; see configs/tasks/")
    task = yaml.safe_load(path.read_text())
    if preset:
        presets = task.get("presets", {})
        if preset not in presets:
            raise UsageError(f"unknown preset {preset!r} for {path}; known: {sorted(presets)}")
        over = presets[preset]
        task["common"] = task["common"] | over.get("common", {})
        if "runs" in over:
            task["runs"] = {k: v for k, v in task["runs"].items() if k in over["runs"]}
        for name, flags in over.get("overrides", {}).items():      # per-run settings of this preset
            task["runs"][name] = (task["runs"][name] or {}) | flags
        task["title"] = over.get("title", task.get("title"))
    return task


def run_argv(task: dict, name: str, out: Path, extra: list[str]) -> list[str]:
    """Flags of one run: the task's common settings, then the run's own (a quant_mode makes it a PTQ run; the
    common quantization settings are not given to the FP runs). `{out}` in a value is the task's run folder
    (e.g. another run's calib.pt: `{out}/baseline_w4a4/calib.pt`)."""
    options = {k: v.replace("{out}", str(out)) if isinstance(v, str) else v
               for k, v in (task["common"] | (task["runs"][name] or {})).items()}
    if "quant_mode" not in options:
        options = {k: v for k, v in options.items() if k not in quant_flag_defaults()}
    quant = {"ptq": True, "quant_act": "act_bit" in options} if "quant_mode" in options else {}
    logdir_flag = PIPELINES[task.get("pipeline", "ddim")][2] if task.get("pipeline", "ddim") in PIPELINES else "-l"
    return _flags(options | quant) + [logdir_flag, str(out / name)] + extra


PIPELINES = {"ddim": ("experiments.ddim_task", ROOT / "scripts" / "sample_diffusion_ddim.py", "-l"),
             "ldm": ("experiments.ldm_task", ROOT / "scripts" / "sample_diffusion_ldm.py", "-l"),
             "txt2img": ("experiments.txt2img_task", ROOT / "scripts" / "txt2img.py", "--outdir")}


def pipeline(task: dict):
    """(pipeline module, its script) of a task: `pipeline: ddim` (default) or `pipeline: ldm`."""
    name = task.get("pipeline", "ddim")
    if name not in PIPELINES:
        raise UsageError(f"unknown pipeline {name!r} in the task; choose one of {sorted(PIPELINES)}")
    module, script, _ = PIPELINES[name]
    return importlib.import_module(module), script


def is_done(task: dict, argv: list[str], results: Path) -> bool:
    """Whether results.json records a finished run with exactly these settings and input contents."""
    recorded = recorded_identity(results)
    if recorded is None:
        return False
    module, _ = pipeline(task)
    try:
        return module.identity(module.build_parser().parse_args(argv)) == recorded
    except (OSError, RunError):                         # an input is missing: not done (the run will say why)
        return False


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--task", required=True)
    p.add_argument("--preset", default=None)
    p.add_argument("--only", default=None, help="comma-separated run names")
    p.add_argument("--out", default=None, help="run directory (default runs/<task>[_<preset>])")
    p.add_argument("--report", default=None, help="the table (default <out>/report.md; e.g. results/mnist.md to "
                                                  "regenerate a committed table on purpose)")
    p.add_argument("--overwrite", action="store_true",
                   help="rerun runs whose finished results were made with other settings (each run's old results stay "
                        "until its new ones are written); without it such a run is refused")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="flags passed to every run after `--`")
    args = p.parse_args(argv)
    path = Path(args.task)
    task = load_task(path, args.preset)
    label = path.stem + (f"_{args.preset}" if args.preset else "")
    out = Path(args.out or f"runs/{label}")
    names = args.only.split(",") if args.only else list(task["runs"])
    unknown = [n for n in names if n not in task["runs"]]
    if unknown:
        raise UsageError(f"unknown runs {unknown}; {path} has {list(task['runs'])}")
    extra = [a for a in args.extra if a != "--"] + (["--overwrite"] if args.overwrite else [])
    for name in names:
        argv_run = run_argv(task, name, out, extra)
        if is_done(task, argv_run, out / name / "results.json"):
            print(f"[task] {name}: done with these settings and inputs, skipping ({out / name / 'results.json'})")
            continue
        print(f"[task] {name}", flush=True)
        # one process per run: on CPU, peak memory is the process's peak resident set, which must not
        # include earlier runs (or their FID Inception)
        if subprocess.run([sys.executable, str(pipeline(task)[1]), *argv_run]).returncode:
            raise RunError(f"run {name} failed (its error is above)", "fix it and rerun: finished runs are skipped")
    title = task.get("title", label) + (f", preset {args.preset}" if args.preset else "") + f" ({path})"
    report = write_report(out, Path(args.report or out / "report.md"), title=title)
    print(report.read_text())
    return report
