"""Calibration data from the FP model's own sampling trajectories (data-free; SPEC §4, §5).

`collect_trajectories` runs the sampler once and keeps every network input (x_t, t). Two ways to draw a
calibration set from it:
- `random_over_steps` (DilateQuant): n samples drawn uniformly over all (step, trajectory) pairs;
- `evenly_spaced_steps` (Q-Diffusion `--cali_st/--cali_n`): n samples from each of `st` evenly spaced steps.
"""
from __future__ import annotations

import math

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


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

    def save(self, path: Path) -> None:
        torch.save({"x": self.x, "t": self.t}, path)

    @classmethod
    def load(cls, path: Path) -> "CalibSet":
        d = torch.load(path, map_location="cpu", weights_only=True)
        return cls(d["x"], d["t"])


@torch.no_grad()
def collect_trajectories(sample_fn: Callable, x_T: torch.Tensor) -> Trajectories:
    """Run `sample_fn(x_T, on_step=...)` once and keep every (x_t, t) the network sees."""
    xs, ts = [], []

    def on_step(x, t):
        xs.append(x.detach().cpu())
        ts.append(int(t[0]))

    sample_fn(x_T, on_step=on_step)
    return Trajectories(torch.stack(xs), torch.tensor(ts))


def trajectories_for(n: int, steps: int) -> int:
    """FP trajectories to run for `n` samples drawn at random over `steps` steps: twice the samples
    needed (so draws rarely share a trajectory and step), at least 16."""
    return max(16, math.ceil(2 * n / steps))


def random_over_steps(tr: Trajectories, n: int, generator: torch.Generator) -> CalibSet:
    """DilateQuant's random sampling strategy: n distinct (step, trajectory) pairs, uniformly."""
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
        raise ValueError(f"--cali_st must be in [1, {s}] and --cali_n in [1, {b}] for these trajectories")
    steps = torch.linspace(0, s - 1, st).round().long()
    xs, ts = [], []
    for k in steps.tolist():
        traj = torch.randperm(b, generator=generator)[:n_per_step]
        x, t = tr.take(torch.full_like(traj, k), traj)
        xs.append(x)
        ts.append(t)
    return CalibSet(torch.cat(xs), torch.cat(ts))
