"""Packed integer checkpoints: an IntModel as one safetensors file.

The file holds the diffusion network only (an LDM's first stage and conditioner stay with the original
checkpoint) and its header (safetensors metadata, key `dilatequant`) says what it is: format, method, bits, the
QuantConfig and TPQ schedule, the network to build (`network`, interpreted by the caller's builder), the code
that made it (`provenance`), and each integer module's static spec. Tensors are the IntModel's state: weight codes
as uint8 (two per byte at <= 4 bits: `<layer>.codes` then holds the packed bytes), Δ_w and zero points per
out-channel, biases and dilation scales in float32, Δ_x and z_x per slot, and the floating-point parameters of
what stays FP (norms, embeddings, the layers listed as simulated). Loading builds the network, wraps it as
QuantModel wraps it (no calibration runs) and swaps in the integer modules.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from common.checkpoint import check_finite
from common.errors import CheckpointError
from common.files import atomic_write
from quant.checkpoint import install_optional_tensors
from quant.deploy.codes import pack_int4, unpack_int4
from quant.deploy.layers import IntLayer, IntMatMul, WeightOnlyLayer
from quant.deploy.model import IntModel
from quant.model import QuantModel, _set_submodule
from quant.settings import QuantConfig

FORMAT = "dilatequant-int-v1"
KINDS = {"IntLayer": IntLayer, "WeightOnlyLayer": WeightOnlyLayer, "IntMatMul": IntMatMul}
MAGIC_KEY = "dilatequant"


def is_int_file(path: str | Path) -> bool:
    """Whether `path` is a safetensors file (what save_int writes) rather than a torch checkpoint."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and int.from_bytes(head[:8], "little") < 1 << 30 and head[8:9] == b"{"


def save_int(path: str | Path, model: IntModel, header: dict) -> Path:
    """Write `model` with `header` (method, network, provenance...; the format, config, schedule, bits and the
    modules' specs are added here), atomically. The same model and header give the same bytes."""
    from safetensors.torch import save_file
    modules = {name: {"type": type(m).__name__, "spec": m.spec} for name, m in model.int_modules()}
    tensors = {}
    for key, value in model.state_dict().items():
        layer, _, leaf = key.removeprefix("model.").rpartition(".")
        if leaf == "codes" and modules.get(layer, {}).get("spec", {}).get("w_bits", 8) <= 4:
            value = pack_int4(value)
        tensors[key] = value.detach().cpu().contiguous()
    cfg = model.config
    full = {"format": FORMAT, **header, "config": cfg.to_dict(), "schedule": model.schedule.tolist(),
            "bits": {"weight": cfg.weight_bit, "act": cfg.act_bit, "first_last": cfg.first_last_bit},
            "modules": modules, "simulated": model.simulated}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={MAGIC_KEY: json.dumps(full)}))


def read_header(path: str | Path, what: str = "--cali_ckpt") -> dict:
    """The header of a packed integer file; one CheckpointError line for anything else."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:                                       # noqa: BLE001 (safetensors raises its own types)
        raise CheckpointError(f"{what} {path} is not a readable safetensors file ({e})") from None
    header = json.loads(meta.get(MAGIC_KEY, "{}"))
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{what} {path} is not a packed integer model of this repo (format {FORMAT})",
                              "export one with tools/export_int.py --cali_ckpt quantized.pt --out FILE")
    return header


def load_int(path: str | Path, build_network: Callable[[dict], nn.Module], device: torch.device | str = "cpu",
             compiled: bool = True, generic: bool = False, what: str = "--cali_ckpt") -> tuple[IntModel, dict]:
    """(IntModel on `device`, prepared; header) from a file of save_int. build_network(header["network"]) makes
    the FP network (its weights are replaced by the file's)."""
    from safetensors.torch import load_file
    header = read_header(path, what)
    tensors = load_file(str(path))
    check_finite(tensors, f"{what} {path}")
    config = QuantConfig.from_dict(header["config"])
    qmodel = QuantModel(build_network(header["network"]), config, header["schedule"] or None)
    install_optional_tensors(qmodel, tensors)
    network = qmodel.model
    for name, entry in header["modules"].items():
        cls, spec = KINDS[entry["type"]], entry["spec"]
        module = cls(spec, qmodel.slots) if cls is not WeightOnlyLayer else cls(spec)
        if spec.get("w_bits", 8) <= 4 and f"model.{name}.codes" in tensors:
            tensors[f"model.{name}.codes"] = unpack_int4(tensors[f"model.{name}.codes"], tuple(spec["weight_shape"]))
        _set_submodule(network, name, module)
    model = IntModel(network, config, header["schedule"], header.get("simulated"))
    if "eps_bias" in tensors:
        model.set_eps_bias(tensors["eps_bias_t"], tensors["eps_bias"])
    if "eps_gain" in tensors:
        model.set_eps_gain(tensors["eps_gain_t"], tensors["eps_gain"])
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{what} {path} does not match its network: missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}", "was it exported from this repo's code for this model?")
    return model.to(device).prepare(compiled, generic), header
