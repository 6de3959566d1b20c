"""The PTQ baseline of the paper's Table 3, first row: no WD, no TPQ, no BKD.

One activation quantizer per layer shared by all timesteps, its range searched on calibration data drawn
at random over all sampling steps; per-out-channel min-max weights.
"""
from __future__ import annotations

from dataclasses import replace

import torch.nn as nn

from quant.calib_data import CalibSet
from quant.calibrate import calibrate
from quant.model import QuantModel
from quant.settings import QuantConfig


def quantize_baseline(fp_model: nn.Module, config: QuantConfig, calib: CalibSet | None, batch_size: int = 64,
                      seed: int = 0) -> QuantModel:
    qmodel = QuantModel(fp_model, replace(config, temporal=False))
    return calibrate(qmodel, calib, batch_size=batch_size, seed=seed)
