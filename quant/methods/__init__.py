"""Quantization methods, each a pipeline of the verbs wrap -> (dilate) -> calibrate -> (distill/reconstruct)."""
from __future__ import annotations

from enum import Enum


class QuantMode(Enum):
    BASELINE = "baseline"        # PTQ, one activation quantizer for all timesteps (Table 3, first row)
    QDIFF = "qdiff"              # Q-Diffusion (seed 003)
    DILATEQUANT = "dilatequant"  # WD + TPQ + BKD (the paper)
