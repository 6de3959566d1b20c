"""(A helper of tests and tools, not a command.) Tiny random-weight variants of the public LDM/SD configs: the same classes and structure (levels, attention
placement, conditioning, first-stage type) with small widths, for tests and quick end-to-end checks on CPU.
GroupNorm(32) stays, so every width is a multiple of 32."""
from __future__ import annotations

import copy

import torch

# a 2-layer CLIP text tower of width 32 for FrozenCLIPEmbedder(text_config=...)
TINY_CLIP_TEXT = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=77, bos_token_id=998, eos_token_id=999,
                      pad_token_id=999)


def tiny_config(config: dict, latent_size: int = 8) -> dict:
    """A copy of a public LDM config (as loaded by ldm.util.load_config) shrunk to widths of 32 per level:
    UNet model_channels 32 (context 32), first stage ch 32 with one res block per level, latents
    latent_size x latent_size (at least 2^(UNet levels - 1)), VQ codebook of 64 entries, CLIP text tower of
    TINY_CLIP_TEXT."""
    cfg = copy.deepcopy(config)
    p = cfg["model"]["params"]
    unet = p["unet_config"]["params"]
    latent_size = max(latent_size, 2 ** (len(unet["channel_mult"]) - 1))
    unet.update(model_channels=32, image_size=latent_size)
    unet["channel_mult"] = [min(m, 2) for m in unet["channel_mult"]]
    if unet.get("num_head_channels", -1) != -1:
        unet["num_head_channels"] = 32
    elif unet.get("num_heads", -1) > 2:
        unet["num_heads"] = 2
    if unet.get("context_dim") is not None:
        unet["context_dim"] = 32
    p["image_size"] = latent_size
    fs = p["first_stage_config"]["params"]
    dd = fs["ddconfig"]
    dd.update(ch=32, num_res_blocks=1, resolution=latent_size * 2 ** (len(dd["ch_mult"]) - 1))
    dd["ch_mult"] = [min(m, 2) for m in dd["ch_mult"]]
    fs.pop("ckpt_path", None)
    if "n_embed" in fs:
        fs["n_embed"] = 64
    cond = p.get("cond_stage_config")
    if isinstance(cond, dict) and cond["target"].endswith("ClassEmbedder"):
        cond["params"]["embed_dim"] = 32
    elif isinstance(cond, dict) and cond["target"].endswith("FrozenCLIPEmbedder"):
        cond["params"] = dict(cond.get("params") or {}, text_config=TINY_CLIP_TEXT)
    return cfg


def random_weights(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Fill every parameter with N(0, scale^2) (zero-initialised output layers would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model
