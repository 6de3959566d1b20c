"""The integer model: `convert(qmodel)` swaps every convertible simulated layer for its integer form.

`IntModel(x, t, **cond)` is called like the FP network and the QuantModel it came from. The TPQ slot comes from
the timestep the call carries, as in the simulation (quant/slots.py), and the integer kernels take one Δ_x per
call: a batch must share one timestep (at sampling time the whole batch, both guidance halves included, does). A
mixed-timestep batch is refused in one line (on the CPU at once; on an accelerator as an asynchronous device
assertion, so nothing is read on the host).

What cannot run as integers stays simulated, listed in `simulated` with the reason: layers with a shifted input
(the OS+-like scaling of Table 9), operands above 8 bits (a 16-bit softmax), and layers that quantize only
their weights (they compute in floating point with the dequantized weight).
"""
from __future__ import annotations

import copy
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from common.errors import UsageError
from common.nn import MatMul
from quant.deploy.kernels import onednn_available
from quant.deploy.layers import IntLayer, IntMatMul, WeightOnlyLayer
from quant.layers import QuantLayer, QuantMatMul
from quant.model import EpsCorrections, QuantModel, _set_submodule
from quant.quantizer import ActQuantizer
from quant.settings import QuantConfig
from quant.slots import SlotIndex

INT_MODULES = (IntLayer, IntMatMul, WeightOnlyLayer)


class MixedTimestepsError(UsageError):
    """A batch of several timesteps given to the integer model (one Δ_x per call)."""


class IntModel(EpsCorrections):
    """eps = int_model(x, t, **cond): the converted network, one TPQ slot per call.

    `simulated` lists {name, kind, reason} of every layer that stays simulated; `config` and `schedule` are
    those of the QuantModel it came from."""

    def __init__(self, network: nn.Module, config: QuantConfig, schedule: Sequence[int],
                 simulated: list[dict] | None = None):
        super().__init__()
        self.config = config
        self.model = network
        self.slots = SlotIndex(list(schedule) if config.temporal else None)
        self.register_buffer("schedule", torch.as_tensor(list(schedule or []), dtype=torch.long))
        self._init_corrections()
        self.simulated = list(simulated or [])
        self.unquantized: list[str] = []                        # weight layers with no quantized form (QuantModel)
        self.kernels = ""                                       # which integer kernels run (set by prepare)
        self.channels_last = False
        self._norm_hooks: list = []
        for module in self.model.modules():                     # every slot lookup goes through this model's index
            if isinstance(module, (ActQuantizer, IntLayer, IntMatMul)):
                module.slots = self.slots

    @property
    def like(self) -> dict:
        ref = next(self.model.parameters(), None)
        ref = ref if ref is not None else self.schedule.float()
        return dict(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else torch.float32)

    def int_modules(self) -> Iterator[tuple[str, nn.Module]]:
        return ((n, m) for n, m in self.model.named_modules() if isinstance(m, INT_MODULES))

    def prepare(self, compiled: bool = True, generic: bool = False) -> "IntModel":
        """Build the kernels' forms of the weights on the model's device (after converting, loading or moving it).
        compiled: the activation quantize step through torch.compile (one fused pass; the codes are the same);
        generic: torch._int_mm for convolutions and linear layers on the CPU too (oneDNN otherwise)."""
        device = self.like["device"]
        generic = generic or not onednn_available(device)
        self.kernels = ("torch._int_mm (int8 x int8 -> int32) for every product" if generic else
                        "oneDNN uint8 x int8 -> int32 convolution and linear (torch.ops.onednn), torch._int_mm "
                        "for the attention matmuls")
        if device.type == "meta":                                # shapes only: no kernel forms to build
            return self
        for _, module in self.int_modules():
            module.prepare(compiled, generic)
        split = [n for n, m in self.int_modules() if any(g.split_codes for g in getattr(m, "gemms", ()))]
        if split:
            self.kernels += (f"; {len(split)} layers with 8-bit products, which oneDNN on this CPU (no VNNI) would "
                             f"saturate in int16, multiply their codes in two exact 4-bit halves: {', '.join(split)}")
        # oneDNN's convolutions write channels-last and the network runs in that layout (converting back after every
        # convolution costs more than it saves), except inside a GroupNorm of <= 2 channels per group, where torch's
        # channels-last kernel is slow: that norm computes on a contiguous copy and hands its output back
        # channels-last (measured: tools/bench_groupnorm.py, docs/deploy.md)
        self.channels_last = not generic
        for handle in self._norm_hooks:
            handle.remove()
        narrow = [m for m in self.model.modules() if isinstance(m, nn.GroupNorm)
                  and m.num_channels // m.num_groups <= NARROW_GROUP] if self.channels_last else []
        self._norm_hooks = [h for m in narrow for h in (m.register_forward_pre_hook(_contiguous_input),
                                                        m.register_forward_hook(_channels_last_output))]
        with torch.no_grad():
            for module in self.model.modules():                  # simulated layers: weights quantized once
                if isinstance(module, QuantLayer):
                    module.frozen_weight = module.op_weight().detach()
        return self

    def check_timesteps(self, timesteps: Sequence[int]) -> None:
        self.slots.check_timesteps(timesteps)
        self.check_corrections(timesteps)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int | float, **cond) -> torch.Tensor:
        t = QuantModel.batch_timesteps(x, t)
        idx = self.slots.lookup(t)
        one = idx == idx[0]
        if idx.device.type != "cpu" or torch.compiler.is_compiling():
            torch._assert_async(one.all(), "the integer model computes one timestep per call")
        elif not bool(one.all()):
            raise MixedTimestepsError(f"the integer model computes one timestep per call; this batch mixes "
                                      f"{sorted(set(t.tolist()))[:5]}", "call it once per timestep, or use the "
                                      "simulated model (--backend fake) for mixed-timestep batches")
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), self.slots.active(idx):
            return self.corrected(self.model(x, t, **cond), t).contiguous()


