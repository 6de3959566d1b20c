"""What every run needs around its pipeline: timing and memory, content hashes, provenance, atomic writes,
stage records keyed by settings and input contents, a lock on the log directory, and the results record."""
from __future__ import annotations

import fcntl
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from common.errors import LogdirLocked
from common.files import write_json

REPO_ROOT = Path(__file__).resolve().parents[1]


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


# ---------------------------------------------------------------------------------------------------
# Content hashes and provenance
# ---------------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def code_version() -> dict:
    """The git commit of this checkout and whether its tracked files differ from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    if head.returncode:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def provenance(device: torch.device) -> dict:
    """Which code, library and machine made a record."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return code_version() | {"torch": torch.__version__, "python": platform.python_version(),
                             "device": f"{device.type}: {where}", "host": socket.gethostname()}


def update_json(path: str | Path, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `fields` into the JSON object at `path` (created if absent); returns the merged record (tools that
    add a metric to an existing record; a run writes its results.json whole with write_results)."""
    path = Path(path)
    record = json.loads(path.read_text()) if path.is_file() else {}
    record.update(fields)
    write_json(path, record)
    return record


def write_results(logdir: str | Path, record: Mapping[str, Any]) -> dict[str, Any]:
    """Write `<logdir>/results.json`, the record of the run that just finished, whole: nothing of an earlier
    run in the same directory survives in it."""
    write_json(Path(logdir) / "results.json", record)
    return dict(record)


def recorded_identity(results: Path) -> dict | None:
    """{"settings", "inputs"} that a results.json records of the run that made it (None: no such record)."""
    if not results.is_file():
        return None
    try:
        record = json.loads(results.read_text())
    except json.JSONDecodeError:
        return None
    return {"settings": record.get("settings"), "inputs": record.get("inputs")}


def save_args(logdir: Path, args) -> None:
    """The resolved settings of a run, next to its results."""
    write_json(logdir / "args.json", {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})


# ---------------------------------------------------------------------------------------------------
# A finished run, moved aside
# ---------------------------------------------------------------------------------------------------

PREVIOUS_RUN = "previous_run"
# What a finished run consists of beyond its keyed caches: its record, samples and calibrated model.
RUN_FILES = ("results.json", "args.json", "samples.npz", "images", "grid.png", "quantized.pt", "quantize.json")


def retire_finished_run(logdir: Path) -> Path | None:
    """Before a new run (--overwrite) replaces a file of the finished run in `logdir` (its calibrated model),
    move that run whole (RUN_FILES) into <logdir>/previous_run/, replacing an older one; the record goes first,
    so the directory stops claiming a finished run before anything of it moves. The next published run
    removes previous_run/. -> where it went (None: no finished run)."""
    if not (logdir / "results.json").exists():
        return None
    previous = logdir / PREVIOUS_RUN
    shutil.rmtree(previous, ignore_errors=True)
    previous.mkdir()
    for name in RUN_FILES:
        if (logdir / name).exists():
            os.replace(logdir / name, previous / name)
    print(f"[overwrite] the finished run of other settings is moved to {previous} until this run has finished",
          flush=True)
    return previous


# ---------------------------------------------------------------------------------------------------
# Stage records
# ---------------------------------------------------------------------------------------------------

def canonical(key: Mapping) -> dict:
    return json.loads(json.dumps(key, sort_keys=True, default=str))


def load_stage(path: Path, key: Mapping) -> dict | None:
    """The record a finished stage saved at `path` with save_stage, if it was made with the same `key` (the
    settings and input contents it depends on); None when it is missing or was made with another key."""
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return saved["record"] if saved.get("key") == canonical(key) else None


def save_stage(path: Path, key: Mapping, record: Mapping) -> None:
    """Mark a stage finished: its key and its record (e.g. the seconds it took), written atomically."""
    write_json(path, {"key": canonical(key), "record": dict(record)})


# ---------------------------------------------------------------------------------------------------
# The log directory lock
# ---------------------------------------------------------------------------------------------------

@contextmanager
def locked(logdir: Path) -> Iterator[None]:
    """Hold `<logdir>/.lock` while a run writes the directory; a second run gets one line naming the holder.
    The lock is the kernel's (flock): it is released when the holder exits, however it exits."""
    logdir.mkdir(parents=True, exist_ok=True)
    path = logdir / ".lock"
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise LogdirLocked(f"{logdir} is being written by {holder}",
                           "wait for that run to finish, or give this one another -l/--logdir") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                     f"{' '.join(sys.argv)[:200]}\n")
        handle.flush()
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
