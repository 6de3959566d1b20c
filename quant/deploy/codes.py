"""Integer codes: activations and weights on their quantizer's integer grid, and 4-bit packing.

A quantizer with grid [qmin, qmax], step Δ and zero point z (quant/quantizer.py) represents x by the integer
q = round(clip(x / Δ, qmin - z, qmax - z)) and x̂ = Δ q. Here the grid is shifted to start at 0: the *code*
c = q + z - qmin lies in [0, 2^b - 1] (a uint8, or a nibble when packed), and its zero point z - qmin is what
the kernels subtract. Codes are computed with the same division, clip and round as the fake quantizer, so the
integer path sees exactly the values the simulation multiplies (only the float rounding of the sums differs).
"""
from __future__ import annotations

from functools import lru_cache

import torch

from quant.quantizer import _MIN_DELTA, _Quantizer


def quantize_codes(x: torch.Tensor, step: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                   shift: torch.Tensor) -> torch.Tensor:
    """uint8 codes round(clip(x / step, lo, hi)) + shift; step broadcasts against x (Δ_t times the dilation
    scale s per channel), lo = qmin - z, hi = qmax - z and shift = z - qmin are 0-d."""
    return (x / step).clamp_(lo, hi).round_().add_(shift).to(torch.uint8)


def signed_codes(x: torch.Tensor, step: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """round(clip(x / step, lo, hi)) = X - z_x, integers held in x's float dtype: the same division, clip and round
    as quantize_codes (and as the fake quantizer, which multiplies this by Δ)."""
    return (x / step).clamp_(lo, hi).round_()


# Layouts the compiled quantize step specialises on (matrix or channels-first, unit sizes, scalar or per-channel
# steps): a UNet's layers need about ten, above torch.compile's default limit of 8 per function.
RECOMPILE_LIMIT = 64


@lru_cache(maxsize=None)
def codes_function(compiled: bool, signed: bool = False):
    """quantize_codes (signed: signed_codes), or its torch.compile'd form: one fused pass over the activation
    instead of five (on a 2-core CPU the eager form costs about half an int8 convolution; the fused one a few
    percent). Bit for bit the same codes (the codes keep the input's memory layout)."""
    step = signed_codes if signed else quantize_codes
    if not compiled:
        return step
    fused = torch.compile(step, dynamic=True)

    def call(*args):
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):     # scoped to this step's compilations
            return fused(*args)
    return call


def quantizer_tables(q: _Quantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δ clamped as the fake quantizer clamps it, z rounded), per slot or per channel, detached."""
    return q.delta.detach().clamp_min(_MIN_DELTA), q.zero.detach().round()


def weight_codes(weight: torch.Tensor, q: _Quantizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [C_out, ...] uint8, zero point per out-channel (long, on the code grid), Δ_w [C_out]) of a weight
    quantized per out-channel by `q` (quant.quantizer.WeightQuantizer): Δ_w (codes - zero) is the weight the
    simulation multiplies by."""
    delta, zero = quantizer_tables(q)
    view = (-1,) + (1,) * (weight.dim() - 1)
    signed = (weight.detach() / delta.view(view)).clamp_(q.spec.qmin - zero.view(view), q.spec.qmax - zero.view(view))
    shift = zero - q.spec.qmin
    codes = signed.round_().add_(shift.view(view))
    return codes.to(torch.uint8), shift.long(), delta


def int8_offsets(codes: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Per out-channel offset o with codes - o inside int8 for every code of the channel: the zero point where
    the channel's codes allow it (then the kernel's product is exact with no correction), else the nearest value
    that fits (the kernel adds (o - zero) times the input's window sum)."""
    flat = codes.flatten(1).to(torch.int16)
    return torch.minimum(torch.maximum(zero, flat.amax(1).long() - 127), flat.amin(1).long() + 128)


def grid_offset(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The offset o (same shape as zero) with every code of a b-bit grid minus o inside int8: the zero point for
    b <= 7 bits; the nearest of [2^b - 128, 128] to it otherwise."""
    return zero.clamp(2 ** bits - 128, 128) if bits > 7 else zero


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15] -> two per byte (element 2i in the low nibble, 2i + 1 in the high one), flattened."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_int4(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of pack_int4: uint8 codes of `shape`."""
    n = 1
    for s in shape:
        n *= s
    out = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)
    return out[:n].reshape(shape)
