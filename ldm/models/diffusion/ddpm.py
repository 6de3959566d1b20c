"""`DDPM` and `LatentDiffusion`: the diffusion wrapper around the UNet, first stage and conditioner.

Inference-first reimplementation of the public CompVis classes: same constructor arguments (training-only
ones are accepted and ignored), same submodules (`model.diffusion_model`, `first_stage_model`,
`cond_stage_model`) and the schedule buffers that are checkpoint keys (`betas`, `alphas_cumprod`, ...,
`posterior_mean_coef2`; `scale_factor` with scale_by_std). EMA weights (`model_ema.*`) are not kept as a
module: `ldm.checkpoint` copies them into the UNet when a checkpoint carries them.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from ldm.models.autoencoder import VQModelInterface
from ldm.modules.diffusionmodules.util import make_beta_schedule
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config

CONDITIONING_KEYS = (None, "concat", "crossattn", "hybrid", "adm")
# buffers of the noise schedule, in the public registration order (all are checkpoint keys)
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")


def schedule_arrays(betas: np.ndarray, v_posterior: float = 0.0) -> dict[str, np.ndarray]:
    """The float64 schedule arrays named in SCHEDULE_BUFFERS (DDPM eq. 4, 6, 7)."""
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = (1 - v_posterior) * betas * (1 - abar_prev) / (1 - abar) + v_posterior * betas
    return dict(betas=betas, alphas_cumprod=abar, alphas_cumprod_prev=abar_prev,
                sqrt_alphas_cumprod=np.sqrt(abar), sqrt_one_minus_alphas_cumprod=np.sqrt(1 - abar),
                log_one_minus_alphas_cumprod=np.log(1 - abar), sqrt_recip_alphas_cumprod=np.sqrt(1 / abar),
                sqrt_recipm1_alphas_cumprod=np.sqrt(1 / abar - 1), posterior_variance=post_var,
                posterior_log_variance_clipped=np.log(np.maximum(post_var, 1e-20)),
                posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1 - abar),
                posterior_mean_coef2=(1 - abar_prev) * np.sqrt(alphas) / (1 - abar))


def _frozen(module: nn.Module | None) -> nn.Module | None:
    if module is not None:
        module.eval()
        for p in module.parameters():
            p.requires_grad = False
    return module


class DiffusionWrapper(nn.Module):
    """Routes the conditioning into the UNet (`diffusion_model`) by `conditioning_key`."""

    def __init__(self, diff_model_config: dict, conditioning_key: str | None):
        super().__init__()
        if conditioning_key not in CONDITIONING_KEYS:
            raise ValueError(f"unknown conditioning_key {conditioning_key!r}; choose one of {CONDITIONING_KEYS}")
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key

    def forward(self, x, t, c_concat: list | None = None, c_crossattn: list | None = None) -> torch.Tensor:
        key = self.conditioning_key
        if key is None:
            return self.diffusion_model(x, t)
        if key == "adm":
            return self.diffusion_model(x, t, y=c_crossattn[0])
        if key in ("concat", "hybrid"):
            x = torch.cat([x] + list(c_concat), dim=1)
        context = torch.cat(list(c_crossattn), dim=1) if key in ("crossattn", "hybrid") else None
        return self.diffusion_model(x, t, context=context) if context is not None else self.diffusion_model(x, t)


class DDPM(nn.Module):
    """Pixel-space diffusion: the UNet wrapper and the schedule buffers (eps parameterization)."""

    def __init__(self, unet_config, timesteps=1000, beta_schedule="linear", loss_type="l2", ckpt_path=None,
                 ignore_keys=(), load_only_unet=False, monitor="val/loss", use_ema=True, first_stage_key="image",
                 image_size=256, channels=3, log_every_t=100, clip_denoised=True, linear_start=1e-4,
                 linear_end=2e-2, cosine_s=8e-3, given_betas=None, original_elbo_weight=0.0, v_posterior=0.0,
                 l_simple_weight=1.0, conditioning_key=None, parameterization="eps", scheduler_config=None,
                 use_positional_encodings=False, learn_logvar=False, logvar_init=0.0):
        super().__init__()
        if parameterization != "eps":
            raise ValueError(f"parameterization {parameterization!r} is not supported (eps only)")
        self.parameterization, self.loss_type, self.use_ema = parameterization, loss_type, use_ema
        self.first_stage_key, self.image_size, self.channels = first_stage_key, image_size, channels
        self.clip_denoised, self.ckpt_path = clip_denoised, ckpt_path
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        betas = (np.asarray(given_betas, dtype=np.float64) if given_betas is not None else
                 make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s))
        self.num_timesteps, self.linear_start, self.linear_end = len(betas), linear_start, linear_end
        for name, value in schedule_arrays(betas, v_posterior).items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32))
        if learn_logvar:
            self.logvar = nn.Parameter(torch.full((self.num_timesteps,), float(logvar_init)))

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM eq. 4)."""
        shape = (-1,) + (1,) * (x_start.dim() - 1)
        return (self.sqrt_alphas_cumprod[t].view(shape) * x_start
                + self.sqrt_one_minus_alphas_cumprod[t].view(shape) * noise)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        return self.model(x, t)


