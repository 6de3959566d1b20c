"""Per-timestep eps-mean correction, estimated on the quantized model's own sampling trajectories.

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
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from quant.model import QuantModel


@torch.no_grad()
def estimate_eps_bias(qmodel: QuantModel, fp_model: nn.Module, sample: Callable, x_T: torch.Tensor,
                      batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `sample` (ddim.sampling.make_sampler) from x_T [N, C, H, W] with the corrected quantized model
    and return (timesteps [S] sorted, bias [S, C]). Network calls run in chunks of `batch_size`; b_t is
    the mean over all N trajectories. Any correction already on qmodel is ignored (and left in place)."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def corrected(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps_q = torch.cat([qmodel.raw_eps(x[i:i + batch_size], t[i:i + batch_size])
                           for i in range(0, len(x), batch_size)])
        eps_fp = torch.cat([fp_model(x[i:i + batch_size], t[i:i + batch_size])
                            for i in range(0, len(x), batch_size)])
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
