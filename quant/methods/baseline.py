"""The PTQ baseline of the paper's Table 3, first row: no WD, no TPQ, no BKD.

One activation quantizer per layer shared by all timesteps, its range searched on calibration data drawn
at random over all sampling steps; per-out-channel min-max weights.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, Mapping

import torch.nn as nn

from quant.calib_data import CalibSet
from quant.calibrate import calibrate
from quant.methods import CalibrationDraw, Flag, identity_fields, register_method
from quant.model import QuantModel
from quant.settings import QuantConfig


@dataclass(frozen=True)
class BaselineConfig:
    """The PTQ baseline (Table 3, first row): one activation range for all timesteps, no training."""
    name: ClassVar[str] = "baseline"
    calibration: ClassVar[CalibrationDraw] = CalibrationDraw.RANDOM_STEPS
    flags: ClassVar[tuple[Flag, ...]] = ()
    temporal: ClassVar[bool] = False

    def needs_data(self, quant: QuantConfig) -> bool:
        return quant.quant_act

    def identity(self) -> dict:
        return identity_fields(self)

    def label(self) -> str:
        return self.name

    @classmethod
    def from_flags(cls, values: Mapping[str, Any], seed: int) -> "BaselineConfig":
        return cls()


def quantize_baseline(fp_model: nn.Module, config: QuantConfig, calib: CalibSet | None, batch_size: int = 64,
                      seed: int = 0) -> QuantModel:
    qmodel = QuantModel(fp_model, replace(config, temporal=False))
    return calibrate(qmodel, calib, batch_size=batch_size, seed=seed)


register_method(BaselineConfig, lambda fp, quant, method, ctx: quantize_baseline(fp, quant, ctx.calib, ctx.batch_size,
                                                                                 ctx.seed))
