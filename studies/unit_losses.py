"""Distillation losses unit by unit, side by side for several runs (from each run's distill/unit_*.pt).

    python studies/unit_losses.py runs/mnist/dilatequant_w4a4 runs/mnist/dilatequant_w4a4_split \\
        --out results/mnist_unit_losses_w4a4.json

Per unit: the MSE to the FP unit output over all calibration samples before and after training (what
quant/distill.py logged), and for every run after the first its final loss over the first run's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.files import write_json  # noqa: E402


def unit_logs(run: Path) -> list[dict]:
    """The logged entries (unit, loss_before, loss_after, kept_initial) of a run's finished units, in order."""
    paths = sorted((run / "distill").glob("unit_*.pt"))
    if not paths:
        raise SystemExit(f"{run}: no distill/unit_*.pt (give the folder of a DilateQuant run with --bkd)")
    return [torch.load(p, map_location="cpu", weights_only=True)["log"] for p in paths]


def compare(runs: list[Path]) -> list[dict]:
    """One row per unit of the first run: each run's losses and its final loss over the first run's."""
    logs = [{e["unit"]: e for e in unit_logs(r)} for r in runs]
    rows = []
    for unit, first in logs[0].items():
        row = {"unit": unit}
        for run, log in zip(runs, logs):
            e = log.get(unit)
            row[str(run)] = None if e is None else {
                "loss_before": e["loss_before"], "loss_after": e["loss_after"],
                "after_over_first": e["loss_after"] / first["loss_after"]}
        rows.append(row)
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (runs/<task>/<run>)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    runs = [Path(r) for r in args.runs]
    rows = compare(runs)
    for row in rows:
        cells = [f"{e['loss_before']:.3e} -> {e['loss_after']:.3e} ({e['after_over_first']:.3f})" if e else "-"
                 for e in (row[str(r)] for r in runs)]
        print(f"{row['unit']:>20}  " + "  |  ".join(cells))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, {"command": " ".join(sys.argv), "rows": rows})
    return rows


if __name__ == "__main__":
    from common.errors import entry_point
    entry_point(main)
