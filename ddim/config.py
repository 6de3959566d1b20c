"""Typed model/diffusion settings, read from the DDIM-style YAML configs in `configs/`."""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from common.errors import ConfigError
from common.files import read_yaml

BETA_SCHEDULES = ("linear", "quad", "const", "jsd", "sigmoid", "cosine")


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the DDPM UNet (the `model:` section of a DDIM config)."""
    ch: int
    out_ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    in_channels: int
    resolution: int
    dropout: float = 0.0
    resamp_with_conv: bool = True
    num_groups: int = 32  # GroupNorm groups; the public CIFAR-10 model uses 32

    def __post_init__(self):
        if self.ch <= 0 or self.num_res_blocks <= 0 or not self.ch_mult:
            raise ValueError(f"invalid UNetConfig: {self}")
        for m in self.ch_mult:
            if (self.ch * m) % self.num_groups:
                raise ValueError(f"ch*ch_mult ({self.ch}*{m}) must be divisible by num_groups={self.num_groups}")
        if self.resolution % (2 ** (len(self.ch_mult) - 1)):
            raise ValueError(f"resolution {self.resolution} is not divisible by 2^(levels-1) for ch_mult={self.ch_mult}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class DiffusionConfig:
    """Forward-process noise schedule (the `diffusion:` section)."""
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_diffusion_timesteps: int = 1000

    def __post_init__(self):
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"unknown beta_schedule {self.beta_schedule!r}; choose one of {BETA_SCHEDULES}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError("need 0 < beta_start <= beta_end < 1")


@dataclass(frozen=True)
class Config:
    """A whole task config: model, diffusion, plus data info and the default checkpoint path."""
    name: str
    model: UNetConfig
    diffusion: DiffusionConfig
    channels: int
    image_size: int
    ckpt: str | None  # default checkpoint path (relative to the repo root), if the repo ships one
    path: Path


def _section(cls, raw: dict, where: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; allowed: {sorted(known)}")
    raw = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    try:
        return cls(**raw)
    except (TypeError, ValueError) as e:                      # a missing key, or a value out of its range
        raise ConfigError(f"{where}: {e}") from None


def load_config(path: str | Path) -> Config:
    path = Path(path)
    raw = read_yaml(path, "config", "pick one of configs/*.yml")
    if not isinstance(raw, dict) or "model" not in raw or "diffusion" not in raw:
        raise ConfigError(f"config {path} is not a DDIM config (it needs model: and diffusion: sections)")
    model = dict(raw["model"])
    model.pop("type", None)  # the public DDIM configs carry these training-only keys
    model.pop("var_type", None)
    model.pop("ema_rate", None)
    model.pop("ema", None)
    data = raw.get("data", {})
    model.setdefault("resolution", data.get("image_size"))  # public configs keep it under data:
    diffusion = _section(DiffusionConfig, raw["diffusion"], f"{path}:diffusion")
    return Config(name=path.stem, model=_section(UNetConfig, model, f"{path}:model"), diffusion=diffusion,
                  channels=int(data.get("channels", model["in_channels"])),
                  image_size=int(data.get("image_size", model["resolution"])),
                  ckpt=raw.get("ckpt"), path=path)
