"""Checkpoint reading for every package, with one-line errors that say what is wrong and which file: strict
keys and shapes, readable files, finite weights."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from common.errors import CheckpointError


def state_dict_mismatch(expected: dict, got: dict) -> str | None:
    """A one-line description of missing / unexpected / wrongly shaped keys, or None if they match."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k} {tuple(got[k].shape)}!={tuple(expected[k].shape)}" for k in expected
              if k in got and tuple(got[k].shape) != tuple(expected[k].shape)]
    parts = [f"{label} ({len(keys)}): {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
             for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if keys]
    return "; ".join(parts) or None


def check_finite(state: dict, source: str) -> None:
    """Raise unless every floating tensor of `state` is finite (a NaN/inf weight would make every sample NaN)."""
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise CheckpointError(f"{source} has NaN/inf values in {len(bad)} tensor(s): {', '.join(bad[:4])}"
                              f"{' ...' if len(bad) > 4 else ''}; the file is damaged or the training diverged")


def load_strict(module: nn.Module, state: dict, source: str, hint: str) -> nn.Module:
    """Load `state` with strict keys and shapes, and finite values; one-line errors naming `source`."""
    problem = state_dict_mismatch(module.state_dict(), state)
    if problem:
        raise CheckpointError(f"{source} does not match the model: {problem}. {hint}")
    check_finite(state, source)
    module.load_state_dict(state, strict=True)
    return module


def torch_load(path: str | Path, what: str, weights_only: bool = True, map_location="cpu"):
    """torch.load with one-line errors: a missing file names `what` (the flag), an unreadable one says so."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path}: no such file")
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
