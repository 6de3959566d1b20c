"""Integer stand-ins for the simulated layers (quant/layers.py), computing the same function.

`IntLayer` replaces a QuantLayer whose activations are quantized: per call it takes the TPQ slot of the call's
timestep, turns its input into codes with that slot's Δ_x, z_x and the layer's dilation scale s (X/s inside the
quantizer, SPEC §3), and multiplies them with the weight codes on an integer kernel (quant/deploy/kernels.py). A
split layer (Q-Diffusion's split shortcut) has two input slices with their own quantizers: two integer products
over its two channel ranges, summed. `IntMatMul` does the same for an attention matmul (both operands quantized).
`WeightOnlyLayer` stores a weight-only layer's codes and computes in floating point with the dequantized weight
(nothing integer to multiply the unquantized activation with).

What each holds persistently is what a packed file holds: weight codes (uint8, packed two per byte in the file
at <= 4 bits), their zero point and Δ_w per out-channel, the bias, s, and per input slice the Δ_x, z_x table over
slots. Kernel forms are derived by `prepare()` on the module's device.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant.deploy.codes import codes_function, grid_offset, quantizer_tables, weight_codes
from quant.deploy.kernels import IntGemm, exact_bmm, exact_float_path, int_bmm
from quant.layers import QuantLayer, QuantMatMul
from quant.quantizer import ActQuantizer
from quant.slots import SlotIndex


class _Operand(nn.Module):
    """One quantized input (a layer's input slice, or a matmul operand): Δ_x [T] and zero point z_x [T] per slot
    (as the fake quantizer uses them: Δ clamped, z rounded), on the grid [qmin, qmax]."""

    def __init__(self, slots: int, bits: int, qmin: int, qmax: int, device=None):
        super().__init__()
        self.bits, self.qmin, self.qmax = bits, qmin, qmax
        self.register_buffer("delta", torch.ones(slots, device=device))
        self.register_buffer("zero", torch.zeros(slots, device=device))

    def fill(self, q: ActQuantizer) -> None:
        """The tables of a calibrated activation quantizer."""
        delta, zero = quantizer_tables(q)
        with torch.no_grad():
            self.delta.copy_(delta.float())
            self.zero.copy_(zero.float())

    def tables(self) -> None:
        """Per slot: clip bounds qmin - z, qmax - z and the code zero point z - qmin (the kernels' x_zero)."""
        self.lo, self.hi, self.shift = self.qmin - self.zero, self.qmax - self.zero, self.zero - self.qmin

    def magnitude(self) -> int:
        """The largest |X - z_x| over the slots (read on the host: for prepare, not a forward)."""
        return int(torch.maximum(self.lo.abs(), self.hi.abs()).max())

    def codes(self, x: torch.Tensor, step: torch.Tensor, slot: torch.Tensor, fn, channel_dim: int = -1,
              signed: bool = False) -> torch.Tensor:
        """x's codes (signed: X - z_x as floats, for codes_function(..., signed=True)), in x's shape. The quantize
        step sees x as a [M, C] matrix with the channels last (a view for channels-last and row-major
        activations): a handful of layouts for the compiled step to specialise on, whatever the layer.
        step: [C] or 0-d."""
        bounds = (self.lo[slot], self.hi[slot]) + (() if signed else (self.shift[slot],))
        moved = x.movedim(channel_dim, -1)                                          # [..., C]
        matrix = moved.reshape(-1, moved.shape[-1]) if _rows_of_channels(moved) else None
        if matrix is None:                                       # channels-first (e.g. NCHW on an accelerator)
            view = [1] * x.dim()
            view[channel_dim] = -1
            return fn(x, step.view(view) if step.dim() else step, *bounds)
        return fn(matrix, step, *bounds).view(moved.shape).movedim(-1, channel_dim)


def _rows_of_channels(x: torch.Tensor) -> bool:
    """Whether x [..., C] views as a [M, C] matrix with unit channel stride (contiguous rows, or rows of a wider
    tensor: a channel slice)."""
    if x.dim() < 2 or x.stride(-1) != 1:
        return x.dim() < 2
    strides = [st for st, n in zip(x.stride()[:-1], x.shape[:-1]) if n > 1]
    sizes = [n for n in x.shape[:-1] if n > 1]
    return all(strides[i] == strides[i + 1] * sizes[i + 1] for i in range(len(strides) - 1))


def _current_slot(slots: SlotIndex) -> torch.Tensor:
    """The call's TPQ slot as a 0-d tensor (IntModel checks that the batch has one)."""
    return slots.current()[0]


class _WeightCodes(nn.Module):
    """A conv or linear layer's weight on its integer grid (codes, zero point and Δ_w per out-channel), its bias
    and its dilation scale s: what the file holds for it."""

    def __init__(self, spec: dict, device=None):
        super().__init__()
        self.spec = spec
        shape = spec["weight_shape"]
        self.register_buffer("codes", torch.zeros(shape, dtype=torch.uint8, device=device))
        self.register_buffer("w_zero", torch.zeros(shape[0], dtype=torch.int16, device=device))
        self.register_buffer("w_scale", torch.ones(shape[0], device=device))
        self.register_buffer("bias", torch.zeros(shape[0], device=device) if spec["bias"] else None)
        self.register_buffer("in_scale", torch.ones(spec["in_channels"], device=device))

    @staticmethod
    def spec_of(layer: QuantLayer) -> dict:
        w = layer.weight
        c_in = w.shape[1] * (layer.conv_args["groups"] if layer.conv_args else 1)
        bounds = [0, layer.split, c_in] if layer.split else [0, c_in]
        conv = None if layer.conv_args is None else {k: list(v) if isinstance(v, tuple) else v
                                                      for k, v in layer.conv_args.items()}
        return {"weight_shape": list(w.shape), "w_bits": layer.w_quant.spec.bits, "bias": layer.bias is not None,
                "in_channels": c_in, "conv": conv, "bounds": bounds,
                "inputs": [{"bits": q.spec.bits, "qmin": q.spec.qmin, "qmax": q.spec.qmax} for q in layer.a_quant]}

    def fill(self, layer: QuantLayer) -> None:
        """The codes of the weight the simulated layer multiplies by (r·W with a learnable gain), its bias and s."""
        codes, zero, delta = weight_codes(layer.effective_weight(), layer.w_quant)
        s = layer.in_scale if layer.in_gain is None else layer.in_scale * layer.in_gain    # as QuantLayer._scale
        with torch.no_grad():
            self.codes.copy_(codes)
            self.w_zero.copy_(zero)
            self.w_scale.copy_(delta.float())
            if layer.bias is not None:
                self.bias.copy_(layer.bias.detach())
            self.in_scale.copy_(s.detach())


class IntLayer(_WeightCodes):
    """y = Σ_parts Δ_x Δ_w (W - z_w)(X - z_x) + b for a conv (1-d/2-d) or linear layer, parts = its input slices."""

    def __init__(self, spec: dict, slots: SlotIndex, device=None):
        super().__init__(spec, device)
        self.slots = slots
        self.inputs = nn.ModuleList([_Operand(slots.num_slots, **a, device=device) for a in spec["inputs"]])
        self.channel_dim = 1 if spec["conv"] is not None else -1
        self.gemms: list[IntGemm] = []
        self.codes_fn = codes_function(False)

    @classmethod
    def of(cls, layer: QuantLayer, slots: SlotIndex) -> "IntLayer":
        """The integer form of a calibrated QuantLayer (activations quantized, no in_shift)."""
        int_layer = cls(cls.spec_of(layer), slots, device=layer.weight.device)
        int_layer.fill(layer)
        for op, q in zip(int_layer.inputs, layer.a_quant):
            op.fill(q)
        return int_layer

    def prepare(self, compiled: bool, generic: bool = False) -> None:
        """Kernel forms of the weight slices, and the per-slot step tables Δ_x,t · s_c (the same float product as
        the fake quantizer's), on this layer's device."""
        bounds, zero = self.spec["bounds"], self.w_zero.long()
        self.codes_fn = codes_function(compiled)
        self.gemms, self.steps = [], []
        for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            op = self.inputs[k]
            self.gemms.append(IntGemm(self.codes[:, lo:hi], zero, self.w_scale, self.spec["conv"], generic, op.bits))
            op.tables()
            self.steps.append(op.delta[:, None] * self.in_scale[lo:hi][None, :])    # [T, C_k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slot = _current_slot(self.slots)
        bounds, y = self.spec["bounds"], None
        for k, gemm in enumerate(self.gemms):
            part = x if len(self.gemms) == 1 else x.narrow(self.channel_dim, bounds[k], bounds[k + 1] - bounds[k])
            op = self.inputs[k]
            codes = op.codes(part, self.steps[k][slot], slot, self.codes_fn, self.channel_dim)
            out = gemm(codes, op.delta[slot], op.shift[slot], op.bits, self.bias if k == 0 else None)
            y = out if y is None else y.add_(out)
        return y

    def extra_repr(self) -> str:
        return f"weight={tuple(self.spec['weight_shape'])}, w_bits={self.spec['w_bits']}, parts={len(self.inputs)}"


class WeightOnlyLayer(_WeightCodes):
    """A weight-only quantized layer (activations in floating point): codes stored, computed as op(X/s, Δ_w (W -
    z_w)) with the weight dequantized once by prepare()."""

    def __init__(self, spec: dict, device=None):
        super().__init__(spec, device)
        self.weight: torch.Tensor | None = None

    @classmethod
    def of(cls, layer: QuantLayer) -> "WeightOnlyLayer":
        out = cls(cls.spec_of(layer) | {"inputs": []}, device=layer.weight.device)
        out.fill(layer)
        return out

    def prepare(self, compiled: bool = False, generic: bool = False) -> None:
        view = (-1,) + (1,) * (self.codes.dim() - 1)
        self.weight = (self.codes.float() - self.w_zero.float().view(view)) * self.w_scale.view(view)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.spec["conv"]
        if conv is None:
            return F.linear(x / self.in_scale, self.weight, self.bias)
        s = self.in_scale.view(1, -1, *[1] * (self.codes.dim() - 2))
        op = F.conv1d if self.codes.dim() == 3 else F.conv2d
        return op(x / s, self.weight, self.bias, conv["stride"], conv["padding"], conv["dilation"], conv["groups"])


class IntMatMul(nn.Module):
    """bmm of two quantized operands as an integer product: Δ_a Δ_b Σ_k (A - z_a)(B - z_b).

    On the CPU under IEEE float32 matmuls (quant.deploy.kernels.exact_float_path) the operands are their signed
    codes X - z_x held as float integers, and their product an exact_bmm: every partial sum an integer within
    float32's exact range, so the result is the integer sum (no zero-point terms: the codes are already centred).
    Elsewhere int8 x int8 -> int32 (kernels.int_bmm), with the zero-point terms of 8-bit operands added exactly."""

    def __init__(self, spec: dict, slots: SlotIndex, device=None):
        super().__init__()
        self.spec, self.slots = spec, slots
        self.inputs = nn.ModuleList([_Operand(slots.num_slots, **a, device=device) for a in spec["inputs"]])
        self.codes_fn = codes_function(False)
        self.bound: int | None = None            # max |(A - z_a)(B - z_b)| where the float path runs, else None

    @staticmethod
    def spec_of(mm: QuantMatMul) -> dict:
        return {"inputs": [{"bits": q.spec.bits, "qmin": q.spec.qmin, "qmax": q.spec.qmax} for q in mm.a_quant]}

    @classmethod
    def of(cls, mm: QuantMatMul, slots: SlotIndex) -> "IntMatMul":
        out = cls(cls.spec_of(mm), slots, device=mm.a_quant[0].delta.device)
        for op, q in zip(out.inputs, mm.a_quant):
            op.fill(q)
        return out

    def prepare(self, compiled: bool, generic: bool = False) -> None:
        for op in self.inputs:
            op.tables()
        device = self.inputs[0].delta.device
        self.bound = None
        if exact_float_path(device):
            self.bound = self.inputs[0].magnitude() * self.inputs[1].magnitude()
        self.codes_fn = codes_function(compiled, signed=self.bound is not None)

    def _int8(self, k: int, x: torch.Tensor, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 X' = codes - o, o - z) of operand k."""
        op = self.inputs[k]
        codes = op.codes(x, op.delta[slot], slot, self.codes_fn)
        zero = op.shift[slot]
        offset = grid_offset(zero, op.bits)
        return (codes.to(torch.int16) - offset.to(torch.int16)).to(torch.int8), (offset - zero).to(torch.int32)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        slot = _current_slot(self.slots)
        scale = self.inputs[0].delta[slot] * self.inputs[1].delta[slot]
        if self.bound is not None:                                           # exact float products (CPU)
            qa, qb = (op.codes(x, op.delta[slot], slot, self.codes_fn, signed=True).float()   # codes in x's dtype
                      for op, x in zip(self.inputs, (a, b)))
            return exact_bmm(qa, qb, self.bound).mul_(scale)
        a8, ca = self._int8(0, a, slot)                                      # [N, n, K]
        b8, cb = self._int8(1, b, slot)                                      # [N, K, m]
        acc = int_bmm(a8, b8)                                                # [N, n, m] int32
        if max(op.bits for op in self.inputs) > 7:                             # offsets away from the zero points
            acc = (acc + cb * a8.sum(2, keepdim=True, dtype=torch.int32) + ca * b8.sum(1, keepdim=True, dtype=torch.int32)
                   + a8.shape[2] * ca * cb)
        return acc.float() * scale
