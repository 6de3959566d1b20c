"""Small helpers shared by the command-line tools."""
from __future__ import annotations

import random

import numpy as np
import torch


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def parse_bits(text: str) -> tuple[int, int]:
    """'W/A' (e.g. '4/4') -> (weight bits, activation bits); a one-line error otherwise."""
    w, sep, a = text.partition("/")
    if not (sep and w.isdigit() and a.isdigit()):
        raise SystemExit(f"bit widths {text!r}: give W/A, e.g. 4/4 or 6/6")
    return int(w), int(a)


def pick_device(name: str | None = None) -> torch.device:
    """`name` if given, else CUDA when available, else CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
