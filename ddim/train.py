"""Epsilon-prediction training of the UNet (DDPM eq. 14), resumable, CPU or CUDA."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ddim.model import UNet
from ddim.schedule import alphas_cumprod


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 20000
    batch_size: int = 64
    lr: float = 5e-4
    warmup: int = 500
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    save_every: int = 250
    seed: int = 0
    max_minutes: float | None = None  # stop (after saving) when the wall-clock budget is spent

    def __post_init__(self):
        if self.steps <= 0 or self.batch_size <= 0 or self.lr <= 0 or not 0 < self.ema_decay < 1:
            raise ValueError(f"invalid TrainConfig: {self}")


def diffusion_loss(model: UNet, x0: torch.Tensor, abar: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """|| eps - eps_theta(sqrt(abar_t) x0 + sqrt(1-abar_t) eps, t) ||^2 with t ~ U{0..T-1}."""
    t = torch.randint(0, len(abar), (x0.shape[0],), generator=generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    a = abar.to(x0.device, torch.float32)[t].view(-1, 1, 1, 1)
    return F.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t), eps)


@torch.no_grad()
def ema_update(ema: UNet, model: UNet, decay: float) -> None:
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1 - decay)


def train(model: UNet, data: torch.Tensor, betas: torch.Tensor, cfg: TrainConfig, run_dir: Path,
          device: torch.device) -> UNet:
    """Train on `data` ([N, C, H, W] in [-1, 1]); state is saved to run_dir/train_state.pt and resumed.

    Returns the EMA model. An interrupted run continues from its last save with the same RNG stream.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / "train_state.pt"
    model.to(device).train()
    ema = copy.deepcopy(model).eval()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    if state_path.exists():
        st = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(st["model"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["rng"])
        step = st["step"]
    abar = alphas_cumprod(betas).float()

    def save():
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "rng": gen.get_state(), "step": step}, state_path.with_suffix(".tmp"))
        state_path.with_suffix(".tmp").replace(state_path)  # atomic: a kill never leaves a torn file

    start = time.time()
    bar = tqdm(total=cfg.steps, initial=step, desc="train", dynamic_ncols=True)
    while step < cfg.steps:
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=gen)
        loss = diffusion_loss(model, data[idx].to(device), abar, gen)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema_update(ema, model, cfg.ema_decay)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        out_of_time = cfg.max_minutes is not None and time.time() - start > 60 * cfg.max_minutes
        if step % cfg.save_every == 0 or step == cfg.steps or out_of_time:
            save()
        if out_of_time:
            break
    bar.close()
    return ema
