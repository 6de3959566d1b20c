"""Save / load calibrated quantized models (`--cali_ckpt`), with no dummy forward on load."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from common.checkpoint import check_finite, load_strict, require_finite, state_dict_mismatch, torch_load
from common.errors import CheckpointError
from common.files import atomic_torch_save
from quant.model import QuantModel
from quant.settings import QuantConfig

FORMAT = "dilatequant-quantized-v1"
NONFINITE_HINT = ("check the calibration set (--cali_data_path) and the sampling flags it was drawn with (--scale, "
                  "--eta); if distillation diverged, lower --lr_weight / --lr_quant")


def save_quantized(path: str | Path, qmodel: QuantModel, method: str, **meta) -> None:
    """Write the checkpoint atomically: its settings (config, TPQ schedule, method, meta) and state. A model with
    a NaN/inf tensor is refused (NonFiniteError) and nothing is written."""
    state = {k: v.cpu() for k, v in qmodel.state_dict().items()}
    require_finite(state, f"the quantized model ({path})", NONFINITE_HINT)
    payload = {"format": FORMAT, "method": method, "config": qmodel.config.to_dict(),
               "schedule": qmodel.schedule.tolist(), "meta": meta, "state_dict": state}
    atomic_torch_save(payload, path)


def read_quantized(path: str | Path, what: str = "--cali_ckpt") -> dict:
    """The saved payload (format, method, config, schedule, meta, state_dict) of a quantized checkpoint."""
    payload = torch_load(path, what)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{what} {path} is not a quantized checkpoint of this repo (format {FORMAT}); "
                              f"pass the quantized.pt of a calibration run")
    return payload


def install_optional_tensors(qmodel: QuantModel, state: dict) -> None:
    """Create the optional tensors a saved state holds, so that strict loading can fill them."""
    for name, layer in qmodel.quant_layers():                 # scaling tensors (Table 9 alternatives)
        if f"model.{name}.in_shift" in state:
            layer.set_shift(torch.zeros_like(layer.in_scale))
        if f"model.{name}.in_gain" in state:
            layer.make_scale_learnable()
    if "eps_bias" in state:                                   # eps-mean correction (--eps_correction)
        qmodel.set_eps_bias(state["eps_bias_t"], state["eps_bias"])
    if "eps_gain" in state:                                   # eps rescale (--eps_rescale)
        qmodel.set_eps_gain(state["eps_gain_t"], state["eps_gain"])


CORRECTIONS = ("eps_bias", "eps_gain")                        # output corrections: not part of the weights
MISMATCH_HINT = "It was calibrated for another model, config or bit setting: check --config/--ckpt/--split."


def load_quantized(path: str | Path, fp_model: nn.Module, payload: dict | None = None) -> tuple[QuantModel, dict]:
    """Rebuild the QuantModel of `fp_model` (on its device) with the saved settings, then load its state
    strictly (keys, shapes, finite values). `payload`: the file's content if it was already read."""
    payload = read_quantized(path) if payload is None else payload
    qmodel = QuantModel(fp_model, QuantConfig.from_dict(payload["config"]), payload["schedule"] or None)
    install_optional_tensors(qmodel, payload["state_dict"])
    load_strict(qmodel, payload["state_dict"], str(path), MISMATCH_HINT)
    return qmodel, payload


def load_quantized_weights(path: str | Path, fp_model: nn.Module, config: QuantConfig) -> QuantModel:
    """A QuantModel of `fp_model` with `config` (e.g. other activation bits) whose weights and weight
    quantizers come from the checkpoint (Q-Diffusion's --resume_w); activation quantizers are left to calibrate."""
    payload = read_quantized(path)
    saved = QuantConfig.from_dict(payload["config"])
    if (saved.weight_bit, saved.first_last_bit, saved.split) != (config.weight_bit, config.first_last_bit, config.split):
        raise CheckpointError(f"--cali_ckpt {path} has weights for W{saved.weight_bit} (split {saved.split}), not "
                              f"W{config.weight_bit} (split {config.split})")
    qmodel = QuantModel(fp_model, replace(config, temporal=saved.temporal), payload["schedule"] or None)
    weights = {k: v for k, v in payload["state_dict"].items() if ".a_quant." not in k and not k.startswith(CORRECTIONS)}
    install_optional_tensors(qmodel, weights)
    expected = {k: v for k, v in qmodel.state_dict().items() if ".a_quant." not in k and not k.startswith(CORRECTIONS)}
    problem = state_dict_mismatch(expected, weights)
    if problem:
        raise CheckpointError(f"--cali_ckpt {path} does not match the model: {problem}. {MISMATCH_HINT}")
    check_finite(weights, str(path))
    qmodel.load_state_dict(weights, strict=False)
    return qmodel
