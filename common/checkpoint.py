"""Checkpoint reading for every package, with one-line errors that say what is wrong and which file: strict
keys and shapes, readable files, finite weights."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from common.errors import CheckpointError, NonFiniteError, RunError


def state_dict_mismatch(expected: dict, got: dict) -> str | None:
    """A one-line description of missing / unexpected / wrongly shaped keys, or None if they match."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k} {tuple(got[k].shape)}!={tuple(expected[k].shape)}" for k in expected
              if k in got and tuple(got[k].shape) != tuple(expected[k].shape)]
    parts = [f"{label} ({len(keys)}): {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
             for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if keys]
    return "; ".join(parts) or None


def nonfinite_keys(state: dict) -> list[str]:
    """The keys of the floating tensors of `state` that hold a NaN or an inf."""
    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and v.device.type != "meta"
            and not bool(v.isfinite().all())]


def _listed(keys: list[str]) -> str:
    return f"{len(keys)} tensor(s): {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"


def check_finite(state: dict, source: str) -> None:
    """Raise unless every floating tensor of `state` is finite (a NaN/inf weight would make every sample NaN)."""
    bad = nonfinite_keys(state)
    if bad:
        raise CheckpointError(f"{source} has NaN/inf values in {_listed(bad)}; the file is damaged or the training "
                              f"diverged")


def require_finite(state: dict, stage: str, hint: str) -> None:
    """Before a stage is saved: raise NonFiniteError naming the stage and its likely cause (`hint`) unless every
    floating tensor of `state` is finite. A non-finite stage is never written."""
    bad = nonfinite_keys(state)
    if bad:
        raise NonFiniteError(f"{stage} came out with NaN/inf values in {_listed(bad)}; it was not saved", hint)


def load_strict(module: nn.Module, state: dict, source: str, hint: str) -> nn.Module:
    """Load `state` with strict keys and shapes, and finite values; one-line errors naming `source`."""
    problem = state_dict_mismatch(module.state_dict(), state)
    if problem:
        raise CheckpointError(f"{source} does not match the model: {problem}. {hint}")
    check_finite(state, source)
    module.load_state_dict(state, strict=True)
    return module


def check_file(path: str | Path, what: str, hint: str | None = None, error: type[RunError] = CheckpointError) -> Path:
    """`path` if it is a file; else a one-line `error` naming `what` (the flag): no such file, or a directory
    where a file is needed."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} {path} is a directory, not a file", hint or "name the file itself")
    if not path.is_file():
        raise error(f"{what} {path}: no such file", hint)
    return path


def torch_load(path: str | Path, what: str, weights_only: bool = True, map_location="cpu"):
    """torch.load with one-line errors: a missing file names `what` (the flag), an unreadable one says so."""
    path = check_file(path, what)
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{what} {path} is not a readable PyTorch checkpoint (truncated or another format: "
                              f"{reason})") from e


def read_state_dict(path: str | Path, what: str = "--ckpt") -> dict:
    """A plain state_dict from `path` (also accepts {'state_dict': ...} and the DDIM [model, ...] list)."""
    obj = torch_load(path, what)
    if isinstance(obj, (list, tuple)) and obj:  # the DDIM repo's own ckpt.pth: [model, optimizer, ...]
        obj = obj[0]
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"{what} {path} holds no state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}
