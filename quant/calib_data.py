"""Calibration data from the FP model's own sampling trajectories (data-free; SPEC §4, §5).

- `draw_over_steps` (DilateQuant's random sampling strategy, and the baseline PTQ): n samples at steps drawn
  uniformly at random, `per_traj` of them (distinct steps) from each FP trajectory, so n samples come from
  ceil(n / per_traj) trajectories. Each trajectory runs only until its last chosen step and only the chosen
  inputs are kept. How many trajectories matters: distillation trains weights, and calibration sets drawn
  from a few trajectories (a few images) are overfitted (see README, "Calibration data").
- `collect_trajectories` keeps every network input (x_t, t) of a set of trajectories;
  `evenly_spaced_steps` (Q-Diffusion `--cali_st/--cali_n`) takes n samples from each of `st` evenly spaced
  steps of them; `random_over_steps` takes n distinct (step, trajectory) pairs of them (tests, tools).

A sample is one network input: x_t, t and the conditioning keyword arguments of that call (`cond`, e.g.
{"context": [L, D]} for a cross-attention UNet; empty for an unconditional one). Under classifier-free
guidance the network sees cat([uncond, cond]) in one batch (`halves` = 2): both halves of a chosen step are
kept, as the field calibrates guided models.
"""
from __future__ import annotations

import math

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from common.checkpoint import nonfinite_keys, require_finite, torch_load
from common.errors import CheckpointError, NonFiniteError, UsageError
from common.files import atomic_torch_save


Cond = dict[str, torch.Tensor]


def _rows(cond: Cond, idx) -> Cond:
    return {k: v[idx] for k, v in cond.items()}


def to_device(cond: Cond, device: torch.device) -> Cond:
    return {k: v.to(device) for k, v in cond.items()}


def _net_kwargs(cond: Cond | None) -> Cond:
    """The tensors among a network call's keyword arguments (None values are dropped)."""
    return {k: v.detach().cpu() for k, v in (cond or {}).items() if v is not None}


@dataclass(frozen=True)
class Trajectories:
    xs: torch.Tensor  # [S, M, C, H, W]: network input at each of the S network calls (in call order)
    ts: torch.Tensor  # [S]: the timestep of each call
    cond: Cond = field(default_factory=dict)   # name -> [S, M, ...]: the calls' conditioning

    def take(self, step_idx: torch.Tensor, traj_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Cond]:
        return self.xs[step_idx, traj_idx], self.ts[step_idx], {k: v[step_idx, traj_idx] for k, v in self.cond.items()}


@dataclass(frozen=True)
class CalibSet:
    x: torch.Tensor  # [M, C, H, W]
    t: torch.Tensor  # [M]
    cond: Cond = field(default_factory=dict)   # name -> [M, ...]: conditioning kwargs of each sample's call

    def __post_init__(self):
        if len(self.x) != len(self.t) or any(len(v) != len(self.t) for v in self.cond.values()):
            raise ValueError("a calibration set needs one t (and one of each conditioning tensor) per sample")

    def tensors(self) -> dict[str, torch.Tensor]:
        """x, t and each conditioning tensor, by name."""
        return {"x": self.x, "t": self.t} | {f"cond.{k}": v for k, v in self.cond.items()}

    def batches(self, batch_size: int, device: torch.device | None = None):
        """(x, t, cond) in chunks of batch_size, moved to `device` if given; call the network as
        model(x, t, **cond)."""
        for i in range(0, len(self.t), batch_size):
            x, t, cond = self.x[i:i + batch_size], self.t[i:i + batch_size], _rows(self.cond, slice(i, i + batch_size))
            yield (x, t, cond) if device is None else (x.to(device), t.to(device), to_device(cond, device))

    def subset(self, idx: torch.Tensor) -> "CalibSet":
        return CalibSet(self.x[idx], self.t[idx], _rows(self.cond, idx))

    def save(self, path: Path, **meta) -> None:
        """One atomic file: the samples and `meta` (e.g. the key of the settings that drew them), so data
        and its description can never disagree after a kill. A set with NaN/inf values is refused (the FP
        trajectories it came from diverged) and nothing is written."""
        require_finite(self.tensors(), f"the calibration set ({path})", "the FP model's trajectories diverged: check "
                       "the checkpoint and the sampling flags (--scale, --eta)")
        atomic_torch_save({"x": self.x, "t": self.t, "cond": self.cond, "meta": meta}, path)

    @classmethod
    def load(cls, path: Path, what: str = "--cali_data_path") -> "CalibSet":
        return cls.read(path, what)[0]

    @classmethod
    def read(cls, path: Path, what: str = "--cali_data_path") -> tuple["CalibSet", dict]:
        """(the set, what save() stored beside it: {} for a file written before it stored any), checked: a
        calibration set of finite values, else one line naming `what` (the flag) and the file."""
        d = torch_load(path, what)
        if not isinstance(d, dict) or not {"x", "t"} <= set(d) or not all(torch.is_tensor(d[k]) for k in ("x", "t")):
            raise CheckpointError(f"{what} {path} is not a calibration set (calib.pt of a calibration run)")
        try:
            calib = cls(d["x"], d["t"], d.get("cond", {}))
        except ValueError as e:
            raise CheckpointError(f"{what} {path} is not a calibration set: {e}") from None
        bad = nonfinite_keys(calib.tensors())
        if bad:
            raise NonFiniteError(f"{what} {path} holds NaN/inf values in {', '.join(bad)}",
                                 "it is damaged, or was drawn from a diverging model: draw a new one")
        return calib, d.get("meta", {})

    @staticmethod
    def meta(path: Path) -> dict:
        """What save() stored beside the samples ({} for a file written before it stored any)."""
        d = torch_load(path, "calibration set")
        return d.get("meta", {}) if isinstance(d, dict) else {}


