"""YAML configs in the public CompVis format and `target`/`params` instantiation (pyyaml, no omegaconf)."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml

from common.errors import ConfigError

# `target`s a config may name: our own package and torch.nn (e.g. the `torch.nn.Identity` loss configs)
ALLOWED_TARGETS = ("ldm.", "torch.nn.")
# cond_stage_config placeholders of the public configs
PLACEHOLDERS = ("__is_unconditional__", "__is_first_stage__")


def load_config(path: str | Path) -> dict:
    """The YAML file as nested dicts; a missing file is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config {path} not found; pass --config configs/latent-diffusion/*.yaml "
                          f"or configs/stable-diffusion/*.yaml")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict) or "model" not in raw:
        raise ConfigError(f"config {path} has no `model:` section (not a latent-diffusion config)")
    return raw


def get_obj_from_str(target: str) -> Any:
    """The class or function a dotted `target` names (only under ALLOWED_TARGETS)."""
    if not target.startswith(ALLOWED_TARGETS):
        raise ValueError(f"config target {target!r} is outside {ALLOWED_TARGETS}")
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def instantiate_from_config(config: dict | str | None) -> Any:
    """Build `target(**params)`; the placeholder strings of the public configs give None."""
    if isinstance(config, str) and config in PLACEHOLDERS:
        return None
    if not isinstance(config, dict) or "target" not in config:
        raise KeyError(f"expected a mapping with a `target` key to instantiate, got {config!r}")
    return get_obj_from_str(config["target"])(**(config.get("params") or {}))
