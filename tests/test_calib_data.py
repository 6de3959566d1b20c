import pytest
import torch

from ddim import ddim_sample
from quant.calib_data import collect_trajectories, draw_over_steps, plan_steps, trajectories_for
from conftest import BETAS, TINY_SEQ


def _sampler(model, calls: list):
    """The FP sampler as the pipeline passes it, counting network calls."""
    def counted(x, t):
        calls.append(len(x))
        return model(x, t)
    return lambda x, on_step, rows=None: ddim_sample(counted, x, TINY_SEQ, BETAS, on_step=on_step)


@pytest.mark.parametrize("n,per_traj", [(16, 1), (15, 4), (12, 6)])
def test_draw_takes_the_planned_inputs_of_full_trajectories(tiny_unet, n, per_traj):
    """Every sample equals the input the full trajectory has at that step; per_traj distinct steps each."""
    x_T = torch.randn(trajectories_for(n, per_traj), 1, 16, 16, generator=torch.Generator().manual_seed(3))
    full = collect_trajectories(_sampler(tiny_unet, []), x_T)                   # xs [S, N, ...]
    calib = draw_over_steps(_sampler(tiny_unet, []), x_T, n, len(TINY_SEQ), per_traj,
                            torch.Generator().manual_seed(0), batch_size=5)
    assert calib.x.shape == (n, 1, 16, 16) and calib.t.dtype == torch.long
    step_of_t = {int(t): s for s, t in enumerate(full.ts)}                       # the tiny quad seq is distinct
    hits = []
    for x, t in zip(calib.x, calib.t):
        s = step_of_t[int(t)]
        match = (full.xs[s] - x).abs().flatten(1).amax(1) < 1e-4           # batch-size float noise ~2e-5
        assert match.sum() == 1
        hits.append((int(match.nonzero()), s))
    assert len(set(hits)) == n                                                   # distinct (trajectory, step)
    per = torch.bincount(torch.tensor([h[0] for h in hits]))
    assert per.max() == per_traj and len(per) == trajectories_for(n, per_traj)


def test_each_trajectory_stops_at_its_last_needed_step(tiny_unet):
    calls: list = []
    n = 40
    x_T = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    plan = plan_steps(n, len(TINY_SEQ), 1, torch.Generator().manual_seed(1))
    draw_over_steps(_sampler(tiny_unet, calls), x_T, n, len(TINY_SEQ), 1, gen, batch_size=8)
    needed = sum(int(p[-1]) for p in plan)                      # the input at step k needs k calls
    assert needed <= sum(calls) < n * len(TINY_SEQ)                              # less than full trajectories
    assert sum(calls) <= needed + 7 * len(TINY_SEQ)                              # only batch padding is wasted


def test_draw_is_deterministic_and_spreads_over_steps(tiny_unet):
    x_T = torch.randn(48, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    a = draw_over_steps(_sampler(tiny_unet, []), x_T, 48, len(TINY_SEQ), 1, torch.Generator().manual_seed(5))
    b = draw_over_steps(_sampler(tiny_unet, []), x_T, 48, len(TINY_SEQ), 1, torch.Generator().manual_seed(5))
    assert torch.equal(a.x, b.x) and torch.equal(a.t, b.t)
    assert set(a.t.tolist()) == set(TINY_SEQ)


def test_bad_calibration_requests_are_clear_errors(tiny_unet):
    x_T = torch.randn(4, 1, 16, 16)
    with pytest.raises(ValueError, match="--cali_per_traj"):
        draw_over_steps(_sampler(tiny_unet, []), x_T, 4, len(TINY_SEQ), len(TINY_SEQ) + 1, torch.Generator())
    with pytest.raises(ValueError, match="trajectories"):
        draw_over_steps(_sampler(tiny_unet, []), x_T, 8, len(TINY_SEQ), 1, torch.Generator())
    with pytest.raises(ValueError, match="calibration samples"):
        trajectories_for(0, 1)
