"""Gather <runs>/*/results.json into a markdown table and a sample-grid figure (FP vs methods).

    python tools/results_table.py runs/mnist --out results/mnist.md

Every run's record and its first GRID_N samples are archived next to the table, in
results/<table>_runs/<run>.json and .npz, and the table and figure are drawn from that archive: runs done
on another day (or machine) stay in the table after their run directory is gone.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddim.sampling import make_grid  # noqa: E402
from evaluation.fidelity import paired_psnr_db  # noqa: E402

COLUMNS = [("run", "{}"), ("method", "{}"), ("W/A", "{}"), ("FID", "{:.2f}"), ("sFID", "{:.2f}"),
           ("PSNR to FP dB", "{:.2f}"), ("IS", "{:.2f}"),
           ("calib s", "{:.0f}"), ("peak MB", "{:.0f}"), ("sampling s", "{:.0f}"), ("n", "{}"), ("steps", "{}")]


def _bits(r: dict) -> str:
    if r.get("method") == "fp":
        return "32/32"
    return f"{r.get('weight_bit')}/{r.get('act_bit') or 32}"


def row(name: str, r: dict) -> list[str]:
    values = [name, r.get("method"), _bits(r), r.get("fid"), r.get("sfid"), r.get("psnr_to_fp_db"), r.get("is"), r.get("calib_seconds"),
              r.get("peak_mem_mb"), r.get("sampling_seconds"), r.get("n_samples"), r.get("steps")]
    return ["n/a" if v is None else fmt.format(v) for v, (_, fmt) in zip(values, COLUMNS)]


GRID_N = 16


def collect(runs: Path) -> list[tuple[str, dict]]:
    return [(p.parent.name, json.loads(p.read_text())) for p in sorted(runs.glob("*/results.json"))]


PAIRING = ("n_samples", "steps", "skip_type", "eta", "seed", "config")


def add_psnr_to_fp(runs: Path, results: list[tuple[str, dict]]) -> None:
    """Give each quantized run `psnr_to_fp_db`: the median over images of the PSNR between its sample and the FP
    run's sample from the same noise, where an FP run with the same count, steps, sampler and seed is in `runs`."""
    fps = [(n, r) for n, r in results if r.get("method") == "fp" and (runs / n / "samples.npz").exists()]
    for name, record in results:
        ref = next((n for n, r in fps if all(r.get(k) == record.get(k) for k in PAIRING)), None)
        if record.get("method") == "fp" or ref is None or not (runs / name / "samples.npz").exists():
            continue
        psnr = paired_psnr_db(np.load(runs / ref / "samples.npz")["arr_0"], np.load(runs / name / "samples.npz")["arr_0"])
        record["psnr_to_fp_db"], record["psnr_ref"] = float(np.median(psnr)), ref


def archive_runs(runs: Path, archive: Path) -> list[tuple[str, dict]]:
    """Copy each run's results.json (and first GRID_N samples) into `archive`; -> every archived record."""
    archive.mkdir(parents=True, exist_ok=True)
    results = collect(runs)
    add_psnr_to_fp(runs, results)
    for name, record in results:
        (archive / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
        samples = runs / name / "samples.npz"
        if samples.exists():
            np.savez_compressed(archive / f"{name}.npz", arr_0=np.load(samples)["arr_0"][:GRID_N])
    return [(p.stem, json.loads(p.read_text())) for p in sorted(archive.glob("*.json"))]


def markdown(results: list[tuple[str, dict]], title: str) -> str:
    head = "| " + " | ".join(c for c, _ in COLUMNS) + " |"
    sep = "|" + "---|" * len(COLUMNS)
    body = ["| " + " | ".join(row(n, r)) + " |" for n, r in results]
    note = ("PSNR to FP: median over images of the PSNR between a run's sample and the FP run's sample from the same "
            "noise (what quantization keeps; n/a where no paired FP run was in the same run folder). "
            "IS is n/a: it needs the real Inception classifier head, which no package here ships. "
            "peak MB: CUDA peak allocation, or on CPU the process's peak resident memory at the end of calibration.")
    sources = [f"{n}: {r['source']}" for n, r in results if r.get("source")]   # rows not run by this task
    return "\n".join([f"## {title}", "", head, sep, *body, "", *sources, note, ""])


def grid_figure(archive: Path, names: list[str], out: Path) -> None:
    """One labelled grid of the archived first samples per run (same seeds: image i starts from the same noise)."""
    cols = []
    for name in names:
        path = archive / f"{name}.npz"
        if not path.exists():
            continue
        g = make_grid(np.load(path)["arr_0"][:GRID_N]).convert("RGB")
        canvas = Image.new("RGB", (max(g.width, 8 * len(name)), g.height + 14), "white")
        canvas.paste(g, (0, 14))
        ImageDraw.Draw(canvas).text((2, 1), name, fill="black")
        cols.append(canvas)
    if cols:
        fig = Image.new("RGB", (sum(c.width + 6 for c in cols), max(c.height for c in cols)), "white")
        x = 0
        for c in cols:
            fig.paste(c, (x, 0))
            x += c.width + 6
        fig.save(out)


def write_report(runs: Path, out: Path, title: str) -> Path:
    """results/<table>.md and .png from the archive results/<table>_runs/, after adding the runs in `runs`."""
    archive = out.with_name(out.stem + "_runs")
    results = sorted(archive_runs(runs, archive), key=lambda nr: nr[1].get("method") != "fp")   # FP rows first
    out.write_text(markdown(results, title))
    grid_figure(archive, [n for n, _ in results], out.with_suffix(".png"))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs")
    p.add_argument("--out", required=True)
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    print(write_report(Path(args.runs), Path(args.out), args.title or args.runs).read_text())


if __name__ == "__main__":
    from common.errors import entry_point
    entry_point(main)
