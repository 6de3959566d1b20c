"""Weight Dilation (paper §4.1, eq. 5, 12-14; SPEC §3): Y = (X/s)(s·W) with s >= 1 from the weights alone.

For each out-channel o the in-channels holding its max and its min form the protected set A (s = 1).
Every other in-channel k is dilated as far as all out-channels allow:
    s_k = min( min_{o: W[o,k]>0} Wmax_o / W[o,k],  min_{o: W[o,k]<0} Wmin_o / W[o,k] )
so every out-channel's max and min, hence its min-max Δ_w, are unchanged while X/s shrinks.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from quant.layers import QuantLayer
from quant.model import QuantModel


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


def _fold_into_norm(norm: nn.GroupNorm | nn.LayerNorm, s: torch.Tensor) -> None:
    """norm(x)/s exactly: the affine weight and bias of each channel are divided by s."""
    norm.weight.div_(s)
    norm.bias.div_(s)


@torch.no_grad()
def dilate(qmodel: QuantModel) -> dict[str, torch.Tensor]:
    """Apply WD to every QuantLayer of qmodel (FP weights, before calibration); returns s per layer.

    Layers reading one tensor (adapter.shared_inputs, e.g. q/k/v) share one s computed on their
    concatenated weights; where the adapter names the affine norm producing that tensor, 1/s is folded
    into it, otherwise X/s happens inside the layer's activation quantizer (QuantLayer.in_scale).
    """
    layers = dict(qmodel.quant_layers())
    groups = {g: None for g in qmodel.adapter.shared_inputs(qmodel.model)}
    producers = qmodel.adapter.norm_producers(qmodel.model)
    grouped = {name for g in groups for name in g}
    groups.update({(name,): None for name in layers if name not in grouped})
    scales = {}
    for group in groups:
        w = torch.cat([layers[n].weight for n in group], dim=0)          # shared input: stack out-channels
        s = dilation_scale(w)
        producer = producers.get(group)
        if producer is not None:
            _fold_into_norm(qmodel.model.get_submodule(producer), s.to(w))
        for name in group:
            layer = layers[name]
            shape = (1, -1) + (1,) * (layer.weight.dim() - 2)
            layer.weight.mul_(s.to(layer.weight).view(shape))           # W' = s·W (per in-channel)
            if producer is None:
                layer.in_scale.mul_(s.to(layer.in_scale))
            scales[name] = s
    return scales
