"""Quantized stand-ins for Conv2d / Linear layers and attention matmuls, built from the originals."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant.quantizer import ActQuantizer, WeightQuantizer
from quant.settings import QuantizerSpec
from quant.slots import SlotIndex


QUANTIZABLE = (nn.Conv2d, nn.Conv1d, nn.Linear)     # weight layers QuantModel wraps; others are listed, not wrapped
NORMS = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._NormBase)   # what Weight Dilation folds X/s into
_CONV_OPS = {nn.Conv2d: F.conv2d, nn.Conv1d: F.conv1d}


class QuantLayer(nn.Module):
    """y = op(Q_x(x / s), Q_w(W)) for a Conv2d, Conv1d or Linear `op`.

    `in_scale` (s, [C_in], ones unless Weight Dilation set it) realises X/s inside the activation
    quantizer (SPEC §3): W already holds s·W, so with quantization off the output equals the original.
    With `split > 0` the first `split` input channels and the rest get their own activation quantizers.

    Two optional extras serve the scaling alternatives of the paper's Table 9 (None unless set):
    `in_shift` z ([C_in], OS+-like) quantizes X - z and adds z back after dequantization,
    Q((X - z)/s) + z/s, i.e. W·z is a bias term; `in_gain` r ([C_in], learnable, OmniQuant-like) is a
    trained extra factor: the quantizer sees X/(s·r) and the weight is used as r·W.

    The weight and bias are copies of the layer's, or (`copy=False`, for a layer the caller owns and discards, as
    QuantModel does with its deep copy of the network) the layer's own tensors, so a full-size model is not held
    twice while it is wrapped.
    """

    def __init__(self, layer: nn.Conv2d | nn.Conv1d | nn.Linear, w_spec: QuantizerSpec, a_spec: QuantizerSpec | None,
                 slots: SlotIndex, split: int = 0, copy: bool = True):
        super().__init__()
        if type(layer) in _CONV_OPS:
            self.conv_args = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                                  groups=layer.groups)
            self.conv_op = _CONV_OPS[type(layer)]
            if layer.padding_mode != "zeros":
                raise ValueError("only zero-padded convolutions can be quantized")
        elif isinstance(layer, nn.Linear):
            self.conv_args, self.conv_op = None, None
        else:
            raise TypeError(f"cannot quantize {type(layer).__name__}")
        own = (lambda v: v.detach().clone()) if copy else (lambda v: v.detach())
        self.weight = nn.Parameter(own(layer.weight))
        self.bias = None if layer.bias is None else nn.Parameter(own(layer.bias))
        c_in = self.weight.shape[1] * (layer.groups if self.conv_args else 1)
        if not 0 <= split < c_in:
            raise ValueError(f"split {split} must be in [0, {c_in})")
        self.split = split
        like = dict(device=self.weight.device, dtype=self.weight.dtype)   # everything follows the layer
        self.register_buffer("in_scale", torch.ones(c_in, **like))
        self.register_buffer("in_shift", None)
        self.in_gain: nn.Parameter | None = None
        self.w_quant = WeightQuantizer(self.weight.shape[0], w_spec, **like)
        n_act = 0 if a_spec is None else (2 if split else 1)
        self.a_quant = nn.ModuleList([ActQuantizer(a_spec, slots, **like) for _ in range(n_act)])
        self.quant_weight = True
        self.quant_act = n_act > 0
        self.frozen_weight: torch.Tensor | None = None           # set only inside quant.model.frozen()

    def set_shift(self, shift: torch.Tensor) -> None:
        self.in_shift = shift.detach().to(self.in_scale).clone()

    def make_scale_learnable(self) -> None:
        self.in_gain = nn.Parameter(torch.ones_like(self.in_scale))

    def _channel_view(self, v: torch.Tensor) -> torch.Tensor:
        """v [C] shaped to broadcast over the channel dim (dim 1 for conv, last dim for linear)."""
        return v.view((1, -1) + (1,) * (self.weight.dim() - 2) if self.conv_args else (-1,))

    def apply_op(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's own operation (conv or linear) with weight w."""
        return F.linear(x, w, bias) if self.conv_args is None else self.conv_op(x, w, bias, **self.conv_args)

    def _scale(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        s = self.in_scale if self.in_gain is None else self.in_scale * self.in_gain
        return self._channel_view(s[lo:hi])

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Q(X/s) in one elementwise step per quantizer: round(x / (s·Δ_t)) (SPEC §3)."""
        shift = None if self.in_shift is None else self._channel_view(self.in_shift)
        if shift is not None:
            x = x - shift
        if not self.split:
            q = self.a_quant[0](x, self._scale())
        else:
            a, b = x[:, :self.split], x[:, self.split:]
            q = torch.cat([self.a_quant[0](a, self._scale(0, self.split)),
                           self.a_quant[1](b, self._scale(self.split))], dim=1)
        return q if shift is None else q + shift / self._scale()

    def effective_weight(self) -> torch.Tensor:
        """The weight the op uses before quantization: W, or r·W with a learnable gain."""
        if self.in_gain is None:
            return self.weight
        return self.weight * self.in_gain.view((1, -1) + (1,) * (self.weight.dim() - 2))

    def scaled_input(self, x: torch.Tensor) -> torch.Tensor:
        """X / s: the input the scaled weights expect (what replaces X when nothing is quantized)."""
        return x / self._scale()

    def quantizer_input(self, x: torch.Tensor) -> torch.Tensor:
        """(X - z) / s: what the activation quantizers quantize (z = 0 unless shifted)."""
        return self.scaled_input(x if self.in_shift is None else x - self._channel_view(self.in_shift))

    def op_weight(self) -> torch.Tensor:
        """The weight the op multiplies by: Q_w(W) (or r·W, quantized) when weights are quantized."""
        w = self.effective_weight()
        return self.w_quant(w) if self.quant_weight else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_act and len(self.a_quant):
            x = self.quantize_input(x)
        else:
            x = self.scaled_input(x)
        w = self.op_weight() if self.frozen_weight is None else self.frozen_weight
        return self.apply_op(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"weight={tuple(self.weight.shape)}, split={self.split}"


class QuantMatMul(nn.Module):
    """op(Q_a(a), Q_b(b)) for the two attention matmuls (QKᵀ and softmax·V): the wrapped matmul module's own op
    (torch.bmm when none is given) on quantized operands. `head_layout` is how the operands' leading dim holds the
    batch's samples and heads ("(b h)": sample b's heads together; "(h b)": head-major), as the adapter declares it:
    TPQ repeats each sample's step size over its heads accordingly."""

    def __init__(self, spec_a: QuantizerSpec, spec_b: QuantizerSpec, slots: SlotIndex, op: nn.Module | None = None,
                 head_layout: str = "(b h)", device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        like = dict(device=device, dtype=dtype)
        self.a_quant = nn.ModuleList([ActQuantizer(spec_a, slots, head_layout=head_layout, **like),
                                      ActQuantizer(spec_b, slots, head_layout=head_layout, **like)])
        self.op = op
        self.quant_act = True

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.quant_act:
            a, b = self.a_quant[0](a), self.a_quant[1](b)
        return torch.bmm(a, b) if self.op is None else self.op(a, b)
