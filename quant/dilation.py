"""Equivalent scaling Y = (X/s)(s·W) (paper eq. 5): Weight Dilation and the alternatives of Table 9.

Weight Dilation (paper §4.1, eq. 12-14; SPEC §3) takes s >= 1 from the weights alone. For each out-channel
o the in-channels holding its max and its min form the protected set A (s = 1). Every other in-channel k
is dilated as far as all out-channels allow:
    s_k = min( min_{o: W[o,k]>0} Wmax_o / W[o,k],  min_{o: W[o,k]<0} Wmin_o / W[o,k] )
so every out-channel's max and min, hence its min-max Δ_w, are unchanged while X/s shrinks.

Alternatives (`Scaling`), which need activation statistics from calibration data:
- SMOOTHQUANT: s_k = max|X_k|^α / max|W_k|^(1-α), α = 0.5 (Xiao et al. 2023), on every channel;
- AWQ: s_k = mean|X_k|^α on the top 1% most salient channels (by mean|X_k|), 1 elsewhere, α from a grid
  minimising the group's weight-quantized output error (Lin et al. 2024);
- OSPLUS: channel-wise shift z_k = (max X_k + min X_k)/2 and scale s_k = max(1, (max X_k - min X_k)/(2t))
  on every channel, the threshold t from a grid minimising the group's weight- and activation-quantized
  output error (Wei et al. 2023); X - z is quantized and z added back (QuantLayer.in_shift);
- LEARNABLE: the SmoothQuant s times a per-layer factor r (init 1) that distillation trains at
  DistillConfig.lr_scale, 1e-5 as in the paper's Table 9 (OmniQuant-like; QuantLayer.in_gain).
"""
from __future__ import annotations

from enum import Enum

import torch
import torch.nn as nn

from quant.calib_data import CalibSet
from quant.layers import QuantLayer
from quant.model import QuantModel, quant_enabled
from quant.quantizer import fake_quant, range_to_params


class Scaling(Enum):
    WEIGHT_DILATION = "wd"
    SMOOTHQUANT = "smoothquant"
    AWQ = "awq"
    OSPLUS = "osplus"
    LEARNABLE = "learnable"


NEEDS_DATA = {Scaling.SMOOTHQUANT, Scaling.AWQ, Scaling.OSPLUS, Scaling.LEARNABLE}


def dilation_scale(w: torch.Tensor) -> torch.Tensor:
    """s [C_in] for a weight [C_out, C_in, *kernel]; masks, never a division by a clamped zero."""
    c_out, c_in = w.shape[:2]
    w = w.detach().double().reshape(c_out, c_in, -1)                       # [O, K, k]
    flat = w.reshape(c_out, -1)
    w_max, w_min = flat.max(1).values, flat.min(1).values                # [O]
    k_of_max = flat.argmax(1) // w.shape[2]                              # in-channel of each out-channel's max
    k_of_min = flat.argmin(1) // w.shape[2]
    bound = torch.where(w > 0, w_max.view(-1, 1, 1), w_min.view(-1, 1, 1))
    ratio = torch.where(w != 0, bound / torch.where(w != 0, w, torch.ones_like(w)), torch.full_like(w, torch.inf))
    s = ratio.amin(dim=(0, 2))                                           # [K]; inf if channel k is all zero
    s[torch.isinf(s)] = 1.0
    s[k_of_max] = 1.0
    s[k_of_min] = 1.0
    return s.clamp_min(1.0).to(torch.float32)


