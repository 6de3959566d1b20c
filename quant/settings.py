"""Typed quantization settings, validated on construction (SPEC §1)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum


class Signedness(Enum):
    """Integer grid of a quantizer.

    ASYMMETRIC: [0, 2^b-1] with a learnable zero point (paper eq. 1-3, the default).
    SYMMETRIC:  [-2^(b-1), 2^(b-1)-1], zero point fixed at 0 (`--a_sym`).
    UNSIGNED:   [0, 2^b-1], zero point fixed at 0 (softmax outputs, which are >= 0).
    """
    ASYMMETRIC = "asymmetric"
    SYMMETRIC = "symmetric"
    UNSIGNED = "unsigned"


class RangeInit(Enum):
    """How a quantizer's range is initialised: min-max (no clipping), an Lp-error search, or (activations
    only) a running average of per-batch min/max (Q-Diffusion's `--running_stat`)."""
    MINMAX = "minmax"
    MSE = "mse"
    RUNNING = "running"


ALLOWED_BITS = frozenset(range(2, 9)) | {16}


def check_bits(bits: int, what: str, allow_16: bool = False) -> None:
    ok = bits in ALLOWED_BITS and (allow_16 or bits != 16)
    if not ok:
        allowed = "2..8" + (" or 16" if allow_16 else "")
        raise ValueError(f"{what}={bits} is out of range: use {allowed} bits")


@dataclass(frozen=True)
class QuantizerSpec:
    bits: int
    signedness: Signedness = Signedness.ASYMMETRIC
    init: RangeInit = RangeInit.MINMAX
    lp: float = 2.0  # exponent of the range-search error ||x - Q(x)||_p^p

    def __post_init__(self):
        check_bits(self.bits, "bits", allow_16=True)
        if self.lp <= 0:
            raise ValueError(f"lp must be > 0, got {self.lp}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signedness is Signedness.SYMMETRIC else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signedness is Signedness.SYMMETRIC else 2 ** self.bits - 1


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how, for one model.

    weight_bit / act_bit: bit widths of ordinary layers (act_bit None = weights only).
    sm_abit: bits of softmax outputs (the second attention matmul's probability operand).
    first_last_bit: the real input conv and output conv stay at this precision (common practice).
    temporal: Temporal Parallel Quantizer (one step size and zero point per sampling step) when True,
        one shared activation quantizer for all timesteps when False.
    split: Q-Diffusion split shortcut quantization (each half of a concatenated skip input gets its
        own activation quantizer).
    """
    weight_bit: int = 8
    act_bit: int | None = None
    a_sym: bool = False
    sm_abit: int | None = None
    first_last_bit: int = 8
    weight_init: RangeInit = RangeInit.MINMAX
    act_init: RangeInit = RangeInit.MSE
    temporal: bool = False
    split: bool = False
    lp: float = 2.0  # norm of the range search (Q-Diffusion/BRECQ: 2.4, `--cali_p`)

    def __post_init__(self):
        if self.weight_init is RangeInit.RUNNING:
            raise ValueError("running min/max is an activation range rule; weights use minmax or mse")
        check_bits(self.weight_bit, "weight_bit")
        if self.act_bit is not None:
            check_bits(self.act_bit, "act_bit")
        if self.sm_abit is not None:
            check_bits(self.sm_abit, "sm_abit", allow_16=True)
        check_bits(self.first_last_bit, "first_last_bit")

    @property
    def quant_act(self) -> bool:
        return self.act_bit is not None

    def weight_spec(self, edge: bool = False) -> QuantizerSpec:
        return QuantizerSpec(self.first_last_bit if edge else self.weight_bit, Signedness.ASYMMETRIC, self.weight_init,
                             self.lp)

    def act_spec(self, edge: bool = False) -> QuantizerSpec:
        sign = Signedness.SYMMETRIC if self.a_sym else Signedness.ASYMMETRIC
        return QuantizerSpec(self.first_last_bit if edge else self.act_bit, sign, self.act_init, self.lp)

    def softmax_spec(self) -> QuantizerSpec:
        return QuantizerSpec(self.sm_abit or self.act_bit, Signedness.UNSIGNED, self.act_init, self.lp)

    def to_dict(self) -> dict:
        return {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        d = dict(d)
        for k in ("weight_init", "act_init"):
            if k in d:
                d[k] = RangeInit(d[k])
        return cls(**d)
