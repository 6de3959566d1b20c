"""Networks rebuilt from the description a quantized checkpoint keeps (`network` in its meta): the DDIM UNet from
its UNetConfig fields, an LDM/SD UNet from its `unet_config` (target/params). Their weights come from the
checkpoint, so nothing else is needed (tools/export_int.py, packed integer files)."""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from common.errors import ConfigError


def build_network(spec: dict) -> nn.Module:
    """The FP network a `network` description names (random weights, to be replaced)."""
    family = spec.get("family")
    if family == "ddim":
        from ddim.config import UNetConfig
        from ddim.model import UNet
        cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["config"].items()}
        return UNet(UNetConfig(**cfg)).eval()
    if family == "ldm":
        from ldm.util import instantiate_from_config
        return instantiate_from_config(spec["unet_config"]).eval()
    raise ConfigError(f"no network of family {family!r} (known: ddim, ldm)")


def network_of_config(path: str | Path) -> dict:
    """The `network` description of a model config: a DDIM config (configs/*.yml) or an LDM/SD one (model.params
    .unet_config)."""
    from common.files import read_yaml
    raw = read_yaml(path, "--config", "a DDIM config (configs/*.yml) or an LDM/SD one (configs/latent-diffusion/)")
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict) and "unet_config" in raw["model"].get("params", {}):
        return {"family": "ldm", "unet_config": raw["model"]["params"]["unet_config"]}
    import dataclasses

    from ddim.config import load_config
    return {"family": "ddim", "config": dataclasses.asdict(load_config(path).model)}
