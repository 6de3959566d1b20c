"""Range initialisation: min-max, or a search for the clipping range with the least Lp error (SPEC §1)."""
from __future__ import annotations

import torch

from quant.quantizer import fake_quant, range_to_params
from quant.settings import QuantizerSpec, RangeInit

_ALPHAS = torch.linspace(0.2, 1.0, 41)  # candidate shrink factors of the min-max range


def lp_search(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantizerSpec,
              alphas: torch.Tensor = _ALPHAS) -> tuple[torch.Tensor, torch.Tensor]:
    """Best (alpha*lo, alpha*hi) per row of x [n, m] by sum |x - Q(x)|^p; lo, hi: [n] -> ([n], [n])."""
    best_err = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for a in alphas.tolist():
        c_lo, c_hi = lo * a, hi * a
        delta, zero = range_to_params(c_lo, c_hi, spec)
        err = (fake_quant(x, delta[:, None], zero[:, None], spec.qmin, spec.qmax) - x).abs().pow(spec.lp).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, c_lo, best_lo), torch.where(better, c_hi, best_hi)
    return best_lo, best_hi


@torch.no_grad()
def init_range(x: torch.Tensor, spec: QuantizerSpec, lo: torch.Tensor | None = None,
               hi: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Range per row of x [n, m] by spec.init; lo/hi default to the rows' own min/max."""
    lo = x.min(dim=1).values if lo is None else lo
    hi = x.max(dim=1).values if hi is None else hi
    if spec.init in (RangeInit.MINMAX, RangeInit.RUNNING):  # RUNNING: lo/hi are the running averages
        return lo, hi
    return lp_search(x, lo, hi, spec)


@torch.no_grad()
def init_weight_quantizers(qmodel) -> None:
    """Per-out-channel ranges of every QuantLayer weight (explicit initialisation, no data needed)."""
    for _, layer in qmodel.quant_layers():
        w = layer.effective_weight().detach().flatten(1)                    # [C_out, C_in*kh*kw]
        lo, hi = init_range(w, layer.w_quant.spec)
        layer.w_quant.set_range(lo, hi)
