"""Loading public LDM / Stable Diffusion checkpoints strictly.

A CompVis checkpoint is a Lightning file: {'state_dict': {...}, 'epoch', 'global_step', 'optimizer_states',
'callbacks', ...}. Only `state_dict` is used: `model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.*`, the schedule buffers, and optionally `model_ema.*` (LitEma: the UNet wrapper's
parameter names with the dots removed, plus `model_ema.decay` and `model_ema.num_updates`). EMA weights,
when present, replace the UNet's. Everything else must match our modules exactly (one-line error naming
the keys), except the autoencoder's training loss (`first_stage_model.loss.*`: LPIPS and discriminator weights
that training-time checkpoints carry and sampling never uses; CompVis's scripts load with strict=False and skip
them too), which is dropped. Files are read with torch's weights-only unpickler; classes a Lightning file pickles outside the
state_dict (callbacks, hyper-parameters) are replaced by inert stubs, so no code from the file runs.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from common.checkpoint import check_file, load_strict, state_dict_mismatch
from common.errors import CheckpointError

EMA_PREFIX = "model_ema."
EMA_COUNTERS = ("model_ema.decay", "model_ema.num_updates")
# A buffer that transformers < 4.31 saved with the CLIP text tower (SD v1 files carry it); newer versions
# recompute it. Accepted when it holds the positions 0..76 it must hold.
LEGACY_POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
TRAINING_LOSS_PREFIX = "first_stage_model.loss."     # the autoencoder's training loss: not part of the model


class _Stub:
    """Inert stand-in for a global a checkpoint pickles outside the weights: stores what it is given."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


def _stub(path: str):
    module, _, name = path.rpartition(".")
    return type(name, (_Stub,), {"__module__": module}), path


def read_checkpoint(path: str | Path, flag: str = "--ckpt") -> dict:
    """The checkpoint object: a .safetensors file, or a pickle read weights-only with unknown globals stubbed.
    Clear one-line errors."""
    path = check_file(path, flag, "pass the right checkpoint path")
    if path.suffix == ".safetensors":                       # a plain state_dict (e.g. sd-v1-4 converted)
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        pass
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        with torch.serialization.safe_globals([_stub(g) for g in unsafe]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{flag} {path} is not a readable PyTorch checkpoint ({type(e).__name__}: {first}); "
                              f"is it a PyTorch/Lightning checkpoint, and complete?") from None


def checkpoint_state_dict(obj, path: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """The state_dict of a Lightning checkpoint ({'state_dict': ...}) or of a plain state_dict file."""
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state_dict of tensors")
    return state


def ema_key(param_name: str) -> str:
    """LitEma's buffer name for a parameter of the UNet wrapper `model`: dots removed."""
    return EMA_PREFIX + param_name.replace(".", "")


def split_ema(state: dict) -> tuple[dict, dict]:
    """(model keys, EMA shadow weights by LitEma name); the EMA counters are dropped."""
    model = {k: v for k, v in state.items() if not k.startswith(EMA_PREFIX)}
    ema = {k: v for k, v in state.items() if k.startswith(EMA_PREFIX) and k not in EMA_COUNTERS}
    return model, ema


def apply_ema(wrapper: nn.Module, ema: dict, source: str) -> None:
    """Copy EMA shadow weights into `wrapper`'s parameters (every parameter needs its shadow, and no extra)."""
    expected = {ema_key(n): p for n, p in wrapper.named_parameters()}
    problem = state_dict_mismatch(expected, ema)
    if problem:
        raise ValueError(f"{source}: EMA weights do not match the UNet: {problem}")
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(ema[key])


def _drop_legacy_position_ids(model: nn.Module, state: dict, source: str) -> dict:
    if LEGACY_POSITION_IDS not in state or LEGACY_POSITION_IDS in model.state_dict():
        return state
    ids = state[LEGACY_POSITION_IDS]
    if not torch.equal(ids.reshape(-1).long(), torch.arange(ids.numel())):
        raise ValueError(f"{source}: {LEGACY_POSITION_IDS} is not 0..{ids.numel() - 1}")
    return {k: v for k, v in state.items() if k != LEGACY_POSITION_IDS}


def load_ldm_state(model: nn.Module, state: dict, source: str, use_ema: bool = True) -> dict:
    """Load a LatentDiffusion state_dict strictly; apply its EMA weights to the UNet when it has them.
    Returns {'ema_applied': bool}."""
    if not any(k.startswith(TRAINING_LOSS_PREFIX) for k in model.state_dict()):
        state = {k: v for k, v in state.items() if not k.startswith(TRAINING_LOSS_PREFIX)}
    weights, ema = split_ema(_drop_legacy_position_ids(model, state, source))
    load_strict(model, weights, source, "Does the checkpoint belong to this config?")
    if ema and use_ema:
        apply_ema(model.model, ema, source)
    return {"ema_applied": bool(ema and use_ema)}


def load_model_from_config(config: dict, ckpt: str | Path | None = None, use_ema: bool = True,
                           config_path: str | Path = "config") -> nn.Module:
    """The config's LatentDiffusion in eval mode with the weights of `ckpt` (default: the config's top-level
    `ckpt:`, relative to the repository root)."""
    from ldm.util import instantiate_from_config
    path = ckpt or config.get("ckpt")
    if path is None:
        raise CheckpointError(f"{config_path} names no checkpoint: pass --ckpt PATH (or -r/--resume)")
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = Path(__file__).resolve().parents[1] / path
    model = instantiate_from_config(config["model"])
    obj = read_checkpoint(path)
    load_ldm_state(model, checkpoint_state_dict(obj, path), str(path), use_ema)
    return model.eval()
