"""First-stage autoencoders: `AutoencoderKL` and the VQ-regularised `VQModel` / `VQModelInterface`.

Keys: `encoder.*`, `decoder.*`, `quant_conv`, `post_quant_conv` and, for VQ, `quantize.embedding.weight`
(our own nearest-codebook lookup; no taming-transformers import). Inference-first: `lossconfig` is
accepted and not built (the training losses are not needed to sample); `ckpt_path` of a first stage is
recorded, not loaded: an LDM checkpoint holds the first-stage weights (`ldm.checkpoint`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook quantization of z [B, C, H, W] (VQ-VAE, taming's VectorQuantizer2 keys)."""

    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25, remap=None, sane_index_shape: bool = False,
                 legacy: bool = True):
        super().__init__()
        if remap is not None:
            raise ValueError("codebook remapping (remap=...) is not supported")
        self.n_e, self.e_dim, self.beta, self.legacy = n_e, e_dim, beta, legacy
        self.sane_index_shape = sane_index_shape
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

    def forward(self, z: torch.Tensor):
        """-> (z_q [B, C, H, W] with a straight-through gradient, commitment loss, (None, None, indices))."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)                            # [B*H*W, C]
        e = self.embedding.weight                                              # [n_e, C]
        dist = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1)[None] - 2 * flat @ e.t()
        idx = dist.argmin(dim=1)                                               # [B*H*W]
        z_q = self.embedding(idx).reshape(b, h, w, c).permute(0, 3, 1, 2)
        commit, codebook = torch.mean((z_q.detach() - z) ** 2), torch.mean((z_q - z.detach()) ** 2)
        loss = commit + self.beta * codebook if self.legacy else self.beta * commit + codebook
        z_q = z + (z_q - z).detach()
        idx = idx.reshape(b, h, w) if self.sane_index_shape else idx[:, None]
        return z_q, loss, (None, None, idx)

    def get_codebook_entry(self, indices: torch.Tensor, shape=None) -> torch.Tensor:
        """Codebook vectors of `indices`; with shape (B, H, W, C) returned as [B, C, H, W]."""
        z_q = self.embedding(indices.reshape(-1))
        return z_q if shape is None else z_q.reshape(shape).permute(0, 3, 1, 2).contiguous()


def _conv1x1(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1)


class VQModel(nn.Module):
    def __init__(self, ddconfig, lossconfig, n_embed, embed_dim, ckpt_path=None, ignore_keys=(), image_key="image",
                 colorize_nlabels=None, monitor=None, batch_resize_range=None, scheduler_config=None,
                 lr_g_factor=1.0, remap=None, sane_index_shape=False, use_ema=False):
        super().__init__()
        self.embed_dim, self.n_embed, self.image_key, self.ckpt_path = embed_dim, n_embed, image_key, ckpt_path
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=0.25, remap=remap, sane_index_shape=sane_index_shape)
        self.quant_conv = _conv1x1(ddconfig["z_channels"], embed_dim)
        self.post_quant_conv = _conv1x1(embed_dim, ddconfig["z_channels"])
        if colorize_nlabels is not None:
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))

    def encode(self, x: torch.Tensor):
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def forward(self, x: torch.Tensor):
        quant, diff, _ = self.encode(x)
        return self.decode(quant), diff


class VQModelInterface(VQModel):
    """The VQ first stage as LDMs use it: the latent is the pre-quantization code; decode quantizes it."""

    def __init__(self, embed_dim, *args, **kwargs):
        super().__init__(*args, embed_dim=embed_dim, **kwargs)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(quant))


class AutoencoderKL(nn.Module):
    def __init__(self, ddconfig, lossconfig, embed_dim, ckpt_path=None, ignore_keys=(), image_key="image",
                 colorize_nlabels=None, monitor=None):
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig double_z: true (mean and log-variance)")
        self.embed_dim, self.image_key, self.ckpt_path = embed_dim, image_key, ckpt_path
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quant_conv = _conv1x1(2 * ddconfig["z_channels"], 2 * embed_dim)
        self.post_quant_conv = _conv1x1(embed_dim, ddconfig["z_channels"])
        if colorize_nlabels is not None:
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None):
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
