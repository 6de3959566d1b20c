"""Inception Score, only from the real Inception classifier (SPEC §6).

IS = exp E[KL(p(y|x) || p(y))] needs the 1008-way classifier head of the 2015-12-05 Inception, which the FID
network shipped offline (`default_1.pt`) lacks. torch-fidelity computes it with that real network: from its
weights file in torch hub's cache, or, when that file is missing and downloads are allowed (`allow_download`,
or the network is reachable), fetched the usual way by torch-fidelity into that cache. Otherwise IS is
reported as unavailable in one line, never computed from a stand-in network.
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


def network_reachable(host: str = "github.com", port: int = 443, timeout: float = 3.0) -> bool:
    """Whether `host` (where torch-fidelity's weights are released) answers: a TCP connection, nothing sent."""
    import socket
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


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
                    weights: str | Path | None = None, progress: bool = True,
                    allow_download: bool | None = None) -> float:
    """IS = exp E_x[KL(p(y|x) || p(y))] (Salimans et al. 2016), torch-fidelity's mean over IS_SPLITS splits.

    allow_download: fetch the weights when no file is on disk (None: when the network is reachable). Raises
    ISUnavailable when there are no weights and none can be fetched, torch-fidelity is not installed, or there
    are fewer samples than splits.
    """
    check_images(images)
    if len(images) < IS_SPLITS:
        raise ISUnavailable(f"IS unavailable: it needs at least {IS_SPLITS} samples ({IS_SPLITS} splits)")
    path = Path(weights) if weights is not None else find_is_weights()
    missing = path is None or not path.is_file()
    fetch = missing and weights is None and (network_reachable() if allow_download is None else allow_download)
    if missing and not fetch:
        looked = path or f"{' or '.join(IS_WEIGHT_FILES)} in {Path(torch.hub.get_dir()) / 'checkpoints'}"
        raise ISUnavailable(f"IS unavailable: no Inception classifier weights offline (looked for {looked}); "
                            f"--allow_download fetches them where a network is reachable")
    try:
        import torch_fidelity
    except ImportError as e:
        raise ISUnavailable("IS unavailable: torch-fidelity is not installed") from e
    source = {} if fetch else {"feature_extractor_weights_path": str(path)}      # fetch: torch-fidelity's download
    try:
        metrics = torch_fidelity.calculate_metrics(
            input1=_CHWDataset(images), isc=True, isc_splits=IS_SPLITS, cuda=pick_device(device).type == "cuda",
            batch_size=batch_size, cache=False, verbose=progress, save_cpu_ram=True, **source)  # in-memory images
    except OSError as e:                                        # urllib's errors (no route, DNS) are OSErrors
        if not fetch:
            raise
        raise ISUnavailable(f"IS unavailable: fetching torch-fidelity's Inception weights failed "
                            f"({str(e).splitlines()[0][:100]})") from None
    return float(metrics[torch_fidelity.KEY_METRIC_ISC_MEAN])
