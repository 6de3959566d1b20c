"""Calibration data from the FP model's own sampling trajectories (data-free; SPEC §4, §5).

- `draw_over_steps` (DilateQuant's random sampling strategy, and the baseline PTQ): n samples at steps drawn
  uniformly at random, `per_traj` of them (distinct steps) from each FP trajectory, so n samples come from
  ceil(n / per_traj) trajectories. Each trajectory runs only until its last chosen step and only the chosen
  inputs are kept. How many trajectories matters: distillation trains weights, and calibration sets drawn
  from a few trajectories (a few images) are overfitted (see README, "Calibration data").
- `collect_trajectories` keeps every network input (x_t, t) of a set of trajectories;
  `evenly_spaced_steps` (Q-Diffusion `--cali_st/--cali_n`) takes n samples from each of `st` evenly spaced
  steps of them; `random_over_steps` takes n distinct (step, trajectory) pairs of them (tests, tools).
"""
from __future__ import annotations

import math

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from common.checkpoint import torch_load
from common.errors import CheckpointError, UsageError
from common.files import atomic_torch_save


@dataclass(frozen=True)
class Trajectories:
    xs: torch.Tensor  # [S, N, C, H, W]: network input at each of the S sampler steps (in call order)
    ts: torch.Tensor  # [S]: the timestep of each step

    def take(self, step_idx: torch.Tensor, traj_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.xs[step_idx, traj_idx], self.ts[step_idx]


@dataclass(frozen=True)
class CalibSet:
    x: torch.Tensor  # [M, C, H, W]
    t: torch.Tensor  # [M]

    def batches(self, batch_size: int):
        for i in range(0, len(self.t), batch_size):
            yield self.x[i:i + batch_size], self.t[i:i + batch_size]

    def save(self, path: Path, **meta) -> None:
        """One atomic file: the samples and `meta` (e.g. the key of the settings that drew them), so data
        and its description can never disagree after a kill."""
        atomic_torch_save({"x": self.x, "t": self.t, "meta": meta}, path)

    @classmethod
    def load(cls, path: Path, what: str = "--cali_data_path") -> "CalibSet":
        d = torch_load(path, what)
        if not isinstance(d, dict) or not {"x", "t"} <= set(d):
            raise CheckpointError(f"{what} {path} is not a calibration set (calib.pt of a calibration run)")
        return cls(d["x"], d["t"])

    @staticmethod
    def meta(path: Path) -> dict:
        """What save() stored beside the samples ({} for a file written before it stored any)."""
        d = torch_load(path, "calibration set")
        return d.get("meta", {}) if isinstance(d, dict) else {}


@torch.no_grad()
def collect_trajectories(sample_fn: Callable, x_T: torch.Tensor) -> Trajectories:
    """Run `sample_fn(x_T, on_step=...)` once and keep every (x_t, t) the network sees."""
    xs, ts = [], []

    def on_step(x, t):
        xs.append(x.detach().cpu())
        ts.append(int(t[0]))

    sample_fn(x_T, on_step=on_step)
    return Trajectories(torch.stack(xs), torch.tensor(ts))


def trajectories_for(n: int, per_traj: int) -> int:
    """FP trajectories that `draw_over_steps` runs for n samples, per_traj from each."""
    if n < 1 or per_traj < 1:
        raise ValueError(f"need n >= 1 calibration samples and >= 1 per trajectory, got {n} and {per_traj}")
    return math.ceil(n / per_traj)


def plan_steps(n: int, n_steps: int, per_traj: int, generator: torch.Generator) -> list[torch.Tensor]:
    """For each of trajectories_for(n, per_traj) trajectories, the sorted sampler-call indices to keep:
    per_traj distinct steps drawn uniformly from [0, n_steps) (the last trajectory takes the remainder)."""
    if per_traj > n_steps:
        raise ValueError(f"--cali_per_traj {per_traj} exceeds the {n_steps} sampling steps of a trajectory")
    counts = [per_traj] * (n // per_traj) + ([n % per_traj] if n % per_traj else [])
    return [torch.randperm(n_steps, generator=generator)[:k].sort().values for k in counts]


class _Done(Exception):
    """Raised by on_step once a batch of trajectories has reached its last needed step."""


@torch.no_grad()
def draw_over_steps(sample_fn: Callable, x_T: torch.Tensor, n: int, n_steps: int, per_traj: int,
                    generator: torch.Generator, batch_size: int = 256) -> CalibSet:
    """DilateQuant's random sampling strategy over fresh FP trajectories (module docstring).

    sample_fn(x_T, on_step=...) runs the FP sampler (n_steps network calls); x_T [n_traj, ...] holds one
    initial noise per trajectory, n_traj = trajectories_for(n, per_traj). Trajectories are run in batches
    ordered by their last needed step, and each batch stops there: about half the cost of full
    trajectories for per_traj = 1. Returns the n samples in a random order.
    """
    plan = plan_steps(n, n_steps, per_traj, generator)
    if len(x_T) != len(plan):
        raise ValueError(f"x_T holds {len(x_T)} trajectories; {n} samples at {per_traj} per trajectory need {len(plan)}")
    order = sorted(range(len(plan)), key=lambda i: int(plan[i][-1]))
    groups = [order[lo:lo + batch_size] for lo in range(0, len(order), batch_size)]
    lasts = [max(int(plan[i][-1]) for i in rows) for rows in groups]
    xs, ts = [], []
    bar = tqdm(total=sum(last + 1 for last in lasts), unit="step", dynamic_ncols=True,
               desc=f"calibration data ({len(plan)} FP trajectories, {len(groups)} batches)")
    for rows, last in zip(groups, lasts):
        wanted = [plan[i] for i in rows]
        call = [0]

        def on_step(x, t):
            k = call[0]
            keep = [r for r, w in enumerate(wanted) if bool((w == k).any())]
            if keep:
                xs.append(x[keep].detach().cpu())
                ts.append(t[keep].detach().cpu())
            call[0] += 1
            bar.update(1)
            if k == last:
                raise _Done

        try:
            sample_fn(x_T[rows], on_step=on_step)
        except _Done:
            pass
    bar.close()
    x, t = torch.cat(xs), torch.cat(ts).long()
    perm = torch.randperm(len(t), generator=generator)
    return CalibSet(x[perm], t[perm])


def random_over_steps(tr: Trajectories, n: int, generator: torch.Generator) -> CalibSet:
    """n distinct (step, trajectory) pairs of collected trajectories, uniformly."""
    s, b = tr.xs.shape[:2]
    if n > s * b:
        raise ValueError(f"asked for {n} calibration samples but the trajectories hold only {s * b}; "
                         f"lower --cali_n or generate more trajectories")
    flat = torch.randperm(s * b, generator=generator)[:n]
    x, t = tr.take(flat // b, flat % b)
    return CalibSet(x, t)


def evenly_spaced_steps(tr: Trajectories, n_per_step: int, st: int, generator: torch.Generator) -> CalibSet:
    """Q-Diffusion's time-step-aware calibration: `st` evenly spaced steps, `n_per_step` samples each."""
    s, b = tr.xs.shape[:2]
    if not 1 <= st <= s or not 1 <= n_per_step <= b:
        raise UsageError(f"--cali_st {st} / --cali_n {n_per_step} out of range: use --cali_st 1..{s} (the sampling "
                         f"steps) and --cali_n 1..{b} (the trajectories)")
    steps = torch.linspace(0, s - 1, st).round().long()
    xs, ts = [], []
    for k in steps.tolist():
        traj = torch.randperm(b, generator=generator)[:n_per_step]
        x, t = tr.take(torch.full_like(traj, k), traj)
        xs.append(x)
        ts.append(t)
    return CalibSet(torch.cat(xs), torch.cat(ts))
