import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
# reference statistics computed by tests go to a throwaway directory, never into the repo's cache/
os.environ.setdefault("DILATEQUANT_CACHE", tempfile.mkdtemp(prefix="dq-test-cache-"))
sys.path.insert(0, str(ROOT))

from ddim import UNet, UNetConfig, ddim_sample, make_betas, timestep_sequence  # noqa: E402
from ddim.config import DiffusionConfig  # noqa: E402
from ddim.data import mnist_uint8  # noqa: E402
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


COMMON = ["--timesteps", "4", "--max_images", "12", "--batch_size", "6", "--seed", "3"]


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    raw = yaml.safe_load((ROOT / "configs" / "mnist.yml").read_text())
    raw["model"].update(ch=8, ch_mult=[1, 2], attn_resolutions=[14], num_groups=4)
    raw["ckpt"] = None
    (d / "tiny.yml").write_text(yaml.safe_dump(raw))
    torch.manual_seed(0)
    cfg = tiny_unet_config(resolution=28, attn_resolutions=(14,))
    torch.save(UNet(cfg).state_dict(), d / "tiny.ckpt")
    np.savez(d / "ref.npz", arr_0=mnist_uint8()[:40])
    return d


def run(task, logdir, *extra):
    """experiments.ddim_task.main on the tiny task's config and checkpoint."""
    from experiments.ddim_task import main
    return main(["--config", str(task / "tiny.yml"), "--ckpt", str(task / "tiny.ckpt"), "-l", str(logdir),
                 *COMMON, *extra])


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A random-weight CLIP (2 layers per tower, width 32) with its tokenizer and image processor, saved as a
    Hugging Face folder: what --clip_model PATH reads."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from test_ldm_encoders import write_tiny_tokenizer
    d = tmp_path_factory.mktemp("clip")
    write_tiny_tokenizer(d / "tok")
    tokenizer = CLIPTokenizer(str(d / "tok" / "vocab.json"), str(d / "tok" / "merges.txt"))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    torch.manual_seed(0)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(d / "model")
    processor.save_pretrained(d / "model")
    return d / "model"
