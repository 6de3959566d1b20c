"""AdaRound weight rounding (Nagel et al. 2020), as used by BRECQ / Q-Diffusion block reconstruction.

W_soft = Δ (clip(floor(W/Δ) + h(V) + z, qmin, qmax) - z),  h(V) = clip(sigmoid(V)(ζ-γ) + γ, 0, 1),
ζ = 1.1, γ = -0.1, with the regulariser Σ 1 - |2h - 1|^β pushing every h to 0 or 1. V starts where
h(V) equals the fractional part of W/Δ (so W_soft = W inside the range). When done, rounding is made
hard (h = 1[V >= 0]) and baked into the layer's weight, which then lies exactly on the grid: the
ordinary nearest-rounding WeightQuantizer reproduces it, so checkpoints keep one format.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from quant.layers import QuantLayer
from quant.quantizer import WeightQuantizer

ZETA, GAMMA = 1.1, -0.1


class AdaRoundWeight(nn.Module):
    """Soft-rounded fake quantization of one fixed weight [C_out, ...] with the base quantizer's Δ, z."""

    def __init__(self, base: WeightQuantizer, weight: torch.Tensor):
        super().__init__()
        self.base = base
        shape = (-1,) + (1,) * (weight.dim() - 1)
        self.register_buffer("delta", base.delta.detach().clamp_min(1e-8).view(shape).clone())
        self.register_buffer("zero", base.zero.detach().round().view(shape).clone())
        w = weight.detach() / self.delta
        self.register_buffer("floor", w.floor())
        rest = (w - self.floor).clamp(1e-4, 1 - 1e-4)                    # h(V0) = rest
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.hard = False

    def h(self) -> torch.Tensor:
        if self.hard:
            return (self.alpha >= 0).to(self.alpha.dtype)
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def forward(self, _weight: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(self.floor + self.h() + self.zero, self.base.spec.qmin, self.base.spec.qmax)
        return (q - self.zero) * self.delta

    def rounding_loss(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


def install(layers: list[QuantLayer]) -> list[AdaRoundWeight]:
    """Replace each layer's weight quantizer by an AdaRoundWeight (until `bake`)."""
    out = []
    for layer in layers:
        ada = AdaRoundWeight(layer.w_quant, layer.weight)
        layer.w_quant = ada
        out.append(ada)
    return out


@torch.no_grad()
def bake(layers: list[QuantLayer]) -> None:
    """Hard rounding, written into the weight; the original WeightQuantizer is put back."""
    for layer in layers:
        ada = layer.w_quant
        ada.hard = True
        layer.weight.copy_(ada(layer.weight))
        layer.w_quant = ada.base