class LatentDiffusion(DDPM):
    """Diffusion in the latent space of a frozen first stage, conditioned through `cond_stage_model`."""

    def __init__(self, first_stage_config, cond_stage_config, num_timesteps_cond=None, cond_stage_key="image",
                 cond_stage_trainable=False, concat_mode=True, cond_stage_forward=None, conditioning_key=None,
                 scale_factor=1.0, scale_by_std=False, *args, **kwargs):
        if conditioning_key is None:   # the public default, kept for old configs
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == "__is_unconditional__":
            conditioning_key = None
        ckpt_path = kwargs.pop("ckpt_path", None)
        kwargs.pop("ignore_keys", None)
        super().__init__(*args, conditioning_key=conditioning_key, ckpt_path=ckpt_path, **kwargs)
        self.num_timesteps_cond = num_timesteps_cond or 1
        self.cond_stage_key, self.cond_stage_trainable = cond_stage_key, cond_stage_trainable
        self.concat_mode, self.cond_stage_forward, self.scale_by_std = concat_mode, cond_stage_forward, scale_by_std
        if scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        else:
            self.scale_factor = scale_factor
        self.first_stage_model = _frozen(instantiate_from_config(first_stage_config))
        if cond_stage_config == "__is_first_stage__":
            self.cond_stage_model = self.first_stage_model
        else:
            self.cond_stage_model = instantiate_from_config(cond_stage_config)
            if not cond_stage_trainable:
                _frozen(self.cond_stage_model)

    def train(self, mode: bool = True) -> "LatentDiffusion":
        """Train mode for the diffusion model (and a trainable conditioner); the frozen stages stay in eval."""
        super().train(mode)
        self.first_stage_model.eval()
        if self.cond_stage_model is not None and not self.cond_stage_trainable:
            self.cond_stage_model.eval()
        return self

    @property
    def conditioning_key(self) -> str | None:
        return self.model.conditioning_key

    def get_learned_conditioning(self, c):
        """Conditioning input (labels {key: [B]}, text, ...) -> what apply_model takes as `cond`."""
        model = self.cond_stage_model
        if self.cond_stage_forward is not None:
            return getattr(model, self.cond_stage_forward)(c)
        if callable(getattr(model, "encode", None)):
            c = model.encode(c)
            return c.mode() if isinstance(c, DiagonalGaussianDistribution) else c
        return model(c)

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor):
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior, generator: torch.Generator | None = None) -> torch.Tensor:
        """scale_factor * z, z sampled from a KL posterior (or the VQ pre-quantization code as is)."""
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample(generator)
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise TypeError(f"unexpected first-stage encoding of type {type(encoder_posterior).__name__}")
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        """Latents (scaled, as the UNet sees them) -> images in [-1, 1] (unclipped)."""
        z = z / self.scale_factor
        if isinstance(self.first_stage_model, VQModelInterface):
            return self.first_stage_model.decode(z, force_not_quantize=force_not_quantize)
        return self.first_stage_model.decode(z)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        """eps = UNet(x_noisy, t, cond). `cond`: a tensor or list (routed by conditioning_key), a dict
        {'c_concat': [...], 'c_crossattn': [...]}, or None for unconditional models."""
        if cond is None or isinstance(cond, dict):
            return self.model(x_noisy, t, **(cond or {}))
        key = "c_concat" if self.conditioning_key == "concat" else "c_crossattn"
        return self.model(x_noisy, t, **{key: cond if isinstance(cond, list) else [cond]})
