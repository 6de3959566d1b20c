"""Loading the DDPM UNet of a task config (strict keys, finite weights; common/checkpoint.py)."""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from common.checkpoint import CheckpointError, load_strict, read_state_dict, state_dict_mismatch  # noqa: F401


def load_unet(cfg, ckpt: str | Path | None = None) -> nn.Module:
    """The UNet of a task config with weights from `ckpt` (default: the config's shipped checkpoint)."""
    from ddim.model import UNet
    path = ckpt or cfg.ckpt
    if path is None:
        raise CheckpointError(f"config {cfg.path} ships no checkpoint: pass --ckpt PATH "
                              f"(e.g. the public DDIM model-790000.ckpt for cifar10)")
    model = UNet(cfg.model)
    return load_strict(model, read_state_dict(path), str(path),
                       f"Is {path} a checkpoint for config {cfg.path}?").eval()