NARROW_GROUP = 2           # channels per group up to which GroupNorm runs on a contiguous copy (IntModel.prepare)


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def _channels_last_output(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out.contiguous(memory_format=torch.channels_last) if out.dim() == 4 else out


def _why_simulated(layer: QuantLayer) -> str | None:
    if layer.in_shift is not None:
        return "its input is shifted (OS+-like scaling): the shift's weight term differs at zero-padded borders"
    wide = [q.spec.bits for q in layer.a_quant if q.spec.bits > 8] + [layer.w_quant.spec.bits] * \
        (layer.w_quant.spec.bits > 8)
    return f"{max(wide)}-bit operands have no int8 kernel" if wide else None


def convert(qmodel: QuantModel, compiled: bool = True, generic: bool = False) -> IntModel:
    """The integer form of a calibrated QuantModel, on its device (prepared; see IntModel.prepare)."""
    network = copy.deepcopy(qmodel.model)
    simulated = []
    for name, module in list(network.named_modules()):
        if isinstance(module, QuantLayer):
            reason = _why_simulated(module)
            if reason is None and module.quant_act and len(module.a_quant):
                _set_submodule(network, name, IntLayer.of(module, qmodel.slots))
            elif reason is None:
                _set_submodule(network, name, WeightOnlyLayer.of(module))
                simulated.append({"name": name, "kind": "weight-only", "reason": "activations are not quantized: "
                                  "computed in floating point with the dequantized weight"})
            else:
                simulated.append({"name": name, "kind": "simulated", "reason": reason})
        elif isinstance(module, QuantMatMul) and module.quant_act:
            wide = [q.spec.bits for q in module.a_quant if q.spec.bits > 8]
            if module.op is not None and not isinstance(module.op, MatMul):
                simulated.append({"name": name, "kind": "simulated", "reason": f"its op {type(module.op).__name__} "
                                  f"is not common.nn.MatMul (the integer product computes a plain bmm)"})
            elif wide:
                simulated.append({"name": name, "kind": "simulated", "reason": f"{max(wide)}-bit operand (softmax "
                                  f"at --sm_abit {max(wide)}) has no int8 kernel"})
            else:
                _set_submodule(network, name, IntMatMul.of(module, qmodel.slots))
    schedule = [] if qmodel.slots.schedule is None else qmodel.slots.schedule.tolist()     # the TPQ slots' timesteps
    int_model = IntModel(network, qmodel.config, schedule, simulated)
    int_model.unquantized = list(qmodel.unquantized)
    int_model.copy_corrections(qmodel)
    return int_model.to(qmodel.like["device"]).prepare(compiled, generic)
