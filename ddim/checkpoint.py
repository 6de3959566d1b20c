"""Strict state_dict loading with errors that name the offending keys."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn


def state_dict_mismatch(expected: dict, got: dict) -> str | None:
    """A one-line description of missing / unexpected / wrongly shaped keys, or None if they match."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k} {tuple(got[k].shape)}!={tuple(expected[k].shape)}" for k in expected
              if k in got and tuple(got[k].shape) != tuple(expected[k].shape)]
    parts = [f"{label} ({len(keys)}): {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
             for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if keys]
    return "; ".join(parts) or None


def load_strict(module: nn.Module, state: dict, source: str, hint: str) -> nn.Module:
    problem = state_dict_mismatch(module.state_dict(), state)
    if problem:
        raise ValueError(f"{source} does not match the model: {problem}. {hint}")
    module.load_state_dict(state, strict=True)
    return module


def read_state_dict(path: str | Path, what: str = "checkpoint") -> dict:
    """A plain state_dict from `path` (also accepts {'state_dict': ...} and the DDIM [model, ...] list)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found; pass the right path with --ckpt")
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, (list, tuple)):          # the DDIM repo's own ckpt.pth: [model, optimizer, ...]
        obj = obj[0]
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a state_dict checkpoint")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_unet(cfg, ckpt: str | Path | None = None) -> nn.Module:
    """The UNet of a task config with weights from `ckpt` (default: the config's shipped checkpoint)."""
    from ddim.model import UNet
    path = ckpt or cfg.ckpt
    if path is None:
        raise FileNotFoundError(f"config {cfg.path} ships no checkpoint: pass --ckpt PATH "
                                f"(e.g. the public DDIM model-790000.ckpt for cifar10)")
    model = UNet(cfg.model)
    return load_strict(model, read_state_dict(path), str(path),
                       f"Is {path} a checkpoint for config {cfg.path}?").eval()
