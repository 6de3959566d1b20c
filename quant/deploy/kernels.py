"""Integer kernels of maintained libraries, behind one call: the exact integer product of codes, rescaled once.

For an output channel n of a convolution or linear layer with input codes X (zero point z_x) and weight codes W
(zero point z_n), the simulated layer computes Δ_x Δ_w,n Σ_m (W_nm - z_n)(X_m - z_x) + b_n in floating point.
Here the sum is an int32 accumulation of int8 operands:

- the weight is stored as W' = W - o_n in int8, with the offset o_n = z_n wherever the channel's codes allow
  (every 4-bit weight, most 8-bit channels), so Σ (W - z)(X - z_x) = Σ W'(X - z_x) + (o_n - z_n) Σ_m (X_m - z_x):
  the second term, the input's window sum times a per-channel integer, is added only where o_n != z_n;
- on the CPU, oneDNN's uint8 x int8 convolution and linear (`torch.ops.onednn.qconv2d_pointwise` /
  `qlinear_pointwise`, the ops Inductor's x86 int8 path lowers to) take the activation zero point
  themselves and return Δ_x Δ_w,n acc + b in float32. Without VNNI (AVX2, AVX-512F) oneDNN adds adjacent
  uint8 x int8 products in int16 with saturation (vpmaddubsw); onednn_pairs_saturate() finds that out by computing
  one worst case, and a layer whose products could saturate there (8-bit input codes times weights beyond +-64)
  multiplies its codes in two 4-bit halves, X = 16 X_hi + X_lo, each product exact, summed after the rescale;
- elsewhere (CUDA, or `generic=True`), `torch._int_mm` (int8 x int8 -> int32) multiplies the im2col'ed input,
  with the activation offset handled the same way.

Zero padding is the real zero: a padded position contributes X_m - z_x = 0 on both paths. Activation Δ_x, z_x
are 0-d tensors (one TPQ slot per call), so no value is read on the host in a forward.
"""
from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

from quant.deploy.codes import grid_offset, int8_offsets


def onednn_available(device: torch.device) -> bool:
    return device.type == "cpu" and hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qconv2d_pointwise")


INT16_MAX = 2 ** 15 - 1


@cache
def onednn_pairs_saturate() -> bool:
    """Whether oneDNN's uint8 x int8 convolution or linear on this CPU sums pairs of products in saturating int16
    (no VNNI): a 4-channel product of codes 255 and weights 127 (exact: 129540) is computed and compared."""
    x = torch.full((1, 4, 1, 1), 255, dtype=torch.uint8)
    w = torch.full((1, 4, 1, 1), 127, dtype=torch.int8)
    one, zero = torch.ones(1), torch.zeros(1, dtype=torch.int64)
    conv = torch.ops.onednn.qconv2d_pointwise.tensor(
        x, torch.ones(()), torch.zeros((), dtype=torch.int32),
        torch.ops.onednn.qconv_prepack(w, one, 1.0, 0, [1, 1], [0, 0], [1, 1], 1, None), one, zero, None, [1, 1],
        [0, 0], [1, 1], 1, 1.0, 0, torch.float32, "none", [], "")
    linear = torch.ops.onednn.qlinear_pointwise.tensor(
        x.view(1, 4), torch.ones(()), torch.zeros((), dtype=torch.int32),
        torch.ops.onednn.qlinear_prepack(w.view(1, 4), None), one, zero, None, 1.0, 0, torch.float32, "none", [], "")
    return not (float(conv.flatten()[0]) == float(linear.flatten()[0]) == 4 * 255 * 127)


