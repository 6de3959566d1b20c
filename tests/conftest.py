import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# reference statistics computed by tests go to a throwaway directory, never into the repo's cache/
os.environ.setdefault("DILATEQUANT_CACHE", tempfile.mkdtemp(prefix="dq-test-cache-"))
sys.path.insert(0, str(ROOT))

from ddim import UNet, UNetConfig, ddim_sample, make_betas, timestep_sequence  # noqa: E402
from ddim.config import DiffusionConfig  # noqa: E402
from quant.calib_data import Trajectories, collect_trajectories  # noqa: E402

BETAS = make_betas(DiffusionConfig())
TINY_SEQ = timestep_sequence(1000, 6, "quad")

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped where no GPU exists (CI is CPU-only)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def tiny_unet_config(**kw) -> UNetConfig:
    """A small random-weight UNet with the same architecture class (2 levels, attention at 8x8)."""
    base = dict(ch=8, out_ch=1, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), in_channels=1,
                resolution=16, dropout=0.0, num_groups=4)
    return UNetConfig(**(base | kw))


@pytest.fixture
def tiny_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(tiny_unet_config()).eval()


@pytest.fixture
def tiny_trajectories(tiny_unet) -> Trajectories:
    """Every (x_t, t) of 8 DDIM trajectories (6 quad steps) of the tiny model."""
    x_T = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    return collect_trajectories(lambda x, on_step: ddim_sample(tiny_unet, x, TINY_SEQ, BETAS, on_step=on_step), x_T)
