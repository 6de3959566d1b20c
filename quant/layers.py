"""Quantized stand-ins for Conv2d / Linear layers and attention matmuls, built from the originals."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant.quantizer import ActQuantizer, WeightQuantizer
from quant.settings import QuantizerSpec
from quant.steps import StepIndex


class QuantLayer(nn.Module):
    """y = op(Q_x(x / s), Q_w(W)) for a Conv2d or Linear `op`.

    `in_scale` (s, [C_in], ones unless Weight Dilation set it) realises X/s inside the activation
    quantizer (SPEC §3): W already holds s·W, so with quantization off the output equals the original.
    With `split > 0` the first `split` input channels and the rest get their own activation quantizers.
    """

    def __init__(self, layer: nn.Conv2d | nn.Linear, w_spec: QuantizerSpec, a_spec: QuantizerSpec | None,
                 steps: StepIndex, split: int = 0):
        super().__init__()
        if isinstance(layer, nn.Conv2d):
            self.conv_args = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                                  groups=layer.groups)
            if layer.padding_mode != "zeros":
                raise ValueError("only zero-padded convolutions can be quantized")
        elif isinstance(layer, nn.Linear):
            self.conv_args = None
        else:
            raise TypeError(f"cannot quantize {type(layer).__name__}")
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        c_in = self.weight.shape[1] * (layer.groups if self.conv_args else 1)
        if not 0 <= split < c_in:
            raise ValueError(f"split {split} must be in [0, {c_in})")
        self.split = split
        self.register_buffer("in_scale", torch.ones(c_in))
        self.w_quant = WeightQuantizer(self.weight.shape[0], w_spec)
        n_act = 0 if a_spec is None else (2 if split else 1)
        self.a_quant = nn.ModuleList([ActQuantizer(a_spec, steps) for _ in range(n_act)])
        self.quant_weight = True
        self.quant_act = n_act > 0

    def _scale(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """s[lo:hi] shaped to broadcast over the channel dim (dim 1 for conv, last dim for linear)."""
        return self.in_scale[lo:hi].view((1, -1, 1, 1) if self.conv_args else (-1,))

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Q(X/s) in one elementwise step per quantizer: round(x / (s·Δ_t)) (SPEC §3)."""
        if not self.split:
            return self.a_quant[0](x, self._scale())
        a, b = x[:, :self.split], x[:, self.split:]
        return torch.cat([self.a_quant[0](a, self._scale(0, self.split)),
                          self.a_quant[1](b, self._scale(self.split))], dim=1)

    def scaled_input(self, x: torch.Tensor) -> torch.Tensor:
        """X / s: what the activation quantizer quantizes."""
        return x / self._scale()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_act and len(self.a_quant):
            x = self.quantize_input(x)
        else:
            x = self.scaled_input(x)
        w = self.w_quant(self.weight) if self.quant_weight else self.weight
        if self.conv_args is None:
            return F.linear(x, w, self.bias)
        return F.conv2d(x, w, self.bias, **self.conv_args)

    def extra_repr(self) -> str:
        return f"weight={tuple(self.weight.shape)}, split={self.split}"


class QuantMatMul(nn.Module):
    """bmm(Q_a(a), Q_b(b)) for the two attention matmuls (QKᵀ and softmax·V)."""

    def __init__(self, spec_a: QuantizerSpec, spec_b: QuantizerSpec, steps: StepIndex):
        super().__init__()
        self.a_quant = nn.ModuleList([ActQuantizer(spec_a, steps), ActQuantizer(spec_b, steps)])
        self.quant_act = True

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.quant_act:
            a, b = self.a_quant[0](a), self.a_quant[1](b)
        return torch.bmm(a, b)
