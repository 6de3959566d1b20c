"""Where a run executes, and its seeds."""
from __future__ import annotations

import ctypes
import random

import numpy as np
import torch

from common.errors import UsageError


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_device(name: str | None) -> None:
    """One UsageError line unless `name` (--device) is a device this machine has (None: the default, always)."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name} is not a device name", "use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {name}: no CUDA GPU is visible here", "drop --device to run on the CPU")
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {name}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError):
            raise UsageError(f"--device {name} is not available here", "use cpu or cuda") from None


def pick_device(name: str | None = None) -> torch.device:
    """`name` if given, else CUDA when available, else CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def release_free_memory() -> None:
    """Hand the memory the C allocator holds but no tensor uses back to the system (glibc's malloc_trim(0); a
    no-op elsewhere). Between distillation units the freed caches and optimizer states of the last unit would
    otherwise stay resident, fragmented, and add to the process's peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
