"""Q-Diffusion (seed 003; Li et al. 2023): time-step-aware calibration, split shortcut quantization,
BRECQ block reconstruction with AdaRound weights and learned activation steps.

Pipeline: wrap (one activation quantizer for all timesteps, `--split` optional) -> min-max weights ->
reconstruct weights unit by unit with AdaRound, activations off (`--cali_iters`) -> calibrate activation
ranges (Lp search with p = `--cali_p`, or `--running_stat`) -> reconstruct activation steps unit by unit
(`--cali_iters_a`, lr `--cali_lr`). Both passes share `quant.distill.reconstruct` with DilateQuant's BKD;
they differ in what is trained (the objective), not in machinery.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant import adaround
from quant.calib_data import CalibSet
from quant.calibrate import calibrate_activations
from quant.distill import DistillConfig, LRSchedule, reconstruct
from quant.layers import QuantLayer, QuantMatMul
from quant.methods import CalibrationDraw, Flag, identity_fields, register_method
from quant.methods.options import (CACHE_DTYPES, CALI_ITERS, CACHE_DTYPE, CACHE_RAM, DISTILL_BATCH, FP_INPUT,
                                   LR_SCHEDULE, at_least, positive)
from quant.model import QuantModel, quant_enabled
from quant.range_search import init_weight_quantizers
from quant.settings import QuantConfig, RangeInit


@dataclass(frozen=True)
class QDiffConfig:
    """Q-Diffusion: BRECQ reconstruction with AdaRound weights, then learned activation steps."""
    name: ClassVar[str] = "qdiff"
    calibration: ClassVar[CalibrationDraw] = CalibrationDraw.EVENLY_SPACED
    flags: ClassVar[tuple[Flag, ...]] = ()          # set below, from the field defaults
    temporal: ClassVar[bool] = False

    weight_iters: int = 20000      # --cali_iters: AdaRound iterations per unit
    act_iters: int = 5000          # --cali_iters_a: activation-step iterations per unit
    act_lr: float = 4e-4           # --cali_lr
    act_lr_schedule: LRSchedule = LRSchedule.COSINE  # --lr_schedule; AdaRound keeps a constant lr (as in Q-Diffusion)
    lp: float = 2.4                # --cali_p
    running_stat: bool = False     # --running_stat
    batch_size: int = 32
    adaround_lr: float = 1e-3
    round_weight: float = 0.01     # λ of the rounding regulariser
    warmup: float = 0.2            # fraction of iterations without the regulariser
    beta: tuple[float, float] = (20.0, 2.0)  # annealed from the first to the second value
    cache_dtype: torch.dtype | None = None   # unit caches (quant.unit_cache.CachePolicy)
    cache_ram_gb: float | None = None
    fp_input: float = 0.0          # --distill_fp_input (beyond Q-Diffusion): unit inputs from the FP chain
    seed: int = 0

    def __post_init__(self):
        if (min(self.weight_iters, self.act_iters) < 0 or self.act_lr <= 0 or self.lp <= 0
                or not 0 <= self.fp_input <= 1):
            raise ValueError(f"invalid QDiffConfig: {self}")

    def needs_data(self, quant: QuantConfig) -> bool:
        return True

    def identity(self) -> dict:
        return identity_fields(self)

    def label(self) -> str:
        return self.name + (f"+fpin{self.fp_input:g}" if self.fp_input > 0 else "")

    @classmethod
    def from_flags(cls, values: Mapping[str, Any], seed: int) -> "QDiffConfig":
        return cls(weight_iters=values["cali_iters"], act_iters=values["cali_iters_a"], act_lr=values["cali_lr"],
                   lp=values["cali_p"], act_lr_schedule=LRSchedule(values["lr_schedule"]),
                   running_stat=values["running_stat"], batch_size=values["distill_batch_size"],
                   cache_dtype=CACHE_DTYPES[values["cache_dtype"]], cache_ram_gb=values["cache_ram_gb"],
                   fp_input=values["distill_fp_input"], seed=seed)


QDiffConfig.flags = (
    CALI_ITERS,
    Flag("--cali_iters_a", QDiffConfig.act_iters, "activation-step iterations per block", int, valid=at_least(0),
         valid_words=">= 0"),
    Flag("--cali_lr", QDiffConfig.act_lr, "activation-step learning rate", float, valid=positive, valid_words="> 0"),
    Flag("--cali_p", QDiffConfig.lp, "norm of the activation range search", float, valid=positive, valid_words="> 0"),
    Flag("--running_stat", False, "running min/max activation ranges", kind="switch"),
    DISTILL_BATCH, LR_SCHEDULE, CACHE_DTYPE, CACHE_RAM, FP_INPUT,
)


class AdaRoundObjective:
    """MSE + λ Σ (1 - |2h - 1|^β) after warm-up, β annealed; rounding made hard and baked at the end."""

    fp_activations = True      # the weight pass runs with activation quantization off (reconstruct_weights)

    def __init__(self, cfg: QDiffConfig):
        self.cfg = cfg
        self.layers: list[QuantLayer] = []
        self.rounders: list[adaround.AdaRoundWeight] = []

    def prepare(self, unit: nn.Module) -> list[dict]:
        self.layers = [m for m in unit.modules() if isinstance(m, QuantLayer)]
        self.rounders = adaround.install(self.layers)
        return [{"params": [r.alpha for r in self.rounders], "lr": self.cfg.adaround_lr}]

    def loss(self, out: torch.Tensor, target: torch.Tensor, it: int, iters: int) -> torch.Tensor:
        rec = F.mse_loss(out, target)
        start = self.cfg.warmup * iters
        if it < start:
            return rec
        frac = (it - start) / max(1.0, iters - start)
        beta = self.cfg.beta[0] + frac * (self.cfg.beta[1] - self.cfg.beta[0])
        return rec + self.cfg.round_weight * sum(r.rounding_loss(beta) for r in self.rounders)

    def finish(self, unit: nn.Module) -> None:
        adaround.bake(self.layers)


class ActStepSizeObjective:
    """Learned activation step sizes (LSQ-style, Δ_x only) on the unit's MSE."""

    fp_activations = False

    def __init__(self, cfg: QDiffConfig):
        self.cfg = cfg

    def prepare(self, unit: nn.Module) -> list[dict]:
        deltas = [q.delta for m in unit.modules() if isinstance(m, (QuantLayer, QuantMatMul)) and m.quant_act
                  for q in m.a_quant]
        return [{"params": deltas, "lr": self.cfg.act_lr}] if deltas else []

    def loss(self, out: torch.Tensor, target: torch.Tensor, it: int, iters: int) -> torch.Tensor:
        return F.mse_loss(out, target)

    def finish(self, unit: nn.Module) -> None:
        pass


