"""Per-timestep corrections of the quantized eps: the mean (`--eps_correction`) and the scale (`--eps_rescale`).

Both are extensions beyond the paper, off by default, for any method.

## Mean

An extension beyond the paper, off by default (`--eps_correction N`). It targets the failure measured in
the Table 3 analogue (README): after distillation the W4A4 network's eps error keeps a small mean of no fixed
sign, which 100 sampling steps accumulate into a brightness shift. As in PTQD's bias correction (He et al.,
NeurIPS 2023), the mean of the quantization error is estimated per timestep and subtracted; here it is
estimated where the quantized model actually samples (its own x_t, not FP calibration inputs) and per
output channel:

    b_t[c] = mean_{n, h, w} (eps_q(x_t) - eps_fp(x_t))[n, c, h, w],   x_t on the corrected quantized chain,

    eps_corrected(x_t, t) = eps_q(x_t, t) - b_t.

The chain is corrected as it goes (step k is taken with b of steps ≤ k), so each b_t is measured on the
trajectories the corrected model will follow. A timestep visited at several steps (the `quad` schedule
starts 0, 0, 0, 0, 1, ...) keeps the mean of its visits. Data-free: only the FP and the quantized network.

## Scale
Block-wise distillation fits each unit to its FP output by MSE, from inputs that already carry the upstream
quantization error; the least-squares fit to a noisy input shrinks the output towards zero (regression
dilution). On the embedded LDM at W4A4 the distilled eps comes out about 1.5-2% too small at high noise (22%
at t = 1), and the noise it fails to remove stays in the samples as a gray haze. PTQD (He et al., NeurIPS
2023) models the quantized output as (1 + k_t) eps_fp + uncorrelated noise and divides by 1 + k_t; here k_t
is fitted on the calibration set (FP-trajectory inputs, one scalar per timestep):

    g_t = sum eps_fp(x)^2 / sum eps_q(x) eps_fp(x)   over the calibration samples at t,

    eps_rescaled(x_t, t) = g_t eps_q(x_t, t).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

from quant.calib_data import CalibSet
from quant.model import QuantModel


@torch.no_grad()
def estimate_eps_bias(qmodel: QuantModel, fp_model: nn.Module, sample: Callable, x_T: torch.Tensor,
                      batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `sample(network, x_T, generator=...)` from x_T [N, C, H, W] with the corrected quantized model as its
    network, called as network(x, t, **cond) (a DDIM sampler of ddim.sampling.make_sampler; or a family's guided
    sampler, whose calls carry the conditioning of both halves), and return (timesteps [S] sorted, bias [S, C]).
    Network calls run in chunks of `batch_size` rows; b_t is the mean over all rows of every call at t. Any
    correction already on qmodel is ignored (and left in place)."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def chunks(net, x, t, cond):
        return torch.cat([net(x[i:i + batch_size], t[i:i + batch_size],
                              **{k: v[i:i + batch_size] for k, v in cond.items()})
                          for i in range(0, len(x), batch_size)])

    def corrected(x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        eps_q = chunks(qmodel.raw_eps, x, t, cond)
        eps_fp = chunks(fp_model, x, t, cond)
        step = int(t[0])
        if not bool((t == step).all()):
            raise ValueError("estimate_eps_bias needs every trajectory at the same timestep per call")
        diff = (eps_q - eps_fp).transpose(0, 1).reshape(eps_q.shape[1], -1).mean(dim=1).double()   # [C]
        sums[step] = sums.get(step, 0) + diff
        counts[step] = counts.get(step, 0) + 1
        bias = (sums[step] / counts[step]).to(eps_q.dtype)
        return eps_q - bias.view(1, -1, *([1] * (eps_q.dim() - 2)))

    sample(corrected, x_T, generator=generator)
    steps = sorted(sums)
    return (torch.tensor(steps, dtype=torch.long),
            torch.stack([(sums[s] / counts[s]).float() for s in steps]))


def correct_eps_bias(qmodel: QuantModel, fp_model: nn.Module, sample: Callable, x_T: torch.Tensor,
                     batch_size: int, generator: torch.Generator | None = None) -> dict:
    """Estimate b_t (see module doc) and install it on qmodel; returns summary statistics."""
    timesteps, bias = estimate_eps_bias(qmodel, fp_model, sample, x_T, batch_size, generator)
    qmodel.set_eps_bias(timesteps, bias)
    return {"eps_correction_trajectories": len(x_T), "eps_bias_abs_max": float(bias.abs().max()),
            "eps_bias_abs_mean": float(bias.abs().mean())}


@torch.no_grad()
def estimate_eps_gain(qmodel: QuantModel, fp_model: nn.Module, calib: CalibSet, schedule: Sequence[int],
                      batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps [S] sorted, g [S]) from the calibration set (see module doc); every timestep of the
    sampling `schedule` must have samples. Sums run in float64."""
    timesteps = torch.unique(calib.t.cpu())
    missing = sorted(set(int(t) for t in schedule) - set(timesteps.tolist()))
    if missing:
        raise ValueError(f"the calibration set has no sample at timesteps {missing[:8]}: the eps rescale needs "
                         f"every timestep of the schedule (raise --cali_n)")
    device = qmodel.like["device"]
    num = torch.zeros(len(timesteps), dtype=torch.float64, device=device)
    den = torch.zeros(len(timesteps), dtype=torch.float64, device=device)
    sorted_t = timesteps.to(device)
    for x, t, cond in calib.batches(batch_size, device):
        eps_q, eps_fp = qmodel.raw_eps(x, t, **cond).double(), fp_model(x, t, **cond).double()
        slot = torch.searchsorted(sorted_t, t)
        num.index_add_(0, slot, (eps_fp * eps_fp).flatten(1).sum(1))
        den.index_add_(0, slot, (eps_q * eps_fp).flatten(1).sum(1))
    if not bool((den > 0).all()):
        raise ValueError("the quantized eps is uncorrelated with the FP eps at some timestep: no rescale fits")
    return timesteps, (num / den).float().cpu()


def correct_eps_gain(qmodel: QuantModel, fp_model: nn.Module, calib: CalibSet, schedule: Sequence[int],
                     batch_size: int) -> dict:
    """Estimate g_t (see module doc) and install it on qmodel; returns summary statistics."""
    timesteps, gain = estimate_eps_gain(qmodel, fp_model, calib, schedule, batch_size)
    qmodel.set_eps_gain(timesteps, gain)
    return {"eps_gain_min": float(gain.min()), "eps_gain_max": float(gain.max()),
            "eps_gain_median": float(gain.median())}
