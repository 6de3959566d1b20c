import pytest
import torch

from quant.dilation import Scaling, dilate, dilation_scale
from quant.model import QuantModel, quant_enabled
from quant.settings import QuantConfig


def test_hand_computed_scales():
    # out-channel 0: max 2.0 at k=0, min -1.0 at k=1; out-channel 1: max 4.0 at k=1, min 0.5 at k=2
    w = torch.tensor([[2.0, -1.0, 0.5, 0.25],
                      [1.0, 4.0, 0.5, 1.0]])
    s = dilation_scale(w)
    # k=0,1,2 protected; k=3: min(2.0/0.25, 4.0/1.0) = 4
    assert s.tolist() == [1.0, 1.0, 1.0, 4.0]


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_single_signed_out_channels_give_finite_scales(sign):
    torch.manual_seed(0)
    w = sign * (torch.rand(8, 16, 3, 3) + 0.1)                           # every out-channel all > 0 or all < 0
    s = dilation_scale(w)
    assert torch.isfinite(s).all() and (s >= 1).all() and (s > 1).any()
    ws = w * s.view(1, -1, 1, 1)
    torch.testing.assert_close(ws.flatten(1).amax(1), w.flatten(1).amax(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(ws.flatten(1).amin(1), w.flatten(1).amin(1), rtol=1e-6, atol=0)


def test_zero_in_channel_is_left_alone():
    w = torch.randn(4, 5)
    w[:, 2] = 0
    assert dilation_scale(w)[2] == 1.0


def out_channel_ranges(qmodel):
    return {n: (l.weight.detach().flatten(1).amax(1).clone(), l.weight.detach().flatten(1).amin(1).clone())
            for n, l in qmodel.quant_layers()}


def test_dilation_keeps_fp_outputs_and_weight_ranges(tiny_unet):
    q = QuantModel(tiny_unet, QuantConfig(weight_bit=4, act_bit=4))
    before = out_channel_ranges(q)
    scales = dilate(q)
    after = out_channel_ranges(q)
    for name, (hi, lo) in before.items():
        torch.testing.assert_close(after[name][0], hi, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(after[name][1], lo, rtol=1e-6, atol=1e-9)
    assert all((s >= 1).all() for s in scales.values())
    assert sum(int((s > 1).sum()) for s in scales.values()) > 0
    x, t = torch.randn(4, 1, 16, 16), torch.tensor([0, 100, 500, 999])
    with torch.no_grad(), quant_enabled(q, weight=False, act=False):
        torch.testing.assert_close(q(x, t), tiny_unet(x, t), rtol=1e-4, atol=1e-5)


def test_protected_in_channels_keep_scale_one(tiny_unet):
    q = QuantModel(tiny_unet, QuantConfig(weight_bit=4))
    weights = {n: l.weight.detach().clone() for n, l in q.quant_layers()}
    scales = dilate(q)
    for name, s in scales.items():
        w = weights[name].flatten(2) if weights[name].dim() > 2 else weights[name].unsqueeze(2)
        if name.endswith((".q", ".k", ".v")):
            continue                                                      # shared s: checked below
        flat = w.flatten(1)
        protected = torch.cat([flat.argmax(1), flat.argmin(1)]) // w.shape[2]
        assert (s[protected] == 1).all()


def test_qkv_share_one_scale_folded_into_the_norm(tiny_unet):
    q = QuantModel(tiny_unet, QuantConfig(weight_bit=4))
    norm_w = q.model.mid.attn_1.norm.weight.detach().clone()
    scales = dilate(q)
    a = "mid.attn_1"
    assert torch.equal(scales[f"{a}.q"], scales[f"{a}.k"]) and torch.equal(scales[f"{a}.q"], scales[f"{a}.v"])
    torch.testing.assert_close(q.model.mid.attn_1.norm.weight, norm_w / scales[f"{a}.q"])
    assert torch.equal(q.model.mid.attn_1.q.in_scale, torch.ones(16))     # folded, not in the quantizer
    assert (q.model.mid.block_1.conv1.in_scale == scales["mid.block_1.conv1"]).all()


@pytest.fixture
def calib(tiny_trajectories):
    from quant.calib_data import random_over_steps
    return random_over_steps(tiny_trajectories, 24, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", [Scaling.SMOOTHQUANT, Scaling.AWQ, Scaling.OSPLUS, Scaling.LEARNABLE])
def test_table9_alternatives_keep_fp_outputs(tiny_unet, calib, method):
    q = QuantModel(tiny_unet, QuantConfig(weight_bit=4, act_bit=4))
    scales = dilate(q, method, calib)
    assert all(torch.isfinite(s).all() and (s > 0).all() for s in scales.values())
    x, t = calib.x[:4], calib.t[:4]
    with torch.no_grad(), quant_enabled(q, weight=False, act=False):
        torch.testing.assert_close(q(x, t), tiny_unet(x, t), rtol=1e-4, atol=1e-5)


def test_smoothquant_scales_every_channel_and_awq_only_salient_ones(tiny_unet, calib):
    sq = dilate(QuantModel(tiny_unet, QuantConfig(weight_bit=4, act_bit=4)), Scaling.SMOOTHQUANT, calib)
    awq = dilate(QuantModel(tiny_unet, QuantConfig(weight_bit=4, act_bit=4)), Scaling.AWQ, calib)
    name = "mid.block_1.conv1"                                     # 16 in-channels: 1% -> 1 salient channel
    assert (sq[name] != 1).all()
    assert len(torch.unique(awq[name])) <= 2


def test_data_driven_scaling_needs_calibration_data(tiny_unet):
    with pytest.raises(ValueError, match="calibration data"):
        dilate(QuantModel(tiny_unet, QuantConfig(weight_bit=4)), Scaling.SMOOTHQUANT)


def test_table8_statistics_explain_the_range_change(tiny_unet, tiny_trajectories):
    from quant.calib_data import random_over_steps
    from tools.quant_report import dilation_stats

    data = random_over_steps(tiny_trajectories, 32, torch.Generator().manual_seed(0))
    stats = dilation_stats(tiny_unet, QuantConfig(weight_bit=4, act_bit=4), data)
    for row in stats["layers"]:
        assert row["range_ratio"] <= 1 + 1e-6                    # X/s with s >= 1 never widens the range
        if row["range_ch_protected"]:                            # the channels setting max and min keep s = 1
            assert row["range_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert 0 < stats["mean"]["frac_s_gt_1"] < 1


def test_osplus_quantizes_centred_channels_and_adds_the_shift_back(tiny_unet, calib):
    from quant.calibrate import calibrate

    q = QuantModel(tiny_unet, QuantConfig(weight_bit=8, act_bit=8))
    dilate(q, Scaling.OSPLUS, calib)
    layer = q.model.mid.block_1.conv1
    seen = {}
    layer.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    with torch.no_grad(), quant_enabled(q, weight=False, act=False):
        q(calib.x, calib.t)
    xq = layer.quantizer_input(seen["x"]).transpose(0, 1).flatten(1)      # [C, m], over the stats data
    torch.testing.assert_close(xq.amax(1), -xq.amin(1), rtol=1e-4, atol=1e-5)   # each channel centred on 0
    calibrate(q, calib)
    x, t = calib.x[:4], calib.t[:4]
    with torch.no_grad():
        err = (q(x, t) - tiny_unet(x, t)).pow(2).mean() / tiny_unet(x, t).pow(2).mean()
    assert err < 1e-2                                                      # W8A8 through the shifted path


def test_learnable_scaling_is_trained_and_saved(tiny_unet, calib, tmp_path):
    from quant.calibrate import calibrate
    from quant.checkpoint import load_quantized, save_quantized
    from quant.distill import DistillConfig, distill

    q = QuantModel(tiny_unet, QuantConfig(weight_bit=4, act_bit=4))
    dilate(q, Scaling.LEARNABLE, calib)
    calibrate(q, calib)
    distill(q, tiny_unet, calib, DistillConfig(iters=20, batch_size=8, lr_scale=1e-2), tmp_path / "d")
    gains = [m.in_gain for _, m in q.quant_layers()]
    assert all(g is not None for g in gains) and any((g != 1).any() for g in gains)
    save_quantized(tmp_path / "q.pt", q, "dilatequant[learnable]")
    back, _ = load_quantized(tmp_path / "q.pt", tiny_unet)
    x, t = calib.x[:4], calib.t[:4]
    with torch.no_grad():
        assert torch.equal(back(x, t), q(x, t))


def test_shifted_model_reloads_identically(tiny_unet, calib, tmp_path):
    from quant.calibrate import calibrate
    from quant.checkpoint import load_quantized, save_quantized

    q = QuantModel(tiny_unet, QuantConfig(weight_bit=4, act_bit=4))
    dilate(q, Scaling.OSPLUS, calib)
    calibrate(q, calib)
    save_quantized(tmp_path / "q.pt", q, "dilatequant[osplus]")
    back, _ = load_quantized(tmp_path / "q.pt", tiny_unet)
    assert back.model.mid.block_1.conv1.in_shift is not None
    x, t = calib.x[:4], calib.t[:4]
    with torch.no_grad():
        assert torch.equal(back(x, t), q(x, t))
