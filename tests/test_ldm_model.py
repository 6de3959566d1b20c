"""LDM/SD networks: full-size architectures (meta device), checkpoint key layouts, strict loading, EMA,
and the attention matmul hook points.

The key lists in tests/data/ldm_*_keys.txt are DERIVED (see each file's header): they were written from our
modules after building them from reading the CompVis module definitions, not dumped from the published
checkpoints (which cannot be downloaded here). Only the SD v1 time_embed / input_blocks rows were compared
with a public key-and-shape dump (an SD-1.5 ControlNet's control_model). These tests pin the layout; the
parameter and layer counts below are independent figures (SPEC §9).
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import CheckpointError
from conftest import ROOT
from ldm.checkpoint import (LEGACY_POSITION_IDS, ema_key, load_ldm_state, load_model_from_config,
                            read_checkpoint)
from ldm.models.autoencoder import AutoencoderKL, VQModelInterface
from ldm.modules.attention import CrossAttention
from ldm.modules.diffusionmodules.openaimodel import AttentionBlock
from tools.tiny_ldm import random_weights, tiny_config
from ldm.util import instantiate_from_config, load_config

CONFIGS = {"bedroom": "latent-diffusion/lsun_bedrooms-ldm-vq-4", "church": "latent-diffusion/lsun_churches-ldm-kl-8",
           "cin256": "latent-diffusion/cin256-v2", "sd_v1": "stable-diffusion/v1-inference"}
# UNet parameters (M) and Conv1d/Conv2d/Linear layers (the 1D convs are AttentionBlock's qkv and proj_out);
# first-stage parameters (M): VQ-f4 and KL-f8 (SPEC §9)
FULL_SIZE = {"bedroom": (274.06, 123, 55.32), "church": (294.97, 168, 83.65),
             "cin256": (400.92, 283, 55.32), "sd_v1": (859.52, 282, 83.65)}


def config(name: str) -> dict:
    return load_config(ROOT / "configs" / f"{CONFIGS[name]}.yaml")


def build_meta(name: str) -> nn.Module:
    with torch.device("meta"):
        return instantiate_from_config(config(name)["model"])


def public_keys(name: str) -> list[tuple[str, tuple[int, ...]]]:
    lines = (ROOT / "tests" / "data" / f"ldm_{name}_keys.txt").read_text().splitlines()
    rows = [line.split("\t") for line in lines if line and not line.startswith("#")]
    return [(k, tuple(int(d) for d in s.split(",") if d)) for k, s in rows]


_TINY: dict[str, nn.Module] = {}


def tiny_model(name: str) -> nn.Module:
    """A fresh copy of the tiny random-weight model of a public config (built once per session)."""
    if name not in _TINY:
        torch.manual_seed(0)
        _TINY[name] = random_weights(instantiate_from_config(tiny_config(config(name))["model"])).eval()
    return copy.deepcopy(_TINY[name])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_size_architectures_match_published_counts(name):
    model = build_meta(name)
    unet = model.model.diffusion_model
    params_m, layers, first_stage_m = FULL_SIZE[name]
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 2) == params_m
    assert sum(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) for m in unet.modules()) == layers
    assert round(sum(p.numel() for p in model.first_stage_model.parameters()) / 1e6, 2) == first_stage_m
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    expected = [row for row in public_keys(name) if row[0] != LEGACY_POSITION_IDS]
    assert ours == expected


def test_conditioners_and_first_stage_types():
    assert isinstance(build_meta("bedroom").first_stage_model, VQModelInterface)
    church = build_meta("church")
    assert isinstance(church.first_stage_model, AutoencoderKL) and church.cond_stage_model is None
    assert church.conditioning_key is None and church.scale_by_std
    cin = build_meta("cin256")
    assert cin.conditioning_key == "crossattn" and cin.cond_stage_model.embedding.num_embeddings == 1001
    sd = build_meta("sd_v1")
    assert sd.scale_factor == 0.18215 and sd.cond_stage_model.transformer.text_model.config.hidden_size == 768


def test_public_layout_loads_strictly_and_ema_is_applied(tmp_path):
    model = tiny_model("bedroom")
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    ema = {ema_key(n): torch.full_like(p, 0.5) for n, p in model.model.named_parameters()}
    lightning = {"state_dict": state | ema | {"model_ema.decay": torch.tensor(0.9999),
                                             "model_ema.num_updates": torch.tensor(7, dtype=torch.int)},
                 "epoch": 3, "global_step": 100, "optimizer_states": [], "lr_schedulers": []}
    torch.save(lightning, tmp_path / "model.ckpt")
    info = load_ldm_state(model, read_checkpoint(tmp_path / "model.ckpt")["state_dict"], "model.ckpt")
    assert info["ema_applied"]
    assert all(bool((p == 0.5).all()) for p in model.model.parameters())
    fs_key = "first_stage_model.post_quant_conv.weight"
    assert torch.equal(model.state_dict()[fs_key], state[fs_key])


@pytest.mark.parametrize("corrupt, expected", [
    (lambda s: s.pop("model.diffusion_model.out.2.bias"), r"missing \(1\): model.diffusion_model.out.2.bias"),
    (lambda s: s.__setitem__("model.extra.weight", torch.zeros(1)), r"unexpected \(1\): model.extra.weight"),
    (lambda s: s.__setitem__("betas", torch.zeros(3)), r"shape \(1\): betas \(3,\)!=\(1000,\)"),
    (lambda s: s.pop(ema_key("diffusion_model.out.2.bias")), r"EMA weights .* missing \(1\): model_ema\."),
])
def test_mismatched_checkpoint_is_one_line_naming_the_keys(corrupt, expected):
    model = tiny_model("cin256")
    state = dict(model.state_dict()) | {ema_key(n): p.detach() for n, p in model.model.named_parameters()}
    corrupt(state)
    with pytest.raises(ValueError, match=expected) as err:
        load_ldm_state(tiny_model("cin256"), state, "ckpt")
    assert "\n" not in str(err.value)


def test_missing_checkpoint_names_the_flag(tmp_path):
    with pytest.raises(CheckpointError, match="--ckpt"):
        read_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointError, match="--ckpt"):
        load_model_from_config(config("church"))


def test_lightning_file_with_pickled_classes_loads_without_running_them(tmp_path):
    """A Lightning checkpoint pickles callback and hyper-parameter objects; they become inert stubs."""
    import sys
    import types
    mod = types.ModuleType("fake_lightning_callbacks")
    ran = []

    class ModelCheckpoint:
        def __init__(self):
            self.best = 1.0

        def __setstate__(self, state):
            ran.append(state)

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = mod.__name__, "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    sys.modules[mod.__name__] = mod
    try:
        torch.save({"state_dict": {"betas": torch.zeros(2)}, "callbacks": {"cb": ModelCheckpoint()}},
                   tmp_path / "lightning.ckpt")
    finally:
        del sys.modules[mod.__name__]
    obj = read_checkpoint(tmp_path / "lightning.ckpt")
    assert torch.equal(obj["state_dict"]["betas"], torch.zeros(2)) and not ran
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.ckpt is not a readable PyTorch checkpoint"):
        read_checkpoint(tmp_path / "junk.ckpt")


def test_legacy_clip_position_ids_are_accepted_only_when_they_are_positions():
    model = tiny_model("sd_v1")
    state = dict(model.state_dict())
    load_ldm_state(model, state | {LEGACY_POSITION_IDS: torch.arange(77)[None]}, "sd.ckpt")
    with pytest.raises(ValueError, match="position_ids"):
        load_ldm_state(model, state | {LEGACY_POSITION_IDS: torch.zeros(1, 77, dtype=torch.long)}, "sd.ckpt")


def test_config_targets_outside_ldm_and_torch_nn_are_refused():
    with pytest.raises(ValueError, match="outside"):
        instantiate_from_config({"target": "os.system", "params": {"command": "true"}})
    assert instantiate_from_config("__is_unconditional__") is None


def test_cross_attention_matmuls_are_hook_points_with_batch_major_heads():
    torch.manual_seed(0)
    attn = CrossAttention(query_dim=32, context_dim=16, heads=4, dim_head=8).eval()
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 3, 16)
    seen = {}
    attn.qk.register_forward_hook(lambda m, args, out: seen.__setitem__("qk", [a.shape for a in args]))
    attn.av.register_forward_hook(lambda m, args, out: seen.__setitem__("av", args))
    out = attn(x, ctx)
    assert seen["qk"] == [(8, 5, 8), (8, 8, 3)]                     # q [(b h), n, d], k^T [(b h), d, m]
    probs, v = seen["av"]
    assert probs.shape == (8, 5, 3) and torch.allclose(probs.sum(-1), torch.ones(8, 5))
    q = attn.to_q(x).view(2, 5, 4, 8).transpose(1, 2)               # [b, h, n, d]
    k, vv = (f(ctx).view(2, 3, 4, 8).transpose(1, 2) for f in (attn.to_k, attn.to_v))
    assert torch.allclose(v.view(2, 4, 3, 8), vv)                    # row b*heads + h
    ref = F.scaled_dot_product_attention(q, k, vv).transpose(1, 2).reshape(2, 5, 32)
    assert torch.allclose(out, attn.to_out(ref), atol=1e-5)
    assert not list(attn.qk.parameters()) and "qk" not in str(list(attn.state_dict()))


def test_legacy_attention_block_matches_reference_attention():
    torch.manual_seed(0)
    block = random_weights(AttentionBlock(64, num_heads=2)).eval()
    x = torch.randn(3, 64, 4, 4)
    qkv = block.qkv(block.norm(x.reshape(3, 64, 16)))                # [B, heads*3*C, T], heads first
    q, k, v = qkv.reshape(3, 2, 3, 32, 16).permute(2, 0, 1, 4, 3)     # each [B, heads, T, C]
    ref = F.scaled_dot_product_attention(q, k, v).permute(0, 1, 3, 2).reshape(3, 64, 16)
    assert torch.allclose(block(x), x + block.proj_out(ref).reshape(3, 64, 4, 4), atol=1e-5)


def test_class_conditional_unet_and_concat_conditioning():
    from ldm.models.diffusion.ddpm import DiffusionWrapper
    params = dict(image_size=8, in_channels=6, out_channels=3, model_channels=32, num_res_blocks=1,
                  attention_resolutions=[2], channel_mult=[1, 2], num_heads=2)
    target = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
    x, c, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    wrapper = DiffusionWrapper({"target": target, "params": params}, "concat").eval()
    random_weights(wrapper)
    assert torch.equal(wrapper(x, t, c_concat=[c]), wrapper.diffusion_model(torch.cat([x, c], 1), t))
    unet = random_weights(instantiate_from_config({"target": target, "params": params | {"num_classes": 5}})).eval()
    with pytest.raises(ValueError, match="num_classes"):
        unet(torch.cat([x, c], 1), t)
    y = torch.tensor([0, 4])
    assert unet.label_emb.weight.shape == (5, 128)
    assert not torch.allclose(unet(torch.cat([x, c], 1), t, y=y), unet(torch.cat([x, c], 1), t, y=y.flip(0)))


def test_safetensors_state_dict_is_read(tmp_path):
    from safetensors.torch import save_file
    save_file({"betas": torch.arange(3.0)}, str(tmp_path / "model.safetensors"))
    assert torch.equal(read_checkpoint(tmp_path / "model.safetensors")["betas"], torch.arange(3.0))
