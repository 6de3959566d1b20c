"""Training of the embedded class-conditional LDM (first stage, then UNet), resumable, CPU or CUDA.

Stage 1: an `AutoencoderKL` on the digits, L1 reconstruction + kl_weight * KL (no perceptual or GAN loss:
their networks cannot be downloaded here). Stage 2: eps-prediction (DDPM eq. 14) of `LatentDiffusion` on
the frozen first stage's latents (scale_factor = 1/std of the latents, as scale_by_std does), the class
context through `ClassEmbedder`, labels dropped to the null class with probability p_uncond (classifier-free
guidance, Ho & Salimans 2021). EMA over the trained weights (UNet and class embedding).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common.files import write_json
from ddim.train import TrainConfig, ema_update


@dataclass(frozen=True)
class StageConfig(TrainConfig):
    """One training stage: TrainConfig's Adam settings with a linear warmup, then cosine decay of the learning
    rate to lr * final_lr_frac at `steps`. `stop_at` ends the stage earlier on the same schedule (to rerun a
    stage that a time budget stopped)."""
    final_lr_frac: float = 0.1
    stop_at: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.final_lr_frac <= 1 or self.warmup < 0 or (self.stop_at is not None and self.stop_at <= 0):
            raise ValueError(f"invalid StageConfig: {self}")

    @property
    def last_step(self) -> int:
        return min(self.steps, self.stop_at or self.steps)

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        frac = (step - self.warmup) / max(1, self.steps - self.warmup)
        cos = 0.5 * (1 + math.cos(math.pi * frac))
        return self.lr * (self.final_lr_frac + (1 - self.final_lr_frac) * cos)


def run_stage(model: nn.Module, loss_fn: Callable[[torch.Generator], torch.Tensor], cfg: StageConfig,
              state_path: Path, desc: str) -> tuple[nn.Module, int]:
    """Train the trainable parameters of `model` on loss_fn(generator); returns (EMA copy, steps done).

    State (model, EMA, optimizer, RNG, step) is saved atomically to state_path every save_every steps and at
    the end; an interrupted run resumes from it with the same RNG stream.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    ema = copy.deepcopy(model).eval()
    opt = torch.optim.Adam(params, lr=cfg.lr)
    parts = {"model": model, "ema": ema, "opt": opt}          # everything with a state_dict to resume
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        for name, part in parts.items():
            part.load_state_dict(state[name])
        gen.set_state(state["rng"])
        step = state["step"]

    def save():
        tmp = state_path.with_suffix(".tmp")
        torch.save({name: part.state_dict() for name, part in parts.items()} | {"rng": gen.get_state(), "step": step},
                   tmp)
        tmp.replace(state_path)                               # atomic: a kill never leaves a torn file

    deadline = None if cfg.max_minutes is None else time.time() + 60 * cfg.max_minutes
    model.train()
    with tqdm(total=cfg.steps, initial=step, desc=desc, dynamic_ncols=True, mininterval=10) as bar:
        while step < cfg.last_step and (deadline is None or time.time() < deadline):
            loss = loss_fn(gen)
            for group in opt.param_groups:
                group["lr"] = cfg.lr_at(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            ema_update(ema, model, cfg.ema_decay)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            if step % cfg.save_every == 0:
                save()
    save()                                                    # steps reached or time spent
    model.eval()
    return ema, step


def autoencoder_loss(ae: nn.Module, images: torch.Tensor, batch_size: int, kl_weight: float) -> Callable:
    """loss(gen): mean |x - D(z)|, z ~ q(z|x), + kl_weight * KL(q || N(0, I)) per pixel, on a random batch."""
    def loss(gen: torch.Generator) -> torch.Tensor:
        dev = next(ae.parameters()).device                       # draws on the CPU generator, math on the model's device
        x = images[torch.randint(0, len(images), (batch_size,), generator=gen)].to(dev)
        posterior = ae.encode(x)
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(dev)
        rec = ae.decode(z)
        return F.l1_loss(rec, x) + kl_weight * posterior.kl().mean() / x[0].numel()
    return loss


def diffusion_loss(ldm: nn.Module, z_mean: torch.Tensor, z_std: torch.Tensor, labels: torch.Tensor,
                   batch_size: int, null_class: int, p_uncond: float) -> Callable:
    """loss(gen): || eps - eps_theta(sqrt(abar_t) z + sqrt(1 - abar_t) eps, t, c) ||^2 with z drawn from the
    stored posteriors (already scaled), t ~ U{0..T-1}, labels replaced by null_class with prob p_uncond."""
    def loss(gen: torch.Generator) -> torch.Tensor:
        dev = next(ldm.parameters()).device                      # draws on the CPU generator, math on the model's device
        idx = torch.randint(0, len(z_mean), (batch_size,), generator=gen)
        z = z_mean[idx] + z_std[idx] * torch.randn(z_mean[idx].shape, generator=gen)
        y = torch.where(torch.rand(batch_size, generator=gen) < p_uncond, null_class, labels[idx])
        t = torch.randint(0, ldm.num_timesteps, (batch_size,), generator=gen)
        eps = torch.randn(z.shape, generator=gen)
        z, y, t, eps = z.to(dev), y.to(dev), t.to(dev), eps.to(dev)
        c = ldm.get_learned_conditioning({ldm.cond_stage_key: y})
        return F.mse_loss(ldm.apply_model(ldm.q_sample(z, t, eps), t, c), eps)
    return loss


@torch.no_grad()
def encode_dataset(ae: nn.Module, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image. -> ([N, C, h, w], [N, C, h, w])"""
    means, stds = [], []
    dev = next(ae.parameters()).device
    for i in range(0, len(images), batch_size):
        posterior = ae.encode(images[i:i + batch_size].to(dev))
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def latent_scale(z_mean: torch.Tensor, z_std: torch.Tensor, seed: int = 0) -> float:
    """1 / std of latents sampled from the posteriors (the scale_by_std rule, over the whole set)."""
    gen = torch.Generator().manual_seed(seed)
    return 1.0 / float((z_mean + z_std * torch.randn(z_mean.shape, generator=gen)).std())


@torch.no_grad()
def reconstruction_psnr(ae: nn.Module, images: torch.Tensor, crop: int = 0, batch_size: int = 500) -> torch.Tensor:
    """Per-image PSNR (dB) of the posterior-mode reconstruction on the uint8 scale after clipping to [-1, 1],
    inside the image minus `crop` pixels of padding per side. [N]"""
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        rec = ae.decode(ae.encode(x).mode()).clamp(-1, 1)
        if crop:
            x, rec = x[..., crop:-crop, crop:-crop], rec[..., crop:-crop, crop:-crop]
        to8 = lambda v: ((v + 1) * 127.5).round()
        mse = (to8(x) - to8(rec)).pow(2).flatten(1).mean(1)
        out.append(10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10)))
    return torch.cat(out)


def build_from_config(config: dict) -> nn.Module:
    """The config's LatentDiffusion with freshly initialised weights."""
    from ldm.util import instantiate_from_config
    return instantiate_from_config(config["model"])


def train_first_stage(config: dict, images: torch.Tensor, cfg: StageConfig, run_dir: Path,
                      kl_weight: float = 1e-6, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Stage 1 (resumable): the config's first stage on `images` [N, C, H, W] in [-1, 1]; returns the trained
    weights (not the EMA: the public first stages keep none, and over a few thousand steps the EMA lags the
    reconstruction quality) and {'steps', 'seconds'}. A finished stage (steps reached or --max_minutes spent)
    is recorded in ae_done.json and reused on rerun."""
    import json
    from ldm.util import instantiate_from_config
    done, state = run_dir / "ae_done.json", run_dir / "ae_state.pt"
    ae = instantiate_from_config(config["model"]["params"]["first_stage_config"]).to(device)
    if done.exists():
        ae.load_state_dict(torch.load(state, map_location="cpu", weights_only=False)["model"])
        return ae.eval(), json.loads(done.read_text())
    start = time.time()
    _, steps = run_stage(ae, autoencoder_loss(ae, images, cfg.batch_size, kl_weight), cfg, state, "autoencoder")
    info = {"steps": steps, "seconds": round(time.time() - start, 1), "kl_weight": kl_weight}
    write_json(done, info)
    return ae.eval(), info


def train_latent_diffusion(config: dict, first_stage: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                           cfg: StageConfig, run_dir: Path, null_class: int, p_uncond: float = 0.1,
                           device: torch.device | str = "cpu"):
    """Stage 2 (resumable): LatentDiffusion with the trained first stage frozen; returns (EMA model, info)."""
    ldm = build_from_config(config).to(device)
    ldm.first_stage_model.load_state_dict(first_stage.state_dict())
    z_mean, z_std = encode_dataset(ldm.first_stage_model, images)
    scale = latent_scale(z_mean, z_std, cfg.seed)
    ldm.scale_factor.fill_(scale)
    start = time.time()
    loss = diffusion_loss(ldm, z_mean * scale, z_std * scale, labels, cfg.batch_size, null_class, p_uncond)
    ema, steps = run_stage(ldm, loss, cfg, run_dir / "ldm_state.pt", "latent diffusion")
    return ema, {"steps": steps, "seconds_this_run": round(time.time() - start, 1), "scale_factor": scale}
