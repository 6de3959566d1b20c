import pytest
import torch

from common.errors import UsageError
from conftest import ROOT
from ddim import UNet, load_config
from tools.model_cost import cost, count_macs


@pytest.fixture(scope="module")
def cifar():
    cfg = load_config(ROOT / "configs" / "cifar10.yml")
    model = UNet(cfg.model).eval()
    return model, count_macs(model, torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("w, a, size_mb, tbops", [(32, 32, 143.0, 6.2), (6, 6, 27.0, 0.2), (4, 4, 18.1, 0.1)])
def test_cifar10_size_and_bops_match_paper_table_1(cifar, w, a, size_mb, tbops):
    model, macs = cifar
    c = cost(model, macs, w, a)
    assert round(c["size_mb"], 1) == size_mb
    assert round(c["tbops_no_matmul"], 1) == tbops
    assert c["tbops"] > c["tbops_no_matmul"]


def test_bit_pairs_parse_or_fail_with_the_fix():
    from tools.common import parse_bits

    assert parse_bits("4/8") == (4, 8) and parse_bits("32/32") == (32, 32)
    for bad in ("4", "4/", "w4/a4", "4/4/4"):
        with pytest.raises(UsageError, match="give W/A"):
            parse_bits(bad)
