"""Command-line helpers shared by the tools and studies."""
from __future__ import annotations

from common.errors import UsageError


def parse_bits(text: str) -> tuple[int, int]:
    """'W/A' (e.g. '4/4') -> (weight bits, activation bits); a one-line error otherwise."""
    w, sep, a = text.partition("/")
    if not (sep and w.isdigit() and a.isdigit()):
        raise UsageError(f"bit widths {text!r}: give W/A, e.g. 4/4 or 6/6")
    return int(w), int(a)