def _recon_cfg(qd: QDiffConfig, iters: int, schedule: LRSchedule) -> DistillConfig:
    return DistillConfig(iters=iters, batch_size=qd.batch_size, lr_schedule=schedule, cache_dtype=qd.cache_dtype,
                         cache_ram_gb=qd.cache_ram_gb, fp_input=qd.fp_input, seed=qd.seed)


def qdiff_config(config: QuantConfig, qd: QDiffConfig) -> QuantConfig:
    act_init = RangeInit.RUNNING if qd.running_stat else RangeInit.MSE
    return replace(config, temporal=False, act_init=act_init, lp=qd.lp)


def reconstruct_weights(qmodel: QuantModel, fp_model: nn.Module, calib: CalibSet, qd: QDiffConfig, run_dir: Path):
    """Min-max weight ranges, then AdaRound unit by unit with activation quantization off."""
    init_weight_quantizers(qmodel)
    if qd.weight_iters:
        with quant_enabled(qmodel, weight=True, act=False):
            reconstruct(qmodel, fp_model, calib, [AdaRoundObjective(qd)],
                        _recon_cfg(qd, qd.weight_iters, LRSchedule.CONSTANT), run_dir / "recon_w")


def reconstruct_activations(qmodel: QuantModel, fp_model: nn.Module, calib: CalibSet, qd: QDiffConfig,
                            run_dir: Path, batch_size: int = 64):
    """Activation ranges on calibration data (weights quantized), then learned steps unit by unit."""
    if not qmodel.config.quant_act:
        return
    calibrate_activations(qmodel, calib, batch_size, seed=qd.seed)
    if qd.act_iters:
        reconstruct(qmodel, fp_model, calib, [ActStepSizeObjective(qd)],
                    _recon_cfg(qd, qd.act_iters, qd.act_lr_schedule), run_dir / "recon_a")


def quantize_qdiff(fp_model: nn.Module, config: QuantConfig, calib: CalibSet, qd: QDiffConfig, run_dir: Path,
                   batch_size: int = 64) -> QuantModel:
    qmodel = QuantModel(fp_model, qdiff_config(config, qd))
    reconstruct_weights(qmodel, fp_model, calib, qd, run_dir)
    reconstruct_activations(qmodel, fp_model, calib, qd, run_dir, batch_size)
    return qmodel


register_method(QDiffConfig, lambda fp, quant, qd, ctx: quantize_qdiff(fp, quant, ctx.calib, qd, ctx.run_dir,
                                                                       ctx.batch_size))
