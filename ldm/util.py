"""YAML configs in the public CompVis format and `target`/`params` instantiation (pyyaml, no omegaconf)."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from common.files import read_yaml

# `target`s a config may name: our own package and torch.nn (e.g. the `torch.nn.Identity` loss configs)
ALLOWED_TARGETS = ("ldm.", "torch.nn.")
# cond_stage_config placeholders of the public configs
PLACEHOLDERS = ("__is_unconditional__", "__is_first_stage__")


def load_config(path: str | Path) -> dict:
    """The YAML file as nested dicts; a missing file is a one-line error naming it."""
    path = Path(path)
    raw = read_yaml(path, "config", "pass --config configs/latent-diffusion/*.yaml or configs/stable-diffusion/*.yaml")
    if not isinstance(raw, dict) or "model" not in raw:
        raise ConfigError(f"config {path} has no `model:` section (not a latent-diffusion config)")
    return raw


def get_obj_from_str(target: str) -> Any:
    """The class or function a dotted `target` names (only under ALLOWED_TARGETS)."""
    if not isinstance(target, str) or not target.startswith(ALLOWED_TARGETS):
        raise ConfigError(f"config target {target!r} is outside {ALLOWED_TARGETS}",
                          "the public configs name ldm.* classes (e.g. ldm.models.diffusion.ddpm.LatentDiffusion)")
    module, _, name = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name, None)
    except ModuleNotFoundError as e:
        if not module.startswith(e.name or "\0"):              # a missing package inside it: not a typo
            raise
        raise ConfigError(f"config target {target!r}: no module {e.name}", "check the spelling of `target:`") from None
    if obj is None:
        raise ConfigError(f"config target {target!r}: module {module} has no {name}",
                          "check the spelling of `target:`")
    return obj


def instantiate_from_config(config: dict | str | None) -> Any:
    """Build `target(**params)`; the placeholder strings of the public configs give None."""
    if isinstance(config, str) and config in PLACEHOLDERS:
        return None
    if not isinstance(config, dict) or "target" not in config:
        raise ConfigError(f"config: expected a mapping with a `target` key to instantiate, got {str(config)[:80]!r}")
    target = get_obj_from_str(config["target"])
    params = config.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"config target {config['target']}: `params:` must be a mapping, got {params!r}")
    try:
        return target(**params)
    except TypeError as e:                                   # a typo'd or missing key in `params:`
        if "keyword argument" not in str(e) and "required" not in str(e):
            raise
        raise ConfigError(f"config target {config['target']}: {e}", "check the keys of its `params:`") from None