@torch.no_grad()
def collect_trajectories(sample_fn: Callable, x_T: torch.Tensor) -> Trajectories:
    """Run `sample_fn(x_T, on_step=...)` once and keep every (x_t, t, cond) the network sees."""
    xs, ts, conds = [], [], []

    def on_step(x, t, cond=None):
        xs.append(x.detach().cpu())
        ts.append(int(torch.as_tensor(t).reshape(-1)[0]))
        conds.append(_net_kwargs(cond))

    sample_fn(x_T, on_step=on_step)
    cond = {k: torch.stack([c[k] for c in conds]) for k in conds[0]} if conds else {}
    return Trajectories(torch.stack(xs), torch.tensor(ts), cond)


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
                    generator: torch.Generator, batch_size: int = 256, halves: int = 1) -> CalibSet:
    """DilateQuant's random sampling strategy over fresh FP trajectories (module docstring).

    sample_fn(x_T[rows], on_step=..., rows=rows) runs the FP sampler (n_steps network calls) on trajectories
    `rows` (indices into x_T, e.g. to pick their class labels); x_T [n_traj, ...] holds one initial noise per
    trajectory, n_traj = trajectories_for(n, per_traj). Trajectories are run in batches
    ordered by their last needed step, and each batch stops there: about half the cost of full
    trajectories for per_traj = 1. Returns the n samples in a random order.

    halves: network rows per trajectory and call (2 under classifier-free guidance: the network batch is
    cat([uncond rows, cond rows]) and both are kept), so n samples take ceil(n / halves) (trajectory, step)
    pairs; on_step(x, t, cond) then sees halves x the trajectories' batch.
    """
    pairs = math.ceil(n / halves)
    plan = plan_steps(pairs, n_steps, per_traj, generator)
    if len(x_T) != len(plan):
        raise ValueError(f"x_T holds {len(x_T)} trajectories; {pairs} steps at {per_traj} per trajectory need "
                         f"{len(plan)}")
    order = sorted(range(len(plan)), key=lambda i: int(plan[i][-1]))
    groups = [order[lo:lo + batch_size] for lo in range(0, len(order), batch_size)]
    lasts = [max(int(plan[i][-1]) for i in rows) for rows in groups]
    xs, ts, conds = [], [], []
    bar = tqdm(total=sum(last + 1 for last in lasts), unit="step", dynamic_ncols=True,
               desc=f"calibration data ({len(plan)} FP trajectories, {len(groups)} batches)")
    for rows, last in zip(groups, lasts):
        wanted = [plan[i] for i in rows]
        call = [0]

        def on_step(x, t, cond=None):
            k = call[0]
            t = torch.as_tensor(t, device=x.device)
            t = t.expand(len(x)) if t.dim() == 0 else t        # one timestep for the batch (diffusers samplers)
            keep = [r + h * len(rows) for h in range(halves) for r, w in enumerate(wanted) if bool((w == k).any())]
            if keep:
                xs.append(x[keep].detach().cpu())
                ts.append(t[keep].detach().cpu())
                conds.append(_rows(_net_kwargs(cond), keep))
            call[0] += 1
            bar.update(1)
            if k == last:
                raise _Done

        try:
            sample_fn(x_T[rows], on_step=on_step, rows=rows)
        except _Done:
            pass
    bar.close()
    x, t = torch.cat(xs), torch.cat(ts).long()
    cond = {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
    perm = torch.randperm(len(t), generator=generator)[:n]
    return CalibSet(x, t, cond).subset(perm)


def random_over_steps(tr: Trajectories, n: int, generator: torch.Generator) -> CalibSet:
    """n distinct (step, trajectory) pairs of collected trajectories, uniformly."""
    s, b = tr.xs.shape[:2]
    if n > s * b:
        raise ValueError(f"asked for {n} calibration samples but the trajectories hold only {s * b}; "
                         f"lower --cali_n or generate more trajectories")
    flat = torch.randperm(s * b, generator=generator)[:n]
    return CalibSet(*tr.take(flat // b, flat % b))


def evenly_spaced_steps(tr: Trajectories, n_per_step: int, st: int, generator: torch.Generator) -> CalibSet:
    """Q-Diffusion's time-step-aware calibration: `st` evenly spaced steps, `n_per_step` samples each."""
    s, b = tr.xs.shape[:2]
    if not 1 <= st <= s or not 1 <= n_per_step <= b:
        raise UsageError(f"--cali_st {st} / --cali_n {n_per_step} out of range: use --cali_st 1..{s} (the sampling "
                         f"steps) and --cali_n 1..{b} (the trajectories)")
    steps = torch.linspace(0, s - 1, st).round().long()
    parts = []
    for k in steps.tolist():
        traj = torch.randperm(b, generator=generator)[:n_per_step]
        parts.append(CalibSet(*tr.take(torch.full_like(traj, k), traj)))
    return CalibSet(torch.cat([p.x for p in parts]), torch.cat([p.t for p in parts]),
                    {k: torch.cat([p.cond[k] for p in parts]) for k in parts[0].cond})