def may_saturate(x_bits: int, w: torch.Tensor) -> bool:
    """Whether a pair of uint8 codes of x_bits bits times int8 weights w can leave int16."""
    return 2 * (2 ** x_bits - 1) * int(w.to(torch.int16).abs().amax()) > INT16_MAX


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] @ int8 [K, N] -> int32 [M, N] with torch._int_mm; on CUDA the shapes are padded to what
    cuBLASLt accepts (M > 16, K and N multiples of 8) and cut back."""
    if a.device.type != "cuda":
        return torch._int_mm(a, b)
    m, k = a.shape
    n = b.shape[1]
    pm, pk, pn = max(0, 17 - m), -k % 8, -n % 8
    if pm or pk:
        a = F.pad(a, (0, pk, 0, pm))
    if pk or pn:
        b = F.pad(b, (0, pn, 0, pk))
    return torch._int_mm(a, b)[:m, :n]


FLOAT_EXACT = 2 ** 24       # float32 holds every integer of magnitude <= 2^24 exactly


def exact_float_path(device: torch.device) -> bool:
    """Whether integer products may run as float32 bmm here: on the CPU under IEEE float32 matmuls (the default
    `torch.get_float32_matmul_precision() == "highest"`; TF32/bf16 would round the sums)."""
    return device.type == "cpu" and torch.get_float32_matmul_precision() == "highest"


def exact_bmm(a: torch.Tensor, b: torch.Tensor, bound: int) -> torch.Tensor:
    """float32 [N, n, K] @ [N, K, m] of integer-valued operands whose products have magnitude <= bound: the exact
    integer sums, as float32 (integer arithmetic on float units).

    The product runs over chunks along K of at most 2^24 // bound terms: every partial sum is an integer of
    magnitude <= 2^24, held exactly, and so is each chunk's float32 result. Chunks are summed in int32 (exact),
    or in float32 when K fits one chunk."""
    chunk = max(1, FLOAT_EXACT // max(1, bound))
    k = a.shape[-1]
    if k <= chunk:
        return torch.bmm(a, b)
    acc = None
    for lo in range(0, k, chunk):
        part = torch.bmm(a[..., lo:lo + chunk], b[:, lo:lo + chunk]).to(torch.int32)
        acc = part if acc is None else acc.add_(part)
    return acc.float()


def int_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [N, n, K] @ int8 [N, K, m] -> int32 [N, n, m], exactly.

    torch has no batched int8 matmul (`torch._int_mm` is 2-D), and a loop of N 2-D products costs more than the
    products at the attention shapes of a UNet. Where exact_float_path holds, the product runs as exact_bmm of the
    codes (int8 x int8 products are <= 2^14: chunks of 1,024 along K), bit for bit the int32 accumulation.
    Elsewhere (CUDA, where TF32 may round), one torch._int_mm per batch row."""
    if not exact_float_path(a.device):
        return torch.stack([int_mm(a[i], b[i]) for i in range(a.shape[0])])
    return exact_bmm(a.float(), b.float(), 2 ** 14).to(torch.int32)


