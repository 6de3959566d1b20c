"""Tests of the distillation studies: studies/step_size_drift.py, distill_sweep.py, unit_losses.py."""
import json

import pytest
import torch

from quant.calibrate import calibrate
from quant.distill import DistillConfig, LRSchedule, cache_unit_io, distill
from quant.model import QuantModel
from quant.settings import QuantConfig
from test_distill import calib, w4a4  # noqa: F401 (the fixture and helper of the distillation tests)


def test_step_drift_compares_the_same_quantizers_before_and_after(tiny_unet, calib, tmp_path):
    from quant.checkpoint import save_quantized
    from studies.step_size_drift import drift_report

    q = w4a4(tiny_unet, calib)
    save_quantized(tmp_path / "before.pt", q, "dilatequant[tpq]")
    calib.save(tmp_path / "calib.pt")
    name, quantizer = next((n, m.a_quant[0]) for n, m in q.quant_layers() if len(m.a_quant))
    with torch.no_grad():
        quantizer.delta[0] *= 2.0                               # one slot of one quantizer doubles
    save_quantized(tmp_path / "after.pt", q, "dilatequant[tpq]")
    report = drift_report(str(tmp_path / "before.pt"), str(tmp_path / "after.pt"), str(tmp_path / "calib.pt"))
    assert quantizer.delta.numel() > 2                          # TPQ: one slot per timestep
    assert report["per_quantizer_median_abs_log2"][f"{name}.a_quant.0"] == pytest.approx(0.0)
    assert report["all"]["moved_25pct"] == pytest.approx(1 / report["all"]["slots"])
    assert sum(v["slots"] for k, v in report.items() if k.startswith("slots with")) == report["all"]["slots"]
    assert report["weights"]["moved_10pct"] == 0.0                 # no weight step changed
    layer = next(m for _, m in q.quant_layers())
    with torch.no_grad():
        layer.w_quant.delta.mul_(1.5)                           # every out-channel of one layer: +58% in log2
    save_quantized(tmp_path / "after_w.pt", q, "dilatequant[tpq]")
    weights = drift_report(str(tmp_path / "before.pt"), str(tmp_path / "after_w.pt"))["weights"]
    n_w = sum(m.w_quant.delta.numel() for _, m in q.quant_layers())
    assert weights["slots"] == n_w and weights["moved_25pct"] == pytest.approx(layer.w_quant.delta.numel() / n_w)

    shared = calibrate(QuantModel(tiny_unet, QuantConfig(weight_bit=4, act_bit=4)), calib, batch_size=16)
    save_quantized(tmp_path / "shared.pt", shared, "dilatequant[none]")
    with pytest.raises(SystemExit, match="different activation quantizers"):
        drift_report(str(tmp_path / "before.pt"), str(tmp_path / "shared.pt"))


def test_distill_sweep_variants_and_generalisation_gap(tiny_unet, calib):
    from studies.distill_sweep import Variant, unit_gaps

    base = Variant(per_traj=1, schedule=LRSchedule.COSINE, iters=200, lr_w=1e-3, lr_q=1e-4)
    v = Variant.parse("per_traj=49,schedule=constant,iters=800", base)
    assert (v.per_traj, v.schedule, v.iters, v.lr_w) == (49, LRSchedule.CONSTANT, 800, 1e-3)
    with pytest.raises(SystemExit, match="unknown variant key"):
        Variant.parse("lr=1e-3", base)
    q = w4a4(tiny_unet, calib)
    rows = unit_gaps(q, tiny_unet, calib, calib)                 # held-out = calibration: no gap at all
    assert [r["unit"] for r in rows] == q.adapter.units(q.model)
    assert all(r["held_over_calib"] == pytest.approx(1.0) for r in rows)


def test_one_pass_unit_mse_equals_the_distillation_loss(tiny_unet, calib):
    from quant.distill import unit_loss
    from studies.distill_sweep import unit_mse

    q = w4a4(tiny_unet, calib)
    one_pass = unit_mse(q, tiny_unet, calib, batch_size=16)
    for unit in ("conv_in", "mid.block_1", "mid.attn_1", "up.0.block.1", "conv_out"):
        data = cache_unit_io(q, tiny_unet, unit, calib, 16)
        assert one_pass[unit] == pytest.approx(unit_loss(q, q.model.get_submodule(unit), data, 16), rel=1e-5)


def test_unit_losses_lines_up_runs_unit_by_unit(tiny_unet, calib, tmp_path):
    import shutil

    from studies.unit_losses import main as unit_losses

    cfg = DistillConfig(iters=2, batch_size=8)
    log = distill(w4a4(tiny_unet, calib), tiny_unet, calib, cfg, tmp_path / "a" / "distill")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "distill" / f"unit_{len(log) - 1:02d}.pt").unlink()      # b stopped one unit early
    rows = unit_losses([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "u.json")])
    assert [r["unit"] for r in rows] == [e["unit"] for e in log]
    first = rows[0][str(tmp_path / "a")]
    assert first["loss_after"] == log[0]["loss_after"] and first["after_over_first"] == 1.0
    assert rows[0][str(tmp_path / "b")]["after_over_first"] == 1.0 and rows[-1][str(tmp_path / "b")] is None
    assert len(json.loads((tmp_path / "u.json").read_text())["rows"]) == len(log)
    with pytest.raises(SystemExit, match="no distill"):
        unit_losses([str(tmp_path / "missing")])
