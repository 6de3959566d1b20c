"""A quantization method defined outside the package, as a user would write one (tests/test_methods.py runs it
through the DDIM sampling script with --method_plugin): activation ranges from the calibration set's min and
max, one per timestep unless --no-minmax_per_timestep, and no training."""
from dataclasses import dataclass, replace
from typing import ClassVar

from quant.calibrate import calibrate
from quant.methods import CalibrationDraw, Flag, identity_fields, register_method
from quant.model import QuantModel
from quant.settings import RangeInit


@dataclass(frozen=True)
class MinMaxConfig:
    """Min-max ranges per timestep: the calibration set's extremes, no search and no training."""
    name: ClassVar[str] = "minmax"
    calibration: ClassVar[CalibrationDraw] = CalibrationDraw.RANDOM_STEPS
    flags: ClassVar[tuple] = (Flag("--minmax_per_timestep", True, "one range per timestep (TPQ's slots)",
                                   kind="toggle"),)
    per_timestep: bool = True

    @property
    def temporal(self) -> bool:
        return self.per_timestep

    def needs_data(self, quant) -> bool:
        return quant.quant_act

    def identity(self) -> dict:
        return identity_fields(self)

    def label(self) -> str:
        return self.name + ("" if self.per_timestep else "[shared]")

    @classmethod
    def from_flags(cls, values, seed):
        return cls(per_timestep=values["minmax_per_timestep"])


def quantize_minmax(fp, quant, method: MinMaxConfig, ctx) -> QuantModel:
    config = replace(quant, temporal=method.per_timestep, act_init=RangeInit.MINMAX)
    qmodel = QuantModel(fp, config, ctx.schedule if method.per_timestep else None)
    return calibrate(qmodel, ctx.calib, batch_size=ctx.batch_size, seed=ctx.seed)


register_method(MinMaxConfig, quantize_minmax)
