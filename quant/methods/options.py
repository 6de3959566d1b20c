"""Command-line options that more than one method takes (block reconstruction: DilateQuant's BKD and
Q-Diffusion's BRECQ passes), as `Flag` data, and the rules the methods share for them. Each option keeps its
Q-Diffusion name and one meaning per method, given in its help."""
from __future__ import annotations

import math

import torch

from quant.distill import DistillConfig, LRSchedule
from quant.methods import Flag

CACHE_DTYPES = {"float32": None, "float16": torch.float16}     # --cache_dtype; float32: the model's precision


def at_least(n: float):
    """v >= n, and finite (NaN and inf are refused by every numeric rule)."""
    return lambda v: math.isfinite(v) and v >= n


def positive(v) -> bool:
    return math.isfinite(v) and v > 0


def optional(ok):
    return lambda v: v is None or ok(v)


CALI_ITERS = Flag("--cali_iters", DistillConfig.iters, "iterations per block: distillation (dilatequant) or AdaRound "
                  "(qdiff)", int, valid=at_least(0), valid_words=">= 0")
DISTILL_BATCH = Flag("--distill_batch_size", DistillConfig.batch_size, "training batch of block reconstruction", int,
                     valid=at_least(1), valid_words=">= 1")
LR_SCHEDULE = Flag("--lr_schedule", DistillConfig.lr_schedule.value, "learning rate over each unit's iterations: "
                   "distillation (dilatequant) and the activation steps (qdiff); cosine anneals to 0", str,
                   choices=tuple(m.value for m in LRSchedule))
CACHE_DTYPE = Flag("--cache_dtype", "float32", "dilatequant, qdiff: dtype of each unit's cached inputs/targets "
                   "(float16 halves the memory)", str, choices=tuple(sorted(CACHE_DTYPES)))
CACHE_RAM = Flag("--cache_ram_gb", None, "dilatequant, qdiff: a unit cache larger than this goes to a memory-mapped "
                 "file in the logdir (the plan is printed first; default: always RAM)", float,
                 valid=optional(positive), valid_words="> 0")
FP_INPUT = Flag("--distill_fp_input", DistillConfig.fp_input, "dilatequant, qdiff (beyond the papers): probability "
                "that a reconstruction sample's block input comes from the FP model instead of the quantized chain: "
                "0 = the papers (eq. 17), 1 = FP inputs, 0.5 = mixed", float,
                valid=lambda v: math.isfinite(v) and 0 <= v <= 1, valid_words="0..1 (a probability)", exclusive=True)
RECONSTRUCTION = (CALI_ITERS, DISTILL_BATCH, LR_SCHEDULE, CACHE_DTYPE, CACHE_RAM, FP_INPUT)
