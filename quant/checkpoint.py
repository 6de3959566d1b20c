"""Save / load calibrated quantized models (`--cali_ckpt`), with no dummy forward on load."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ddim.checkpoint import load_strict
from quant.model import QuantModel
from quant.settings import QuantConfig

FORMAT = "dilatequant-quantized-v1"


def save_quantized(path: str | Path, qmodel: QuantModel, method: str, **meta) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "method": method, "config": qmodel.config.to_dict(),
               "schedule": qmodel.schedule.tolist(), "meta": meta, "state_dict": qmodel.state_dict()}
    torch.save(payload, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def read_quantized(path: str | Path) -> dict:
    """The saved payload (format, method, config, schedule, meta, state_dict) of a quantized checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"quantized checkpoint {path} not found; calibrate first or fix --cali_ckpt")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a quantized checkpoint of this repo (format {FORMAT})")
    return payload


def load_quantized(path: str | Path, fp_model: nn.Module) -> tuple[QuantModel, dict]:
    """Rebuild the QuantModel of `fp_model` with the saved settings, then load its state strictly."""
    payload = read_quantized(path)
    qmodel = QuantModel(fp_model, QuantConfig.from_dict(payload["config"]), payload["schedule"] or None)
    for name, layer in qmodel.quant_layers():                 # optional scaling tensors (Table 9 alternatives)
        if f"model.{name}.in_shift" in payload["state_dict"]:
            layer.set_shift(torch.zeros_like(layer.in_scale))
        if f"model.{name}.in_gain" in payload["state_dict"]:
            layer.make_scale_learnable()
    if "eps_bias" in payload["state_dict"]:                   # optional eps-mean correction (--eps_correction)
        qmodel.set_eps_bias(payload["state_dict"]["eps_bias_t"], payload["state_dict"]["eps_bias"])
    load_strict(qmodel, payload["state_dict"], str(path),
                "It was calibrated for another model, config or bit setting: check --config/--ckpt/--split.")
    return qmodel, payload
