"""(A helper of tests and studies, not a command.) Images from a class-conditional LatentDiffusion with classifier-free guidance, batch by batch from fixed
noise (the embedded MNIST model's evaluation; any ClassEmbedder-conditioned config works)."""
from __future__ import annotations

import numpy as np
import torch

from diffusion.sampling import to_uint8
from diffusion.samplers import Sampler


@torch.no_grad()
def class_conditional_images(model, sampler: Sampler, labels: torch.Tensor, scale: float, null_class: int,
                             seed: int = 0, batch_size: int = 250, crop: int = 0) -> np.ndarray:
    """uint8 NHWC images of classes `labels` [N]. x_T of image i is row i of a [N, C, h, w] normal draw from
    `seed` (made on the CPU, so any device starts from the same noise); the unconditional half of the guided
    batch uses `null_class`; batch b draws its sampler noise (DDIM eta > 0) from seed + 1 + b; `crop`
    pixels of padding are cut from each side of the decoded images."""
    device = model.betas.device
    noise = torch.randn(len(labels), model.channels, model.image_size, model.image_size,
                        generator=torch.Generator().manual_seed(seed))
    out = []
    for i in range(0, len(labels), batch_size):
        y = labels[i:i + batch_size].to(device)
        cond = model.get_learned_conditioning({model.cond_stage_key: y})
        uncond = model.get_learned_conditioning({model.cond_stage_key: torch.full_like(y, null_class)})
        gen = torch.Generator(device=device).manual_seed(seed + 1 + i // batch_size)  # eta > 0 noise
        z = sampler.sample(model.apply_model, noise[i:i + batch_size].to(device), cond, uncond, scale, generator=gen)
        x = model.decode_first_stage(z)
        out.append(to_uint8(x[..., crop:-crop, crop:-crop] if crop else x))
    return np.concatenate(out)
