"""Which TPQ slot each sample uses (SPEC §2).

The slot comes from the timestep value the network is called with, looked up in the schedule the
model was calibrated for; never from a call counter. `StepIndex.active(idx)` publishes the per-sample
slots for the duration of one forward and restores the previous state afterwards.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch


class UncalibratedTimestepError(ValueError):
    pass


class StepIndex:
    """Timestep values -> slot indices; shared (by reference) by all activation quantizers of a model."""

    def __init__(self, schedule: Sequence[int] | None):
        # One slot per distinct timestep (sorted): a sampler may visit a timestep at several steps (the
        # public DDIM `quad` schedule with 100 steps starts 0, 0, 0, 0, 1, ...); since the slot is looked
        # up from the timestep value, those steps share it.
        self.schedule = None if schedule is None else torch.unique(torch.as_tensor(list(schedule), dtype=torch.long))
        self._idx: torch.Tensor | None = None

    @property
    def num_slots(self) -> int:
        return 1 if self.schedule is None else len(self.schedule)

    def lookup(self, t: torch.Tensor) -> torch.Tensor:
        """[B] timestep values -> [B] slot indices; an uncalibrated timestep is an error."""
        t = t.reshape(-1).long()
        if self.schedule is None:
            return torch.zeros_like(t)
        sched = self.schedule.to(t.device)
        hit = t[:, None] == sched[None, :]                     # [B, T]
        missing = ~hit.any(dim=1)
        if missing.any():
            bad = sorted(set(t[missing].tolist()))[:5]
            raise UncalibratedTimestepError(
                f"timestep(s) {bad} were not calibrated (the model was calibrated for {len(sched)} steps: "
                f"{sched[:3].tolist()}...{sched[-3:].tolist()}); sample with the same --timesteps/--skip_type "
                f"or recalibrate")
        return hit.float().argmax(dim=1)

    @contextmanager
    def active(self, idx: torch.Tensor) -> Iterator[None]:
        prev, self._idx = self._idx, idx
        try:
            yield
        finally:
            self._idx = prev

    def current(self) -> torch.Tensor:
        if self._idx is None:
            raise RuntimeError("a temporal quantizer ran outside a timestep context: call the QuantModel "
                               "(or wrap the call in `model.steps.active(idx)`)")
        return self._idx
