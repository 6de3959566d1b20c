"""Inception Score, only from the real Inception classifier (SPEC §6).

IS = exp E[KL(p(y|x) || p(y))] needs the 1008-way classifier head of the 2015-12-05 Inception, which the FID
network shipped offline (`default_1.pt`) lacks. It is computed by torch-fidelity only when that real weights
file is already on disk; otherwise it is reported as unavailable, never computed from a stand-in network.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from common.device import pick_device
from evaluation.fid import check_images

# Files holding the full Inception (with its classifier head) that IS needs, in torch hub's checkpoint
# folder: torch-fidelity 0.4.0 `URL_INCEPTION_V3`, then pytorch-fid 0.3.0 `FID_WEIGHTS_URL`. Both names
# carry the same sha256 prefix (torch hub's naming), i.e. the same file.
IS_WEIGHT_FILES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
IS_SPLITS = 10  # the score is averaged over 10 disjoint splits (Salimans et al.; torch-fidelity default)


class ISUnavailable(RuntimeError):
    """IS cannot be computed here; the message says why."""


def find_is_weights() -> Path | None:
    """The real Inception weights (with classifier head) if one of IS_WEIGHT_FILES is in torch hub's cache."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    return next((folder / name for name in IS_WEIGHT_FILES if (folder / name).is_file()), None)


class _CHWDataset(Dataset):
    """uint8 NHWC images as the uint8 [3, H, W] tensors torch-fidelity reads."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.images[i]).permute(2, 0, 1).expand(3, -1, -1)


def inception_score(images: np.ndarray, device: str | torch.device | None = None, batch_size: int = 50,
                    weights: str | Path | None = None, progress: bool = True) -> float:
    """IS = exp E_x[KL(p(y|x) || p(y))] (Salimans et al. 2016), torch-fidelity's mean over IS_SPLITS splits.

    Raises ISUnavailable when neither `weights` nor a cached weights file exists (they cannot be
    downloaded here), torch-fidelity is not installed, or there are fewer samples than splits.
    """
    check_images(images)
    if len(images) < IS_SPLITS:
        raise ISUnavailable(f"IS unavailable: it needs at least {IS_SPLITS} samples ({IS_SPLITS} splits)")
    path = Path(weights) if weights is not None else find_is_weights()
    if path is None or not path.is_file():
        looked = path or f"{' or '.join(IS_WEIGHT_FILES)} in {Path(torch.hub.get_dir()) / 'checkpoints'}"
        raise ISUnavailable(f"IS unavailable: no Inception classifier weights offline (looked for {looked})")
    try:
        import torch_fidelity
    except ImportError as e:
        raise ISUnavailable("IS unavailable: torch-fidelity is not installed") from e
    metrics = torch_fidelity.calculate_metrics(
        input1=_CHWDataset(images), isc=True, isc_splits=IS_SPLITS, cuda=pick_device(device).type == "cuda",
        batch_size=batch_size, feature_extractor_weights_path=str(path), cache=False, verbose=progress,
        save_cpu_ram=True)  # images are in memory: no DataLoader worker processes
    return float(metrics[torch_fidelity.KEY_METRIC_ISC_MEAN])