class IntGemm:
    """One conv (2-d; a 1-d conv as 2-d with height 1) or linear layer's integer product over one slice of its
    input channels: Δ_x Δ_w,n Σ (W - z_w)(X - z_x) (+ bias when given), in float32.

    Built from the weight codes (quant.deploy.codes.weight_codes) on their device: the int8 W' = W - o_n, the
    per-channel correction o_n - z_n, and the kernel's own form of W' (oneDNN's packed layout on the CPU, the
    [K, C_out] matrix for torch._int_mm elsewhere). Derived state only: an IntLayer rebuilds it from its codes.
    """

    def __init__(self, codes: torch.Tensor, zero: torch.Tensor, w_scale: torch.Tensor, conv: dict | None,
                 generic: bool = False, x_bits: int = 8):
        self.conv = conv                            # stride, padding, dilation, groups (None: a linear layer)
        self.dim = codes.dim()                      # 2 linear, 3 conv1d, 4 conv2d
        view = (-1,) + (1,) * (codes.dim() - 1)
        offset = int8_offsets(codes, zero)
        w = (codes.to(torch.int16) - offset.view(view)).to(torch.int8)           # W' [C_out, C_in, *kernel]
        self.generic = generic or not onednn_available(codes.device)
        # oneDNN without VNNI would saturate this layer's products: its codes go in as two exact 4-bit halves
        self.split_codes = not self.generic and onednn_pairs_saturate() and may_saturate(x_bits, w)
        self.w_scale = w_scale.float()
        self.w_correction = (offset - zero).to(torch.int32)                      # o_n - z_n
        self.corrected = bool((self.w_correction != 0).any())
        like = dict(device=codes.device)
        self.w_sum = w.flatten(1).sum(1, dtype=torch.int32)                      # Σ_m W'_nm (generic path)
        self._w_zero = torch.zeros(w.shape[0], dtype=torch.int64, **like)        # oneDNN: symmetric weights
        self._one, self._one_scale = torch.ones((), **like), torch.ones(1, **like)
        self._one_zero = torch.zeros(1, dtype=torch.int64, **like)
        self.ones = None
        if self.generic:
            self.packed = w.flatten(1).t().contiguous()                          # [K, C_out] for int_mm
        elif conv is None:
            self.packed = torch.ops.onednn.qlinear_prepack(w, None)
        else:
            stride, padding, dilation, groups = self._conv2d_args()
            kernel = w.unsqueeze(2) if w.dim() == 3 else w                       # conv1d [O, C, k] -> [O, C, 1, k]
            self.packed = torch.ops.onednn.qconv_prepack(kernel, self.w_scale, 1.0, 0, stride, padding, dilation,
                                                         groups, None)
            if self.corrected:                                       # window sums Σ (X - z_x), one per group
                ones = torch.ones((groups, *kernel.shape[1:]), dtype=torch.int8)
                self._one_scale = torch.ones(groups, **like)
                self._one_zero = torch.zeros(groups, dtype=torch.int64, **like)
                self.ones = torch.ops.onednn.qconv_prepack(ones, self._one_scale, 1.0, 0, stride, padding,
                                                           dilation, groups, None)
        self.kernel = tuple(w.shape[2:])

    def _conv2d_args(self) -> tuple[list[int], list[int], list[int], int]:
        c = self.conv
        if self.dim == 4:
            return list(c["stride"]), list(c["padding"]), list(c["dilation"]), c["groups"]
        return [1, *c["stride"]], [0, *c["padding"]], [1, *c["dilation"]], c["groups"]      # conv1d: height 1

    def __call__(self, codes: torch.Tensor, x_scale: torch.Tensor, x_zero: torch.Tensor, bits: int,
                bias: torch.Tensor | None) -> torch.Tensor:
        """codes: uint8 input codes [N, C(slice), ...] (conv) or [..., C(slice)] (linear); x_scale, x_zero: 0-d
        (Δ_x, zero point on the code grid)."""
        if self.generic:
            return self._generic(codes, x_scale, x_zero, bits, bias)
        zp = x_zero.to(torch.int32)
        squeeze = self.conv is not None and codes.dim() == 3
        x = codes.unsqueeze(2) if squeeze else codes
        weights = (self.packed, self.w_scale, self._w_zero)
        if self.split_codes:                  # Σ W'(X - z) = 16 Σ W' X_hi + Σ W'(X_lo - z), X = 16 X_hi + X_lo
            y = self._onednn(x >> 4, x_scale * 16, torch.zeros_like(zp), weights, None)
            y.add_(self._onednn(x & 15, x_scale, zp, weights, bias))
        else:
            y = self._onednn(x, x_scale, zp, weights, bias)
        if self.corrected:                                                         # + c_n Σ_m (X_m - z_x)
            scale = self.w_correction * (self.w_scale * x_scale)
            if self.conv is None:
                window = x.sum(-1, keepdim=True, dtype=torch.int32) - x.shape[-1] * zp
                y.addcmul_(window, scale)
            else:
                window = self._onednn(x, self._one, zp, (self.ones, self._one_scale, self._one_zero), None)
                groups = self.conv["groups"]
                if groups > 1:                                      # [N, groups, ...] -> one per output channel
                    window = window.repeat_interleave(y.shape[1] // groups, 1)
                y.addcmul_(window, scale.view(1, -1, 1, 1))
        return y.squeeze(2) if squeeze else y       # channels-last, as oneDNN writes it (see IntModel.prepare)

    def _onednn(self, x: torch.Tensor, x_scale: torch.Tensor, zp: torch.Tensor, weights: tuple,
                bias: torch.Tensor | None) -> torch.Tensor:
        """Δ_x Δ_w,n Σ W(X - zp) (+ bias) on oneDNN's uint8 x int8 linear or 2-d convolution; weights: (packed W,
        Δ_w per out-channel, zero points 0)."""
        packed, w_scale, w_zero = weights
        if self.conv is None:
            return torch.ops.onednn.qlinear_pointwise.tensor(x, x_scale, zp, packed, w_scale, w_zero, bias, 1.0, 0,
                                                             torch.float32, "none", [], "")
        stride, padding, dilation, groups = self._conv2d_args()
        return torch.ops.onednn.qconv2d_pointwise.tensor(x, x_scale, zp, packed, w_scale, w_zero, bias, stride,
                                                         padding, dilation, groups, 1.0, 0, torch.float32, "none",
                                                         [], "")

    def _generic(self, codes: torch.Tensor, x_scale: torch.Tensor, x_zero: torch.Tensor, bits: int,
                 bias: torch.Tensor | None) -> torch.Tensor:
        """torch._int_mm on int8 X' = X - o_x: Σ (W - z)(X - z_x) = Σ W'X' + a Σ W' + c_n Σ X' + K a c_n with
        a = o_x - z_x, c_n = o_n - z_n (padding holds X' = -a, i.e. the real zero)."""
        o_x = grid_offset(x_zero, bits)
        a = (o_x - x_zero).to(torch.int32)
        if self.conv is None:
            lead = codes.shape[:-1]
            cols = (codes.reshape(-1, codes.shape[-1]).to(torch.int16) - o_x).to(torch.int8)   # [M, K]
        else:
            cols, out_hw = self._im2col(codes, x_zero, a)
        acc = int_mm(cols, self.packed)                                                # [M, C_out] int32
        acc = acc + a * self.w_sum
        if self.corrected:
            k = cols.shape[1]
            acc = acc + self.w_correction * (cols.sum(1, keepdim=True, dtype=torch.int32) + k * a)
        y = acc.float() * (self.w_scale * x_scale)
        if bias is not None:
            y = y + bias
        if self.conv is None:
            return y.reshape(*lead, -1)
        n = codes.shape[0]
        y = y.reshape(n, *out_hw, -1).movedim(-1, 1)
        return y.squeeze(2) if self.dim == 3 else y

    def _im2col(self, codes: torch.Tensor, x_zero: torch.Tensor, a: torch.Tensor):
        """[N * H_out * W_out, C * kh * kw] int8 windows of X' = X - o_x = (X - z_x) - a, zero-padded in X - z_x
        (the real zero)."""
        stride, padding, dilation, groups = self._conv2d_args()
        if groups != 1:
            raise NotImplementedError("grouped convolutions have no generic integer path")
        x = codes.unsqueeze(2) if codes.dim() == 3 else codes
        x = x.to(torch.int16) - x_zero.to(torch.int16)                             # X - z_x
        kh, kw = (1, *self.kernel) if self.dim == 3 else self.kernel
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0])) if any(padding) else x
        x = (x - a.to(torch.int16)).to(torch.int8)
        win = x.unfold(2, dilation[0] * (kh - 1) + 1, stride[0]).unfold(3, dilation[1] * (kw - 1) + 1, stride[1])
        win = win[..., ::dilation[0], ::dilation[1]]                               # [N, C, Ho, Wo, kh, kw]
        n, c, ho, wo = win.shape[:4]
        return win.permute(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw), (ho, wo)
