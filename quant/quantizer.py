"""Uniform affine fake quantizers with learnable step and zero point (paper eq. 1-4, 15-16)."""
from __future__ import annotations

import torch
import torch.nn as nn

from common.errors import NonFiniteError
from quant.settings import QuantizerSpec, Signedness
from quant.slots import SlotIndex

_MIN_DELTA = 1e-8


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity gradient backward (straight-through estimator)."""
    return (x.round() - x).detach() + x


def _divide(x: torch.Tensor, step: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x / step (into `out`, shaped like x, if given). For a contiguous [N, C, H, W] x and a
    [N or 1, C or 1, 1, 1] step (per-sample Δ_t times per-channel s) it runs as [N·C, H·W] / [N·C, 1]: the
    same quotients, through a faster CPU kernel than the 4-d broadcast."""
    if x.dim() == 4 and step.dim() == 4 and step.shape[2:] == (1, 1) and x.is_contiguous():
        n, c = x.shape[:2]
        x2, step2 = x.view(n * c, -1), step.expand(n, c, 1, 1).reshape(n * c, 1)
        return (x2 / step2 if out is None else torch.div(x2, step2, out=out.view(n * c, -1))).view_as(x)
    return x / step if out is None else torch.div(x, step, out=out)


class ScratchPool:
    """Reusable output memory for fake-quantized activations during inference (quant.model.frozen, CPU).

    On the CPU a fresh activation-sized tensor per quantizer call is a fresh allocation with its page faults.
    A quantized activation is consumed inside the layer that made it (conv, linear, bmm or cat), so quantizer
    k of every layer can write into one shared buffer k: what a quantizer returns is valid until the next call
    of a quantizer with the same k. The values are the same bit for bit.
    """

    def __init__(self):
        self._buffers: dict[int, torch.Tensor] = {}

    def take(self, k: int, like: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(k)
        if buf is None or buf.numel() < like.numel() or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._buffers[k] = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
        return buf[:like.numel()].view(like.shape)


def fake_quant(x: torch.Tensor, delta: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int,
               in_scale: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Q(x/s) = Δ (clip(round(x/(s·Δ)) + z, qmin, qmax) - z)   (eq. 4; s = 1 unless dilated, SPEC §3).

    Δ, z (and s) broadcast against x. Gradients reach x, Δ and z as in LSQ/LSQ+ (rounding is
    straight-through; a value on the clipping bound still passes its gradient to x). Without autograd the
    same values are computed in fewer passes, in place: Δ·round(clip(x/(s·Δ), qmin - z, qmax - z)), written
    into `out` (shaped like x) if given.
    """
    delta = delta.clamp_min(_MIN_DELTA)
    step = delta if in_scale is None else delta * in_scale
    if not torch.is_grad_enabled():
        # Δ·round(clip(x/step, qmin - z, qmax - z)): five passes, in place on the one fresh tensor. Since the
        # bounds are integers and rounding is monotone, this equals Δ·clip(round(x/step), ...) bit for bit.
        # (One clamp_ with both tensor bounds measured slower on the CPU than the two one-sided clamps.)
        z = zero.round()
        q = _divide(x, step, out).clamp_min_(qmin - z).clamp_max_(qmax - z)
        return q.round_().mul_(delta)
    z = round_ste(zero)
    return (torch.clamp(round_ste(x / step) + z, qmin, qmax) - z) * delta


def range_to_params(lo: torch.Tensor, hi: torch.Tensor, spec: QuantizerSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δ, z) that map [lo, hi] onto the spec's integer grid (eq. 3)."""
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    if spec.signedness is Signedness.ASYMMETRIC:
        delta = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(_MIN_DELTA)
        return delta, (-lo / delta).round()
    if spec.signedness is Signedness.SYMMETRIC:
        delta = (torch.maximum(-lo, hi) / spec.qmax).clamp_min(_MIN_DELTA)
    else:
        delta = (hi / spec.qmax).clamp_min(_MIN_DELTA)
    return delta, torch.zeros_like(delta)


class _Quantizer(nn.Module):
    """Holds Δ and z of shape [n]; z is learnable only for the asymmetric grid.

    Created on `device` / `dtype` (those of the layer it serves). Whether it is calibrated is kept twice:
    the `calibrated` buffer travels with checkpoints, and a Python mirror of it is what forward checks,
    so a forward never reads a device tensor on the host.
    """

    def __init__(self, n: int, spec: QuantizerSpec, device: torch.device | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.spec = spec
        self.delta = nn.Parameter(torch.ones(n, device=device, dtype=dtype))
        if spec.signedness is Signedness.ASYMMETRIC:
            self.zero = nn.Parameter(torch.zeros(n, device=device, dtype=dtype))
        else:
            self.register_buffer("zero", torch.zeros(n, device=device, dtype=dtype))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool, device=device))
        self.is_calibrated = False

    @torch.no_grad()
    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Fill Δ, z from a range [lo, hi] of shape [n] (the explicit initialisation step)."""
        delta, zero = range_to_params(lo.to(self.delta), hi.to(self.delta), self.spec)
        if delta.device.type != "meta" and not bool(torch.isfinite(delta).all() and torch.isfinite(zero).all()):
            raise NonFiniteError(f"a quantizer range is not finite ([{lo.min()}, {hi.max()}]): calibration saw NaN/inf "
                                 f"values", "check the FP checkpoint and the calibration data")
        self.delta.copy_(delta)
        self.zero.copy_(zero)
        self.calibrated.fill_(True)
        self.is_calibrated = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        key = prefix + "calibrated"
        if key in state_dict:                                   # a host read at load time, not per forward
            self.is_calibrated = bool(state_dict[key])

    def _check(self, name: str) -> None:
        if not self.is_calibrated:
            raise RuntimeError(f"{name} is not calibrated: run calibration first (or load a calibrated "
                               f"checkpoint with --cali_ckpt)")

    def extra_repr(self) -> str:
        return f"n={self.delta.numel()}, bits={self.spec.bits}, {self.spec.signedness.value}"


class WeightQuantizer(_Quantizer):
    """Per-out-channel quantizer for a weight [C_out, ...]."""

    def __init__(self, out_channels: int, spec: QuantizerSpec, device: torch.device | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__(out_channels, spec, device, dtype)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        self._check("weight quantizer")
        shape = (-1,) + (1,) * (w.dim() - 1)                   # [C_out, 1, ...]
        return fake_quant(w, self.delta.view(shape), self.zero.view(shape), self.spec.qmin, self.spec.qmax)


HEAD_LAYOUTS = (None, "(b h)", "(h b)")     # how an activation's leading dim holds samples (and heads)


class ActQuantizer(_Quantizer):
    """Per-tensor activation quantizer; with a SlotIndex of T slots it is the TPQ (eq. 15-16).

    Δ, z have shape [T]. Each sample gathers its slot's parameters. An attention operand's leading dim holds
    batch x heads in the `head_layout` its adapter declares ("(b h)" or "(h b)"): each sample's parameters repeat
    over its heads. A layer input (`head_layout` None) has one row per sample.
    """

    def __init__(self, spec: QuantizerSpec, slots: SlotIndex, device: torch.device | None = None,
                 dtype: torch.dtype | None = None, head_layout: str | None = None):
        super().__init__(slots.num_slots, spec, device, dtype)
        if head_layout not in HEAD_LAYOUTS:
            raise ValueError(f"head_layout {head_layout!r} is not one of {HEAD_LAYOUTS}")
        self.slots = slots  # shared plain object, not a submodule
        self.head_layout = head_layout
        self.scratch: tuple[ScratchPool, int] | None = None   # (pool, k) inside quant.model.frozen on the CPU

    def slot_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Δ, z broadcastable against x: scalars for one slot, [N, 1, ...] for TPQ."""
        if self.delta.numel() == 1:
            return self.delta[0], self.zero[0]
        idx = self.slots.current()                              # [B]
        if x.shape[0] % idx.shape[0]:
            raise RuntimeError(f"activation batch {x.shape[0]} is not a multiple of the {idx.shape[0]} timesteps")
        heads = x.shape[0] // idx.shape[0]
        if heads > 1 and self.head_layout is None:
            raise RuntimeError(f"a layer input of {x.shape[0]} rows for {idx.shape[0]} timesteps: a layer reads one "
                               f"row per sample (only attention operands hold heads, in their adapter's layout)")
        shape = (-1,) + (1,) * (x.dim() - 1)
        delta, zero = self.delta[idx], self.zero[idx]           # [B]
        if heads > 1 and self.head_layout == "(b h)":          # sample b's heads together
            delta, zero = delta.repeat_interleave(heads), zero.repeat_interleave(heads)
        elif heads > 1:                                         # "(h b)": head-major
            delta, zero = delta.repeat(heads), zero.repeat(heads)
        return delta.view(shape), zero.view(shape)

    def forward(self, x: torch.Tensor, in_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Q(x / in_scale); in_scale broadcast against x (per channel) or None."""
        self._check("activation quantizer")
        delta, zero = self.slot_params(x)
        out = None
        if self.scratch is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            pool, k = self.scratch
            out = pool.take(k, x)
        return fake_quant(x, delta, zero, self.spec.qmin, self.spec.qmax, in_scale, out)
