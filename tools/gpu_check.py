"""The one-command GPU check (`bash scripts/gpu_check.sh`): whoever has a CUDA GPU runs it in a few minutes.

    python tools/gpu_check.py --out results/gpu_check [--device cuda] [--images 1000]

1. the `cuda`-marked tests;
2. tools/bench_sampling.py at CIFAR-10 size (random weights) and on the embedded MNIST model, batch 256 / 250:
   FP32, autocast, fake-quant W8A8 / W4A4 TPQ, each also torch.compile'd;
3. the embedded MNIST model: FP sampling, then DilateQuant W4A4 (split, 1,024 calibration samples from 128
   FP trajectories, 200 iterations per unit) calibrated and sampled, --images each, 100 quad steps; paired
   PSNR of the W4A4 samples to the FP ones.
Sampling here needs no FID packages (a stock GPU image lacks them): score the samples later with
`python tools/fid.py --samples <out>/runs/<run>/samples.npz --ref mnist`.
Prints a table and writes <out>/gpu_check.json and <out>/gpu_check.md. Exits non-zero if a step fails.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from common.files import write_json  # noqa: E402
from evaluation.fidelity import paired_psnr_db  # noqa: E402

EMBEDDED = ["--config", "configs/mnist.yml", "--timesteps", "100", "--skip_type", "quad", "--eta", "0",
            "--seed", "1234", "--no_fid"]
FULL = {"bench": ["--compile"], "cifar_batch": "256", "mnist_batch": "250", "sampling": [], "calib": []}
SMOKE = {"bench": ["--repeats", "1", "--warmup", "0"], "cifar_batch": "2", "mnist_batch": "4",
         "sampling": ["--timesteps", "10", "--batch_size", "8"], "calib": ["--cali_n", "32", "--cali_iters", "2"]}
W4A4 = ["--ptq", "--quant_mode", "dilatequant", "--weight_bit", "4", "--quant_act", "--act_bit", "4", "--split",
        "--cali_n", "1024", "--cali_per_traj", "8", "--cali_iters", "200"]


def step(name: str, argv: list[str], log: Path) -> float:
    """Run one step (a Python program of this repo), its output teed to `log`; -> seconds."""
    print(f"[gpu_check] {name}: {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        for line in proc.stdout:
            out.write(line)
            if not line.startswith(("sample", "calibrat", "reconstruct", "[")):   # progress bars stay in the log
                print(f"  {line}", end="", flush=True)
    if proc.wait():
        raise SystemExit(f"[gpu_check] {name} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - start


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/gpu_check")
    p.add_argument("--device", default="cuda")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--skip_tests", action="store_true")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, no compile: checks the script itself in a minute on a CPU (numbers meaningless)")
    args = p.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    report = {"device": args.device}
    import torch
    report["torch"] = torch.__version__
    report["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None

    if not args.skip_tests:
        report["cuda_tests_seconds"] = step("cuda tests", ["-m", "pytest", "-q", "-m", "cuda", "tests"],
                                            out / "cuda_tests.log")
    for name, extra in (("cifar10", ["--config", "configs/cifar10.yml", "--random_weights", "--batch",
                                     sizes["cifar_batch"]]),
                        ("mnist", ["--config", "configs/mnist.yml", "--batch", sizes["mnist_batch"]])):
        step(f"bench {name}", ["tools/bench_sampling.py", *extra, "--device", args.device, *sizes["bench"],
                               "--out", str(out / f"bench_{name}.json")], out / f"bench_{name}.log")
        report[f"bench_{name}"] = json.loads((out / f"bench_{name}.json").read_text())["rows"]

    runs = {}
    for name, extra in (("fp", sizes["sampling"]), ("dilatequant_w4a4", W4A4 + sizes["sampling"] + sizes["calib"])):
        logdir = out / "runs" / name
        step(f"embedded {name}", ["scripts/sample_diffusion_ddim.py", *EMBEDDED, *extra, "--max_images",
                                  str(args.images), "--device", args.device, "-l", str(logdir)], out / f"{name}.log")
        runs[name] = json.loads((logdir / "results.json").read_text())
    fp = np.load(out / "runs" / "fp" / "samples.npz")["arr_0"]
    q = np.load(out / "runs" / "dilatequant_w4a4" / "samples.npz")["arr_0"]
    psnr = paired_psnr_db(fp, q)
    report["embedded"] = {k: {f: r.get(f) for f in ("sampling_seconds", "calib_seconds", "peak_mem_mb")}
                          for k, r in runs.items()}
    report["embedded"]["dilatequant_w4a4"]["median_psnr_to_fp_db"] = float(np.median(psnr[np.isfinite(psnr)]))
    write_json(out / "gpu_check.json", report)
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['gpu'] or report['device']}, torch {report['torch']}", "",
             "Regenerate: `bash scripts/gpu_check.sh` (tools/gpu_check.py).", ""]
    for name in ("cifar10", "mnist"):
        lines += [f"## Forward, {name} UNet (ms per image)", "", "| mode | ms/img | × FP32 |", "|---|---|---|"]
        lines += [f"| {r['mode']} | {r['ms_per_image']:.4f} | {r['x_fp32']:.2f} |" for r in report[f"bench_{name}"]]
        lines.append("")
    e = report["embedded"]
    lines += ["## Embedded MNIST model, 100 quad steps", "", "| run | calibration s | sampling s | peak MB | "
              "median PSNR to FP (dB) |", "|---|---|---|---|---|"]
    for name, r in e.items():
        cal = "" if r["calib_seconds"] is None else f"{r['calib_seconds']:.1f}"
        mem = "" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        lines.append(f"| {name} | {cal} | {r['sampling_seconds']:.1f} | {mem} | "
                     f"{r.get('median_psnr_to_fp_db', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from common.errors import entry_point
    entry_point(main)
