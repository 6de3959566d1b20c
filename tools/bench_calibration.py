"""Calibration cost of task runs measured side by side, under the same load: every run calibrates in its own
process with --threads threads, all started together; sampling is cut to a few images and FID is skipped.

    python tools/bench_calibration.py configs/tasks/mnist.yml:qdiff_w6a6 \\
        configs/tasks/mnist_epsbc.yml:dilatequant_w6a6_epsbc32 --out results/calib_cost_w6a6.json

Prints calibration seconds (eps correction included, and also alone), peak memory and both as a ratio to the
first run. Give as many runs as the machine has cores, or the later ones wait for a core and look slower.
Every run calibrates from scratch in <workdir>/<task>/<run> (removed first). A run that reads another run's file
(`{out}/baseline_w8a8/calib.pt`, a shared calibration set) needs it copied under <workdir>/<task>/ first;
`fp_samples` is dropped (no FID is computed).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.files import write_json  # noqa: E402
from experiments.task import load_task, pipeline, run_argv  # noqa: E402


def short_sampling(module) -> list[str]:
    """Flags that cut a run of this pipeline module to 4 images and no FID (its SAMPLING_FLAGS: count, batch, ...)."""
    flags = getattr(module, "SAMPLING_FLAGS", None)
    if flags is None:
        raise SystemExit(f"{module.__name__} runs cannot be cut short here: benchmark a ddim or ldm task")
    count, batch = flags[:2]
    return [f"--{count}", "4", f"--{batch}", "4", "--no_fid"]


def parse_run(spec: str) -> tuple[Path, str]:
    path, _, name = spec.rpartition(":")
    if not path or not Path(path).is_file():
        raise SystemExit(f"{spec}: give a run as <task.yml>:<run name>, e.g. configs/tasks/mnist.yml:qdiff_w6a6")
    runs = load_task(Path(path), None)["runs"]
    if name not in runs:
        raise SystemExit(f"{spec}: {path} has no run {name!r}; it has {list(runs)}")
    return Path(path), name


def start(path: Path, name: str, workdir: Path, threads: int, device: str | None = None) -> tuple[subprocess.Popen, Path]:
    out = workdir / path.stem
    logdir = out / name
    shutil.rmtree(logdir, ignore_errors=True)
    logdir.mkdir(parents=True)
    log = logdir.parent / f"{name}.log"
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    task = load_task(path, None)
    task["runs"][name] = {k: v for k, v in (task["runs"][name] or {}).items() if k != "fp_samples"}   # no FID here
    module, script = pipeline(task)
    argv = [sys.executable, str(script),
            *run_argv(task, name, out, short_sampling(module) + (["--device", device] if device else []))]
    return subprocess.Popen(argv, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT), logdir


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="<task.yml>:<run name>")
    p.add_argument("--threads", type=int, default=1, help="threads per run")
    p.add_argument("--device", default=None, help="passed to every run (default: cuda if available, else cpu)")
    p.add_argument("--workdir", default="runs/bench_calibration")
    p.add_argument("--out", default=None, help="JSON file for the rows")
    args = p.parse_args(argv)
    specs = [parse_run(s) for s in args.runs]
    started = [(name, *start(path, name, Path(args.workdir), args.threads, args.device)) for path, name in specs]
    rows = []
    for name, proc, logdir in started:
        if proc.wait():
            raise SystemExit(f"{name} failed (exit {proc.returncode}); its log: {logdir.parent / (name + '.log')}")
        r = json.loads((logdir / "results.json").read_text())
        rows.append({"run": name, "method": r["method"], "calib_seconds": r["calib_seconds"],
                     "eps_correction_seconds": r.get("eps_correction_seconds"), "peak_mem_mb": r["peak_mem_mb"]})
    first = rows[0]
    for r in rows:
        r["time_ratio"] = r["calib_seconds"] / first["calib_seconds"]
        r["memory_ratio"] = r["peak_mem_mb"] / first["peak_mem_mb"]
    print("| run | method | calib s | of which eps correction | peak MB | time ratio | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        corr = "" if r["eps_correction_seconds"] is None else f"{r['eps_correction_seconds']:.0f}"
        print(f"| {r['run']} | {r['method']} | {r['calib_seconds']:.0f} | {corr} | {r['peak_mem_mb']:.0f} | "
              f"{r['time_ratio']:.2f} | {r['memory_ratio']:.2f} |")
    if args.out:
        record = {"command": "python tools/bench_calibration.py " + " ".join(args.runs) + f" --threads {args.threads}",
                  "cpu_count": os.cpu_count(), "rows": rows}
        write_json(args.out, record)
    return rows


if __name__ == "__main__":
    from common.errors import entry_point
    entry_point(main)
