"""Command-line helpers shared by the tools and studies."""
from __future__ import annotations

from common.errors import UsageError


WEIGHT_BITS = frozenset(range(2, 9)) | {32}            # 32: full precision
ACT_BITS = frozenset(range(2, 9)) | {16, 32}


def parse_bits(text: str) -> tuple[int, int]:
    """'W/A' (e.g. '4/4', '32/32' for FP) -> (weight bits, activation bits); a one-line error otherwise."""
    w, sep, a = text.partition("/")
    if not (sep and w.isdigit() and a.isdigit()):
        raise UsageError(f"bit widths {text!r}: give W/A, e.g. 4/4 or 6/6")
    if int(w) not in WEIGHT_BITS or int(a) not in ACT_BITS:
        raise UsageError(f"bit widths {text!r} are out of range: weights 2..8 (or 32 = FP), activations 2..8, 16 "
                         f"(or 32 = FP)")
    return int(w), int(a)
