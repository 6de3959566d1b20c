"""Timing, peak memory and stage caching for runs."""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch


@contextmanager
def timer() -> Iterator[dict]:
    """with timer() as t: ...; t["seconds"] holds the wall-clock time afterwards."""
    out = {"seconds": None}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - start


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset. CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2 ** 20 if sys.platform == "darwin" else kb / 2 ** 10


def save_args(logdir: Path, args) -> None:
    """The resolved settings of a run, next to its results."""
    logdir.mkdir(parents=True, exist_ok=True)
    (logdir / "args.json").write_text(json.dumps(vars(args), indent=2, default=str) + "\n")


def _canonical(key: dict) -> dict:
    return json.loads(json.dumps(key, sort_keys=True, default=str))


def stage_record(path: Path) -> dict | None:
    """The record a stage saved at `path` with save_stage, whatever its settings; None when it is missing."""
    return json.loads(path.read_text())["record"] if path.exists() else None


def load_stage(path: Path, key: dict) -> dict | None:
    """The record a finished stage saved at `path` with save_stage, if it was made with the same `key`
    (the settings it depends on); None when it is missing or was made with other settings."""
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return saved["record"] if saved.get("key") == _canonical(key) else None


def save_stage(path: Path, key: dict, record: dict) -> None:
    """Mark a stage finished: its settings and its record (e.g. the seconds it took), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"key": _canonical(key), "record": record}, indent=2, default=str) + "\n")
    tmp.replace(path)


def update_json(path: str | Path, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `fields` into the JSON object at `path` (created if absent); returns the merged record."""
    path = Path(path)
    record = json.loads(path.read_text()) if path.is_file() else {}
    record.update(fields)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=_json_scalar) + "\n")
    os.replace(tmp, path)
    return record


def _json_scalar(value: Any) -> Any:
    """numpy / torch scalars -> Python numbers for json."""
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_results(logdir: str | Path, **fields: Any) -> dict[str, Any]:
    """Write or update `<logdir>/results.json`, the evaluation record of a run.

    Keys the pipeline passes: method, weight_bit, act_bit (None for FP), n_samples, steps, fid, sfid,
    is, sampling_seconds; any others are kept too. Existing keys not in `fields` are preserved.
    """
    return update_json(Path(logdir) / "results.json", fields)
