import pytest
import torch

from common.errors import CheckpointError, ConfigError
from conftest import ROOT, tiny_unet_config
from ddim import UNet, load_config
from ddim.checkpoint import load_strict, load_unet

KEYS_FILE = ROOT / "tests" / "data" / "ddim_cifar10_keys.txt"


def public_keys() -> list[tuple[str, tuple[int, ...]]]:
    rows = [line.split("\t") for line in KEYS_FILE.read_text().splitlines() if line and not line.startswith("#")]
    return [(k, tuple(int(d) for d in s.split(","))) for k, s in rows]


def test_cifar10_matches_public_checkpoint_layout():
    model = UNet(load_config(ROOT / "configs" / "cifar10.yml").model)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == public_keys()
    assert abs(sum(p.numel() for p in model.parameters()) - 35.7e6) < 0.1e6


def test_public_layout_loads_strictly(tmp_path):
    cfg = load_config(ROOT / "configs" / "cifar10.yml")
    state = {k: torch.zeros(s) for k, s in public_keys()}
    torch.save(state, tmp_path / "model-790000.ckpt")
    model = load_unet(cfg, tmp_path / "model-790000.ckpt")
    assert all(float(p.detach().abs().sum()) == 0 for p in model.parameters())


@pytest.mark.parametrize("corrupt, expected", [
    (lambda s: s.pop("conv_out.bias"), "missing \\(1\\): conv_out.bias"),
    (lambda s: s.__setitem__("extra.weight", torch.zeros(1)), "unexpected \\(1\\): extra.weight"),
    (lambda s: s.__setitem__("conv_in.bias", torch.zeros(3)), "shape \\(1\\): conv_in.bias"),
])
def test_mismatched_checkpoint_is_a_clear_error(tiny_unet, corrupt, expected):
    state = dict(tiny_unet.state_dict())
    corrupt(state)
    with pytest.raises(ValueError, match=expected):
        load_strict(UNet(tiny_unet.cfg), state, "ckpt.pt", "hint")


def test_missing_checkpoint_names_the_fix(tmp_path):
    cfg = load_config(ROOT / "configs" / "cifar10.yml")
    with pytest.raises(CheckpointError, match="--ckpt"):
        load_unet(cfg)
    with pytest.raises(CheckpointError, match="--ckpt"):
        load_unet(cfg, tmp_path / "nope.ckpt")


def test_bad_configs_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="configs/"):
        load_config(tmp_path / "missing.yml")
    with pytest.raises(ValueError, match="num_groups"):
        tiny_unet_config(ch=6)
    bad = tmp_path / "bad.yml"
    bad.write_text((ROOT / "configs" / "mnist.yml").read_text().replace("ch: 32", "chh: 32"))
    with pytest.raises(ValueError, match="unknown keys \\['chh'\\]"):
        load_config(bad)


def test_embedded_config_loads_shipped_checkpoint():
    cfg = load_config(ROOT / "configs" / "mnist.yml")
    if not (ROOT / cfg.ckpt).exists():
        pytest.skip("embedded checkpoint not trained yet")
    model = load_unet(cfg, ROOT / cfg.ckpt)
    eps = model(torch.randn(2, 1, 28, 28), torch.tensor([0, 999]))
    assert eps.shape == (2, 1, 28, 28) and torch.isfinite(eps).all()


def test_forward_shapes_and_timestep_dependence(tiny_unet):
    x = torch.randn(3, 1, 16, 16)
    a = tiny_unet(x, torch.tensor([0, 10, 500]))
    b = tiny_unet(x, torch.tensor([1, 10, 500]))
    assert a.shape == x.shape
    assert not torch.equal(a[0], b[0]) and torch.equal(a[1:], b[1:])
