"""DilateQuant (the paper): wrap -> dilate (WD) -> calibrate (TPQ slots) -> distill (BKD).

Each component can be switched off, which gives the rows of the paper's Table 3; all three off is
the baseline PTQ.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from quant.calib_data import CalibSet
from quant.calibrate import calibrate
from quant.dilation import Scaling, dilate
from quant.distill import DistillConfig, distill
from quant.model import QuantModel
from quant.settings import QuantConfig


@dataclass(frozen=True)
class DilateQuantConfig:
    weight_dilation: bool = True
    scaling: Scaling = Scaling.WEIGHT_DILATION   # Table 9: the equivalent-scaling rule used for "WD"
    temporal: bool = True
    distillation: bool = True
    distill: DistillConfig = field(default_factory=DistillConfig)


def quantize_dilatequant(fp_model: nn.Module, config: QuantConfig, schedule: Sequence[int], calib: CalibSet | None,
                         dq: DilateQuantConfig, run_dir: Path, batch_size: int = 64, seed: int = 0,
                         sigmas: torch.Tensor | None = None) -> QuantModel:
    """sigmas: σ_t = sqrt(1 - ᾱ_t) per timestep, needed only by dq.distill.t_weight_sigma."""
    qmodel = QuantModel(fp_model, replace(config, temporal=dq.temporal), schedule if dq.temporal else None)
    if dq.weight_dilation:
        dilate(qmodel, dq.scaling, calib)
    calibrate(qmodel, calib, batch_size=batch_size, seed=seed)
    if dq.distillation:
        if calib is None:
            raise ValueError("distillation needs calibration data")
        distill(qmodel, fp_model, calib, dq.distill, run_dir / "distill", sigmas)
    return qmodel
