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

from ddim import UNet, UNetConfig  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_unet_config(**kw) -> UNetConfig:
    """A small random-weight UNet with the same architecture class (2 levels, attention at 8x8)."""
    base = dict(ch=8, out_ch=1, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), in_channels=1,
                resolution=16, dropout=0.0, num_groups=4)
    return UNetConfig(**(base | kw))


@pytest.fixture
def tiny_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(tiny_unet_config()).eval()
