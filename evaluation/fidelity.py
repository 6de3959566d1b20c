"""Fidelity to the FP model: how close a quantized model's samples are to the FP model's own samples drawn
from the same noise (image by image: paired PSNR; as a distribution: FID against the FP samples, with
evaluation.fid). FID against real images scores sample quality and can reward a quantization error that happens
to move samples toward the data; these score what quantization tries to keep."""
from __future__ import annotations

import numpy as np


def paired_psnr_db(ref: np.ndarray, images: np.ndarray) -> np.ndarray:
    """PSNR (dB, peak 255) of each image against the reference image at the same index; inf where equal."""
    if ref.shape != images.shape:
        raise ValueError(f"paired images must have the same shape, got {ref.shape} and {images.shape}: "
                         "compare sample sets drawn with the same --max_images and seed")
    err = (ref.astype(np.float64) - images.astype(np.float64)) ** 2
    mse = err.reshape(len(err), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(255.0 ** 2 / mse)