def smoothquant_scale(w: torch.Tensor, x_absmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """s_k = max|X_k|^α / max_o |W[o,k]|^(1-α)  ([C_out, C_in, ...], [C_in] -> [C_in])."""
    w_absmax = w.detach().transpose(0, 1).flatten(1).abs().amax(1)
    s = x_absmax.clamp_min(1e-5) ** alpha / w_absmax.clamp_min(1e-5) ** (1 - alpha)
    return s.clamp_min(1e-5).float()


def _quant_input(x: torch.Tensor, shift: torch.Tensor, layer: QuantLayer) -> torch.Tensor:
    """Q(x - z) + z with a per-tensor min-max quantizer at the layer's activation bits (x [N, C, ...])."""
    spec = layer.a_quant[0].spec
    view = (1, -1) + (1,) * (x.dim() - 2)
    xc = x - shift.view(view)
    delta, zero = range_to_params(xc.min(), xc.max(), spec)
    return fake_quant(xc, delta, zero, spec.qmin, spec.qmax) + shift.view(view)


def _quant_error(layers: list[QuantLayer], x: torch.Tensor, s: torch.Tensor, shift: torch.Tensor | None = None) -> float:
    """Σ over the group of ||op(x/s, Q(s·W)) - op(x, W)||² with per-out-channel min-max Q at the layer's bits;
    with `shift`, x/s is also quantized (per tensor, around the shift; layers without activation
    quantizers keep it exact)."""
    err = 0.0
    for layer in layers:
        shape = (1, -1) + (1,) * (layer.weight.dim() - 2)
        ws = layer.weight * s.view(shape)
        flat = ws.flatten(1)
        delta, zero = range_to_params(flat.amin(1), flat.amax(1), layer.w_quant.spec)
        view = (-1,) + (1,) * (ws.dim() - 1)
        wq = fake_quant(ws, delta.view(view), zero.view(view), layer.w_quant.spec.qmin, layer.w_quant.spec.qmax)
        xs = x / layer._channel_view(s)
        if shift is not None and len(layer.a_quant):
            xs = _quant_input(xs if layer.conv_args else xs.reshape(-1, xs.shape[-1]), shift / s, layer).view_as(xs)
        y, ref = layer.apply_op(xs, wq), layer.apply_op(x, layer.weight)
        err += float((y - ref).pow(2).sum())
    return err


def awq_scale(layers: list[QuantLayer], x: torch.Tensor, x_absmean: torch.Tensor, top: float = 0.01,
              grid: int = 11) -> torch.Tensor:
    """Scale only the most salient in-channels by mean|X_k|^α, α from a grid (α = 0 is no scaling)."""
    k = max(1, round(top * len(x_absmean)))
    salient = x_absmean.topk(k).indices
    best, best_err = torch.ones_like(x_absmean), _quant_error(layers, x, torch.ones_like(x_absmean))
    for alpha in torch.linspace(0.1, 1.0, grid - 1).tolist():
        s = torch.ones_like(x_absmean)
        s[salient] = x_absmean[salient].clamp_min(1e-5) ** alpha
        s = s / s[salient].mean().sqrt()                     # keep the scaled channels around unit size
        err = _quant_error(layers, x, s)
        if err < best_err:
            best, best_err = s, err
    return best


def osplus_transform(layers: list[QuantLayer], x: torch.Tensor, x_max: torch.Tensor, x_min: torch.Tensor,
                     grid: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, z): shift every channel to centre its range, squeeze ranges above a threshold t found on a grid."""
    shift, half = (x_max + x_min) / 2, ((x_max - x_min) / 2).clamp_min(1e-5)
    best, best_err = None, float("inf")
    for frac in torch.linspace(1.0 / grid, 1.0, grid).tolist():
        s = (half / (frac * half.max())).clamp_min(1.0)
        err = _quant_error(layers, x, s, shift)
        if err < best_err:
            best, best_err = s, err
    return best, shift


@torch.no_grad()
def layer_input_stats(qmodel: QuantModel, calib: CalibSet, batch_size: int = 64,
                      keep: int = 64) -> dict[str, dict[str, torch.Tensor]]:
    """Per QuantLayer: per-in-channel max|X| and mean|X| over `calib`, and the inputs of the first `keep`
    samples (for searches). Inputs are FP activations (quantization off)."""
    stats, hooks = {}, []

    def hook(name):
        def fn(mod, args):
            x = args[0].detach()
            dims = [d for d in range(x.dim()) if d != (1 if mod.conv_args else x.dim() - 1)]
            st = stats.setdefault(name, {"absmax": 0, "abssum": 0, "count": 0, "x": [],
                                         "max": torch.tensor(-torch.inf), "min": torch.tensor(torch.inf)})
            st["absmax"] = torch.maximum(torch.as_tensor(st["absmax"]), x.abs().amax(dims))
            st["max"], st["min"] = torch.maximum(st["max"], x.amax(dims)), torch.minimum(st["min"], x.amin(dims))
            st["abssum"] = st["abssum"] + x.abs().sum(dims)
            st["count"] += x.numel() // x.shape[1 if mod.conv_args else -1]
            if sum(len(v) for v in st["x"]) < keep:
                st["x"].append(x[:keep])
        return fn

    for name, layer in qmodel.quant_layers():
        hooks.append(layer.register_forward_pre_hook(hook(name)))
    device = next(qmodel.parameters()).device
    try:
        with quant_enabled(qmodel, weight=False, act=False):
            for x, t, cond in calib.batches(batch_size, device):
                qmodel(x, t, **cond)
    finally:
        for h in hooks:
            h.remove()
    return {n: {"absmax": st["absmax"], "absmean": st["abssum"] / st["count"], "max": st["max"], "min": st["min"],
                "x": torch.cat(st["x"])[:keep]} for n, st in stats.items()}


def can_fold(norm: nn.Module, s: torch.Tensor) -> bool:
    """Whether norm(x)/s can be folded into the norm's affine: one weight and bias per channel of s."""
    w, b = getattr(norm, "weight", None), getattr(norm, "bias", None)
    return (isinstance(w, torch.Tensor) and isinstance(b, torch.Tensor) and w.shape == s.shape and b.shape == s.shape)


def _fold_into_norm(norm: nn.Module, s: torch.Tensor) -> None:
    """norm(x)/s exactly: the affine weight and bias of each channel are divided by s."""
    norm.weight.div_(s)
    norm.bias.div_(s)


def group_transform(method: Scaling, layers: list[QuantLayer], stats: dict | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(s [C_in], shift [C_in] or None) for layers sharing one input (their weights stacked over out-channels)."""
    w = torch.cat([layer.weight for layer in layers], dim=0)
    if method is Scaling.WEIGHT_DILATION:
        return dilation_scale(w), None
    if method in (Scaling.SMOOTHQUANT, Scaling.LEARNABLE):
        return smoothquant_scale(w, stats["absmax"]), None
    if method is Scaling.OSPLUS:
        return osplus_transform(layers, stats["x"], stats["max"], stats["min"])
    return awq_scale(layers, stats["x"], stats["absmean"]), None


@torch.no_grad()
def dilate(qmodel: QuantModel, method: Scaling = Scaling.WEIGHT_DILATION,
           calib: CalibSet | None = None) -> dict[str, torch.Tensor]:
    """Apply equivalent scaling to every QuantLayer of qmodel (FP weights, before calibration); returns s.

    Layers reading one tensor (adapter.shared_inputs, e.g. q/k/v) share one s computed on their
    concatenated weights; where the adapter names the affine norm producing that tensor, 1/s is folded
    into it, otherwise X/s happens inside the layer's activation quantizer (QuantLayer.in_scale).
    """
    if method in NEEDS_DATA and calib is None:
        raise ValueError(f"--scaling {method.value} needs calibration data (activation statistics)")
    stats = layer_input_stats(qmodel, calib) if method in NEEDS_DATA else {}
    layers = dict(qmodel.quant_layers())
    groups = {g: None for g in qmodel.adapter.shared_inputs(qmodel.model)}
    producers = qmodel.adapter.norm_producers(qmodel.model)
    grouped = {name for g in groups for name in g}
    groups.update({(name,): None for name in layers if name not in grouped})
    scales = {}
    for group in groups:
        s, shift = group_transform(method, [layers[n] for n in group], stats.get(group[0]))
        producer = producers.get(group)
        if producer is not None and not can_fold(qmodel.model.get_submodule(producer), s):
            producer = None                        # e.g. LayerNorm([C, H, W]): keep X/s in the quantizer
        if producer is not None:
            _fold_into_norm(qmodel.model.get_submodule(producer), s.to(layers[group[0]].weight))
        for name in group:
            layer = layers[name]
            shape = (1, -1) + (1,) * (layer.weight.dim() - 2)
            layer.weight.mul_(s.to(layer.weight).view(shape))           # W' = s·W (per in-channel)
            if producer is None:
                layer.in_scale.mul_(s.to(layer.in_scale))
            if shift is not None:                                       # in the frame of the layer's input
                layer.set_shift(shift if producer is None else shift / s)
            if method is Scaling.LEARNABLE:
                layer.make_scale_learnable()
            scales[name] = s
    return scales
