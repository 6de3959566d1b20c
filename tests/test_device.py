"""Everything a wrapper, calibration, dilation, distillation, bias correction or checkpoint load creates
follows the model's device and dtype; the inference forward never reads a device tensor on the host.

Checked without a GPU: on the `meta` device (which has no data, so any host read would fail) and in
float64 (so a tensor created with torch's default device/dtype stands out). Tests marked `cuda` run the
same on a real GPU and are skipped where there is none.
"""
import pytest
import torch

from conftest import BETAS, TINY_SEQ, tiny_unet_config
from ddim import UNet, ddim_sample
from quant.bias_correction import correct_eps_bias
from quant.calib_data import random_over_steps
from quant.checkpoint import load_quantized, save_quantized
from quant.dilation import Scaling, dilate
from quant.methods.dilatequant import DilateQuantConfig, quantize_dilatequant
from quant.methods.qdiff import QDiffConfig, quantize_qdiff
from quant.distill import DistillConfig
from quant.model import QuantModel, frozen
from quant.range_search import init_weight_quantizers
from quant.settings import QuantConfig

W4A4_TPQ = QuantConfig(weight_bit=4, act_bit=4, temporal=True, split=True)


def tensors(module: torch.nn.Module):
    return list(module.named_parameters()) + list(module.named_buffers())


def off_model(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Names of parameters/buffers not on `device`, or floating but not `dtype`."""
    return [f"{n} ({t.device}, {t.dtype})" for n, t in tensors(module)
            if t.device != device or (t.is_floating_point() and t.dtype != dtype)]


def test_wrapping_a_meta_model_keeps_everything_on_meta_and_runs():
    """No data on `meta`: the forward only runs if it never reads a tensor on the host (no sync)."""
    model = UNet(tiny_unet_config()).to("meta")
    q = QuantModel(model, W4A4_TPQ, schedule=TINY_SEQ)
    assert off_model(q, torch.device("meta"), torch.float32) == []
    init_weight_quantizers(q)
    for _, module in q.act_quant_modules():
        for a in module.a_quant:
            a.set_range(torch.zeros_like(a.delta), torch.ones_like(a.delta))
    x, t = torch.randn(3, 1, 16, 16, device="meta"), torch.tensor(TINY_SEQ[:3], device="meta")
    with torch.no_grad(), frozen(q):
        assert q(x, t).shape == (3, 1, 16, 16)
    assert q(x, t).shape == (3, 1, 16, 16)                                   # the autograd path too


@pytest.fixture
def model64():
    torch.manual_seed(0)
    return UNet(tiny_unet_config()).double().eval()


@pytest.fixture
def calib64(model64):
    x_T = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    xs, ts = [], []
    ddim_sample(model64, x_T, TINY_SEQ, BETAS, on_step=lambda x, t: (xs.append(x), ts.append(t)))
    from quant.calib_data import Trajectories
    return random_over_steps(Trajectories(torch.stack(xs), ts_tensor(ts)), 24, torch.Generator().manual_seed(0))


def ts_tensor(ts):
    return torch.stack([t[0] for t in ts])


def test_dilatequant_pipeline_keeps_the_model_dtype(model64, calib64, tmp_path):
    dq = DilateQuantConfig(distill=DistillConfig(iters=2, batch_size=4))
    q = quantize_dilatequant(model64, W4A4_TPQ, TINY_SEQ, calib64, dq, tmp_path, batch_size=8)
    assert off_model(q, torch.device("cpu"), torch.float64) == []
    x_T = torch.randn(4, 1, 16, 16, dtype=torch.float64)
    correct_eps_bias(q, model64, lambda m, x, generator=None: ddim_sample(m, x, TINY_SEQ, BETAS), x_T, 4)
    assert off_model(q, torch.device("cpu"), torch.float64) == []
    x, t = calib64.x[:4], calib64.t[:4]
    with torch.no_grad():
        assert q(x, t).dtype == torch.float64
    save_quantized(tmp_path / "q.pt", q, "dilatequant")
    loaded, _ = load_quantized(tmp_path / "q.pt", model64)
    assert off_model(loaded, torch.device("cpu"), torch.float64) == []
    with torch.no_grad():
        assert torch.equal(loaded(x, t), q(x, t))


@pytest.mark.parametrize("scaling", [s for s in Scaling if s is not Scaling.WEIGHT_DILATION])
def test_scaling_alternatives_keep_the_model_dtype(model64, calib64, scaling):
    q = QuantModel(model64, W4A4_TPQ, TINY_SEQ)
    dilate(q, scaling, calib64)
    assert off_model(q, torch.device("cpu"), torch.float64) == []


def test_qdiff_pipeline_keeps_the_model_dtype(model64, calib64, tmp_path):
    qd = QDiffConfig(weight_iters=2, act_iters=2, batch_size=4)
    q = quantize_qdiff(model64, QuantConfig(weight_bit=4, act_bit=4, split=True), calib64, qd, tmp_path, 8)
    assert off_model(q, torch.device("cpu"), torch.float64) == []


@pytest.mark.cuda
def test_dilatequant_on_cuda_matches_cpu(tiny_unet, tiny_trajectories, tmp_path):
    calib = random_over_steps(tiny_trajectories, 24, torch.Generator().manual_seed(0))
    dq = DilateQuantConfig(distill=DistillConfig(iters=3, batch_size=4))
    cpu = quantize_dilatequant(tiny_unet, W4A4_TPQ, TINY_SEQ, calib, dq, tmp_path / "cpu", batch_size=8)
    gpu = quantize_dilatequant(tiny_unet.cuda(), W4A4_TPQ, TINY_SEQ, calib, dq, tmp_path / "gpu", batch_size=8)
    assert off_model(gpu, torch.device("cuda", 0), torch.float32) == []
    x, t = calib.x[:6], calib.t[:6]
    with torch.no_grad(), frozen(gpu):
        out = gpu(x.cuda(), t.cuda()).cpu()
    with torch.no_grad():
        ref = cpu(x, t)
    assert (out - ref).abs().mean() < 0.05 * ref.abs().mean()


def test_bench_sampling_rounds_report_medians(tmp_path, monkeypatch):
    """tools/bench_sampling.py --rounds: every row timed in rotation, the table holds each row's medians."""
    import json
    from conftest import ROOT
    from tools import bench_sampling
    monkeypatch.chdir(ROOT)
    out = tmp_path / "speed.json"
    bench_sampling.main(["--config", "configs/mnist.yml", "--batch", "2", "--repeats", "1", "--warmup", "0",
                         "--rounds", "3", "--device", "cpu", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["FP32", "FP32 + autocast bfloat16", "fake-quant W8A8 TPQ", "fake-quant W4A4 TPQ",
                                         "int W8A8 TPQ", "int W4A4 TPQ", "int W4A8 TPQ"]
    for row in rows:
        assert len(row["rounds"]) == 3 and row["ms_per_image"] == sorted(row["rounds"])[1]
    assert rows[0]["x_fp32"] == 1.0
