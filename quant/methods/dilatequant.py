"""DilateQuant (the paper): wrap -> dilate (WD) -> calibrate (TPQ slots) -> distill (BKD).

Each component can be switched off, which gives the rows of the paper's Table 3; all three off is
the baseline PTQ.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn as nn

from quant.calib_data import CalibSet
from quant.calibrate import calibrate
from quant.dilation import Scaling, dilate
from quant.distill import BKDTraining, DistillConfig, LRSchedule, distill
from quant.methods import CalibrationDraw, Flag, identity_fields, register_method
from quant.methods.options import (CACHE_DTYPES, CALI_ITERS, CACHE_DTYPE, CACHE_RAM, DISTILL_BATCH, FP_INPUT,
                                   LR_SCHEDULE, at_least, optional, positive)
from quant.model import QuantModel
from quant.settings import QuantConfig

FLAGS = (
    Flag("--wd", True, "Weight Dilation", kind="toggle"),
    Flag("--tpq", True, "Temporal Parallel Quantizer", kind="toggle"),
    Flag("--bkd", True, "Block-wise Knowledge Distillation", kind="toggle"),
    Flag("--scaling", Scaling.WEIGHT_DILATION.value, "equivalent scaling rule for --wd (Table 9: wd, smoothquant, "
         "awq, osplus, learnable)", str, choices=tuple(m.value for m in Scaling), exclusive=True),
    CALI_ITERS, DISTILL_BATCH,
    Flag("--lr_weight", DistillConfig.lr_weight, "learning rate of the weights and biases", float,
         valid=at_least(0), valid_words=">= 0"),
    Flag("--lr_quant", DistillConfig.lr_quant, "weight-quantizer step sizes and zero points (and activation ones "
         "unless --lr_act is given)", float, valid=at_least(0), valid_words=">= 0"),
    Flag("--lr_act", DistillConfig.lr_act, "activation (TPQ) step sizes and zero points; default: --lr_quant", float,
         valid=optional(at_least(0)), valid_words=">= 0"),
    Flag("--lr_scale", DistillConfig.lr_scale, "--scaling learnable factors", float, valid=at_least(0),
         valid_words=">= 0"),
    LR_SCHEDULE, CACHE_DTYPE, CACHE_RAM,
    Flag("--t_weight_sigma", DistillConfig.t_weight_sigma, "(beyond the paper) weight each distillation sample by "
         "1/(sigma_t^2 + this^2), mean 1: more weight to small t, where feature errors become large eps errors; "
         "default: plain MSE", float, valid=optional(positive), valid_words="> 0"),
    FP_INPUT,
    Flag("--bkd_training", DistillConfig.training.value, "joint = the paper (weights and quantizers together, "
         "everything quantized); staged (beyond the paper) = per block, the weights with FP activations, then the "
         "activation quantizers with the weights frozen, --cali_iters each", str,
         choices=tuple(m.value for m in BKDTraining), exclusive=True),
)


@dataclass(frozen=True)
class DilateQuantConfig:
    """DilateQuant: WD, TPQ and BKD (Table 3's switches: --no-wd, --no-tpq, --no-bkd).

    Also the equivalent-scaling rule of WD (Table 9) and BKD's settings. `temporal` sets QuantConfig.temporal
    for the model it builds: TPQ is this method's choice, not the shared config's."""
    name: ClassVar[str] = "dilatequant"
    calibration: ClassVar[CalibrationDraw] = CalibrationDraw.RANDOM_STEPS
    flags: ClassVar[tuple[Flag, ...]] = FLAGS

    scaling: Scaling | None = Scaling.WEIGHT_DILATION   # WD's equivalent-scaling rule (Table 9); None: no WD
    temporal: bool = True
    distillation: bool = True
    distill: DistillConfig = field(default_factory=DistillConfig)

    @property
    def weight_dilation(self) -> bool:
        return self.scaling is not None

    def needs_data(self, quant: QuantConfig) -> bool:
        return quant.quant_act or self.distillation

    def identity(self) -> dict:
        return identity_fields(self)

    def label(self) -> str:
        """'dilatequant', or e.g. 'dilatequant[wd,tpq]' for a Table 3 ablation row; '+staged', '+tw0.2' and
        '+fpin0.5' mark BKD's options beyond the paper."""
        suffix = ""
        if self.distillation:
            d = self.distill
            suffix += f"+{d.training.value}" if d.training is not BKDTraining.JOINT else ""
            suffix += f"+tw{d.t_weight_sigma:g}" if d.t_weight_sigma is not None else ""
            suffix += f"+fpin{d.fp_input:g}" if d.fp_input > 0 else ""
        if self.temporal and self.distillation and self.scaling is Scaling.WEIGHT_DILATION:
            return self.name + suffix
        scaling = "wd" if self.scaling in (Scaling.WEIGHT_DILATION, None) else self.scaling.value
        parts = [n for n, on in ((scaling, self.weight_dilation), ("tpq", self.temporal), ("bkd", self.distillation))
                 if on]
        return f"{self.name}[{','.join(parts) or 'none'}]{suffix}"

    @classmethod
    def from_flags(cls, values: Mapping[str, Any], seed: int) -> "DilateQuantConfig":
        distill_cfg = DistillConfig(
            iters=values["cali_iters"], batch_size=values["distill_batch_size"], lr_weight=values["lr_weight"],
            lr_quant=values["lr_quant"], lr_act=values["lr_act"], lr_scale=values["lr_scale"],
            lr_schedule=LRSchedule(values["lr_schedule"]), t_weight_sigma=values["t_weight_sigma"],
            cache_dtype=CACHE_DTYPES[values["cache_dtype"]], cache_ram_gb=values["cache_ram_gb"],
            fp_input=values["distill_fp_input"], training=BKDTraining(values["bkd_training"]), seed=seed)
        return cls(scaling=Scaling(values["scaling"]) if values["wd"] else None, temporal=values["tpq"],
                   distillation=values["bkd"], distill=distill_cfg)


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


register_method(DilateQuantConfig, lambda fp, quant, dq, ctx: quantize_dilatequant(
    fp, quant, ctx.schedule, ctx.calib, dq, ctx.run_dir, ctx.batch_size, ctx.seed, ctx.sigmas))
