"""How far training moved the step sizes Δ_x (and Δ_w): a calibrated checkpoint before training vs after.

    python studies/step_size_drift.py runs/mnist_ablation/tpq/quantized.pt runs/mnist_ablation/tpq_bkd/quantized.pt \\
        --calib runs/mnist_ablation/tpq_bkd/calib.pt --out results/mnist_step_drift.json

Both checkpoints must hold the same quantizers (e.g. a Table 3 row without BKD and the same row with BKD:
same calibration set, same initialisation). Per activation quantizer and slot (a TPQ slot is one timestep;
a shared quantizer has one slot), r = Δ_after / Δ_before. Reported: the share of slots moved by more than
10% and 25%, quantiles of |log2 r|, and, with --calib, the same split by how many calibration samples
the slot's timestep had (a TPQ slot learns only from the samples of its timestep in each batch). Under
"weights", the same statistics of r = Δ_w,after / Δ_w,before over every weight quantizer's out-channels.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.files import write_json  # noqa: E402
from quant.calib_data import CalibSet  # noqa: E402
from quant.checkpoint import read_quantized  # noqa: E402
from quant.slots import SlotIndex  # noqa: E402

ACT_STEP = re.compile(r"^model\.(.+\.a_quant\.\d+)\.delta$")     # every activation quantizer's Δ_x
WEIGHT_STEP = re.compile(r"^model\.(.+\.w_quant)\.delta$")          # every weight quantizer's Δ_w


def _load(path: str) -> dict:
    try:
        return read_quantized(path)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None


STEP_KINDS = {"activation": ACT_STEP, "weight": WEIGHT_STEP}


def step_ratios(before: dict, after: dict, kind: str = "activation") -> dict[str, torch.Tensor]:
    """{quantizer name: Δ_after / Δ_before per slot (activations) or out-channel (weights)} over the
    `kind` quantizers of both checkpoints."""
    pattern = STEP_KINDS[kind]
    a, b = before["state_dict"], after["state_dict"]
    names = sorted(k for k in a if pattern.match(k))
    if names != sorted(k for k in b if pattern.match(k)) or any(a[k].shape != b[k].shape for k in names):
        raise SystemExit(f"the checkpoints hold different {kind} quantizers: compare runs with the same "
                         "--tpq/--split/bit settings")
    return {pattern.match(k).group(1): b[k] / a[k] for k in names}


def summary(logr: torch.Tensor) -> dict:
    """Drift statistics of a flat tensor of |log2 r|."""
    q = torch.quantile(logr, torch.tensor([0.5, 0.9, 0.99]))
    return {"slots": logr.numel(), "moved_10pct": float((logr > torch.log2(torch.tensor(1.1))).float().mean()),
            "moved_25pct": float((logr > torch.log2(torch.tensor(1.25))).float().mean()),
            "abs_log2_median": float(q[0]), "abs_log2_p90": float(q[1]), "abs_log2_p99": float(q[2])}


def slot_counts(schedule: list[int], calib_path: str) -> torch.Tensor:
    """Calibration samples per TPQ slot of a model calibrated for `schedule`."""
    steps = SlotIndex(schedule)
    return torch.bincount(steps.lookup(CalibSet.load(Path(calib_path)).t), minlength=steps.num_slots)


def drift_report(before_path: str, after_path: str, calib_path: str | None = None) -> dict:
    before, after = _load(before_path), _load(after_path)
    ratios = step_ratios(before, after)
    logr = {n: r.log2().abs() for n, r in ratios.items()}
    report = {"before": before_path, "after": after_path, "all": summary(torch.cat(list(logr.values()))),
              "per_quantizer_median_abs_log2": {n: float(v.median()) for n, v in logr.items()}}
    weights = step_ratios(before, after, "weight")
    if weights:
        report["weights"] = summary(torch.cat([r.log2().abs() for r in weights.values()]))
    slots = {v.numel() for v in logr.values()}
    if calib_path and slots != {1}:
        counts = slot_counts(after["schedule"], calib_path)
        stacked = torch.stack(list(logr.values()))           # [quantizers, slots]
        cut = int(counts.float().median())
        report["calib_samples_per_slot"] = {"min": int(counts.min()), "median": cut, "max": int(counts.max())}
        report[f"slots with <= {cut} calibration samples"] = summary(stacked[:, counts <= cut].flatten())
        report[f"slots with > {cut} calibration samples"] = summary(stacked[:, counts > cut].flatten())
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pairs", nargs="+", help="BEFORE AFTER [BEFORE AFTER ...] quantized.pt checkpoints")
    p.add_argument("--calib", nargs="*", default=None, help="calib.pt per pair (slot sample counts)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if len(args.pairs) % 2:
        raise SystemExit("give checkpoints in BEFORE AFTER pairs")
    pairs = list(zip(args.pairs[::2], args.pairs[1::2]))
    calibs = args.calib or [None] * len(pairs)
    if len(calibs) != len(pairs):
        raise SystemExit(f"--calib needs one calib.pt per pair ({len(pairs)})")
    reports = [drift_report(b, a, c) for (b, a), c in zip(pairs, calibs)]
    for r in reports:
        print(f"{r['before']} -> {r['after']}:",
              json.dumps({k: v for k, v in r.items() if k not in ("before", "after", "per_quantizer_median_abs_log2")}))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, reports)


if __name__ == "__main__":
    from common.errors import entry_point
    entry_point(main)
