"""Which TPQ slot each sample uses (SPEC §2).

A *slot* is one set of activation-quantizer parameters (Δ_t, z_t) of the Temporal Parallel Quantizer. The
slot comes from the timestep value the network is called with, looked up in the schedule the model was
calibrated for; never from a call counter. `SlotIndex.active(idx)` publishes the per-sample slots for the
duration of one forward and restores the previous state afterwards.

The lookup runs once per model call and never reads a device tensor on the host: on the CPU an
uncalibrated or non-integer timestep raises `UncalibratedTimestepError` at once; on an accelerator (and
under torch.compile) the same check is an asynchronous device assertion. Pipelines call `check_timesteps`
with the sampler's whole schedule before sampling, so a mismatch is reported before any work.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from common.errors import RunError


class UncalibratedTimestepError(RunError, ValueError):
    """A timestep the quantized model has no TPQ slot for (or a non-integer one)."""


def _describe(sched: torch.Tensor) -> str:
    return f"{len(sched)} timesteps: {sched[:3].tolist()}...{sched[-3:].tolist()}"


class SlotIndex:
    """Timestep values -> slot indices; shared (by reference) by all activation quantizers of a model."""

    def __init__(self, schedule: Sequence[int] | None):
        # One slot per distinct timestep (sorted): a sampler may visit a timestep at several steps (the
        # public DDIM `quad` schedule with 100 steps starts 0, 0, 0, 0, 1, ...); since the slot is looked
        # up from the timestep value, those steps share it.
        self.schedule = None if schedule is None else torch.unique(torch.as_tensor(list(schedule), dtype=torch.long))
        self._on_device: dict[torch.device, torch.Tensor] = {}
        self._idx: torch.Tensor | None = None

    @property
    def num_slots(self) -> int:
        return 1 if self.schedule is None else len(self.schedule)

    def _schedule_on(self, device: torch.device) -> torch.Tensor:
        """The schedule on `device`, copied there once (not per call)."""
        if device not in self._on_device:
            self._on_device[device] = self.schedule.to(device)
        return self._on_device[device]

    def check_timesteps(self, timesteps: Sequence[int]) -> None:
        """Raise (one line) unless every timestep a sampler will visit has a slot; call before sampling."""
        if self.schedule is None:
            return
        missing = sorted(set(int(t) for t in timesteps) - set(self.schedule.tolist()))
        if missing:
            raise UncalibratedTimestepError(
                f"the sampler visits timestep(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} that the model "
                f"was not calibrated for (it was calibrated for {_describe(self.schedule)}); sample with the same "
                f"steps and schedule (--timesteps/--skip_type, -c) or recalibrate")

    def lookup(self, t: torch.Tensor) -> torch.Tensor:
        """[B] timestep values -> [B] slot indices (long). A timestep outside the schedule, or a non-integer
        one, is an error, never a silent truncation or a wrong slot."""
        t = t.reshape(-1)
        host_check = t.device.type == "cpu" and not torch.compiler.is_compiling()
        if t.is_floating_point():
            whole = t == t.round()
            if not host_check:
                torch._assert_async(whole.all(), "non-integer timestep given to a quantized model")
            elif not bool(whole.all()):
                raise UncalibratedTimestepError(f"non-integer timestep(s) {t[~whole][:5].tolist()}: the quantized "
                                                f"model is calibrated for integer timesteps")
        t = t.long()
        if self.schedule is None:
            return torch.zeros_like(t)
        sched = self._schedule_on(t.device)
        hit = t[:, None] == sched[None, :]                     # [B, T]
        found = hit.any(dim=1)
        if not host_check:
            torch._assert_async(found.all(), "a timestep the quantized model was not calibrated for")
        elif not bool(found.all()):
            bad = sorted(set(t[~found].tolist()))[:5]
            raise UncalibratedTimestepError(
                f"timestep(s) {bad} were not calibrated (the model was calibrated for {_describe(sched)}); "
                f"sample with the same --timesteps/--skip_type or recalibrate")
        return hit.to(torch.uint8).argmax(dim=1)

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
                               "(or wrap the call in `model.slots.active(idx)`)")
        return self._idx
