import pytest
import torch

from conftest import ROOT, TINY_SEQ
from experiments.ddim_task import build_parser
from quant import adaround
from quant.calib_data import evenly_spaced_steps
from quant.checkpoint import load_quantized, save_quantized
from quant.distill import DistillConfig, LRSchedule, cache_unit_io, train_unit
from quant.methods.qdiff import AdaRoundObjective, QDiffConfig, qdiff_config, quantize_qdiff
from quant.model import QuantModel, quant_enabled
from quant.range_search import init_weight_quantizers
from quant.settings import QuantConfig

SEQ = TINY_SEQ


@pytest.fixture
def calib(tiny_trajectories):
    return evenly_spaced_steps(tiny_trajectories, 8, 3, torch.Generator().manual_seed(0))


def on_grid(layer) -> bool:
    q = layer.w_quant
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    k = layer.weight / q.delta.view(shape) + q.zero.round().view(shape)
    return bool(((k - k.round()).abs() < 1e-3).all())


def test_adaround_starts_at_the_fp_weight(tiny_unet):
    q = QuantModel(tiny_unet, QuantConfig(weight_bit=4))
    init_weight_quantizers(q)
    layer = q.model.mid.block_1.conv1
    ada = adaround.AdaRoundWeight(layer.w_quant, layer.weight)
    lo, hi = ada.delta * (ada.base.spec.qmin - ada.zero), ada.delta * (ada.base.spec.qmax - ada.zero)
    representable = torch.minimum(torch.maximum(layer.weight, lo), hi)     # the grid's range clips, as nearest does
    torch.testing.assert_close(ada(layer.weight), representable, atol=1e-3 * float(ada.delta.max()), rtol=0)


def test_adaround_ends_hard_and_on_the_grid(tiny_unet, calib):
    q = QuantModel(tiny_unet, qdiff_config(QuantConfig(weight_bit=4), QDiffConfig()))
    init_weight_quantizers(q)
    data = cache_unit_io(q, tiny_unet, "mid.block_1", calib, 16)
    objective = AdaRoundObjective(QDiffConfig(adaround_lr=1e-2))
    soft = {}

    real_finish = objective.finish

    def finish(unit):
        soft["h"] = torch.cat([r.h().detach().flatten() for r in objective.rounders])
        real_finish(unit)
    objective.finish = finish
    cfg = DistillConfig(iters=300, batch_size=8, lr_schedule=LRSchedule.CONSTANT)   # as reconstruct_weights
    log = train_unit(q, "mid.block_1", data, objective, cfg, seed=0)
    assert not log["kept_initial"]
    undecided = ((soft["h"] > 0.01) & (soft["h"] < 0.99)).float().mean()
    assert undecided < 0.1                                         # the regulariser polarised h (~all undecided at start)
    unit = q.model.mid.block_1
    assert all(type(m.w_quant).__name__ == "WeightQuantizer" for m in (unit.conv1, unit.conv2, unit.temb_proj))
    assert on_grid(unit.conv1) and on_grid(unit.conv2)
    with torch.no_grad():
        torch.testing.assert_close(unit.conv1.w_quant(unit.conv1.weight), unit.conv1.weight, rtol=0, atol=1e-6)


def test_running_stat_ranges_are_used(tiny_unet, calib, tmp_path):
    qd = QDiffConfig(weight_iters=0, act_iters=0, running_stat=True)
    running = quantize_qdiff(tiny_unet, QuantConfig(weight_bit=8, act_bit=8), calib, qd, tmp_path)
    mse = quantize_qdiff(tiny_unet, QuantConfig(weight_bit=8, act_bit=8), calib, QDiffConfig(weight_iters=0, act_iters=0),
                         tmp_path / "m")
    a, b = running.model.conv_in.a_quant[0].delta, mse.model.conv_in.a_quant[0].delta
    assert not torch.allclose(a, b)


def test_qdiff_pipeline_saves_and_reloads_identically(tiny_unet, calib, tmp_path):
    qd = QDiffConfig(weight_iters=4, act_iters=4, batch_size=8)
    q = quantize_qdiff(tiny_unet, QuantConfig(weight_bit=4, act_bit=8, split=True, a_sym=True), calib, qd, tmp_path)
    assert len(list((tmp_path / "recon_w").glob("unit_*.pt"))) == len(q.adapter.units(q.model))
    assert len(list((tmp_path / "recon_a").glob("unit_*.pt"))) == len(q.adapter.units(q.model))
    save_quantized(tmp_path / "q.pt", q, "qdiff")
    loaded, _ = load_quantized(tmp_path / "q.pt", tiny_unet)
    x, t = calib.x[:4], calib.t[:4]
    with torch.no_grad():
        assert torch.equal(loaded(x, t), q(x, t))
        with quant_enabled(q, weight=False, act=False):
            fp_equal = torch.equal(q(x, t), tiny_unet(x, t))
    assert not fp_equal                                            # AdaRound changed the weights


@pytest.mark.parametrize("extra", [
    ["--weight_bit", "4", "--quant_mode", "qdiff", "--split"],
    ["--weight_bit", "8", "--quant_mode", "qdiff", "--quant_act", "--act_bit", "8", "--a_sym", "--split"],
])
def test_seed_readme_cifar_commands_parse(extra):
    cmd = ["--config", str(ROOT / "configs" / "cifar10.yml"), "--use_pretrained", "--timesteps", "100", "--eta", "0",
           "--skip_type", "quad", "--ptq", *extra, "-l", "out", "--cali_ckpt", "q.pt", "--ckpt", "model-790000.ckpt"]
    args = build_parser().parse_args(cmd)
    assert args.quant_mode == "qdiff" and args.split and args.ptq


def test_fp_input_reaches_both_reconstruction_passes():
    from quant.methods.qdiff import _recon_cfg
    assert _recon_cfg(QDiffConfig(fp_input=1.0), 5, LRSchedule.CONSTANT).fp_input == 1.0
    assert _recon_cfg(QDiffConfig(), 5, LRSchedule.COSINE).fp_input == 0.0
    with pytest.raises(ValueError):
        QDiffConfig(fp_input=2.0)
