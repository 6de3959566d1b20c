"""Tests of studies/sample_drift.py and band_fid.py (sample drift of a saved checkpoint, band FID)."""
import pytest

import torch

from ddim import make_betas
from ddim.config import DiffusionConfig
from quant.calib_data import CalibSet, random_over_steps
from quant.checkpoint import save_quantized
from quant.methods.baseline import quantize_baseline
from quant.settings import QuantConfig
from test_quant_model import trajectories  # noqa: F401 (fixtures)


def saved_tiny_checkpoint(tool, tiny_unet, trajectories, path, monkeypatch, weight_bit, timesteps) -> CalibSet:
    """A baseline W`weight_bit`A4 checkpoint of the tiny model at `path`, and `tool` (a tools/ module) made to
    load the tiny model as its FP network. Returns the calibration set."""
    calib = random_over_steps(trajectories, 32, torch.Generator().manual_seed(0))
    q = quantize_baseline(tiny_unet, QuantConfig(weight_bit=weight_bit, act_bit=4), calib, batch_size=16)
    save_quantized(path, q, "baseline", timesteps=timesteps, skip_type="quad")
    monkeypatch.setattr(tool, "load_config", lambda _: type("C", (), {"channels": 1, "image_size": 16,
                                                                       "diffusion": DiffusionConfig()})())
    monkeypatch.setattr(tool, "load_unet", lambda cfg, ckpt: tiny_unet)
    return calib


def test_sample_drift_measures_a_saved_checkpoint(tiny_unet, trajectories, tmp_path, monkeypatch):
    import studies.sample_drift as sd
    calib = saved_tiny_checkpoint(sd, tiny_unet, trajectories, tmp_path / "q.pt", monkeypatch, 8, 8)
    calib.save(tmp_path / "calib.pt")
    report = sd.main([str(tmp_path / "q.pt"), "--n", "2", "--research_acts", "--eps_bias"])
    row = report["runs"][str(tmp_path / "q.pt")]
    assert sum(band["n"] for band in row["eps bias on calib.pt"].values()) == 32
    assert row["method"] == "baseline"
    assert row["weights only"]["sample_sqnr_db"] > row["as saved"]["sample_sqnr_db"]    # A4 costs more than W8
    assert 0 <= row["as saved"]["zero_share"] <= 1 and 0 <= row["as saved"]["faint_share"] <= 1
    assert row["saved / re-searched step"]["min"] > 0 and "activation ranges re-searched" in row


def test_eps_bias_separates_a_constant_shift_from_noise():
    import studies.sample_drift as sd
    x, t = torch.randn(64, 1, 4, 4), torch.arange(64) * 15           # t from 0 to 945, every band
    a_bar = torch.linspace(0.999, 0.01, 1000)
    fp = lambda x, t: x                                                # noqa: E731
    shifted = sd.eps_bias(fp, lambda x, t: x + 0.1, CalibSet(x, t), a_bar, batch=16)
    for band in shifted.values():
        assert band["eps_mean_err"] == pytest.approx(0.1) and band["bias_share"] == pytest.approx(1.0)
        assert band["x0_shift_px"] < 0                                 # eps too large -> x_0 predicted darker
    small_t = shifted["t in [0, 10)"]                                  # t = 0 only: a_bar = 0.999
    assert small_t["x0_shift_px"] == pytest.approx(-0.1 * 127.5 * (0.001 / 0.999) ** 0.5, rel=1e-4)
    noisy = sd.eps_bias(fp, lambda x, t: x + 0.1 * torch.randn_like(x), CalibSet(x, t), a_bar)
    assert all(band["bias_share"] < 0.3 for band in noisy.values())


def test_band_fid_quantizes_only_inside_its_band(tiny_unet, trajectories, tmp_path, monkeypatch):
    import numpy as np

    import studies.band_fid as bf
    ones, zeros = (lambda x, t: torch.ones_like(x)), (lambda x, t: torch.zeros_like(x))   # noqa: E731
    routed = bf.BandModel(zeros, ones, 0, 50)(torch.zeros(4, 1, 2, 2), torch.tensor([0, 49, 50, 300]))
    assert routed.flatten(1).mean(1).tolist() == [1.0, 1.0, 0.0, 0.0]
    saved_tiny_checkpoint(bf, tiny_unet, trajectories, tmp_path / "q.pt", monkeypatch, 4, 6)
    seen = {}

    def fake_evaluate(images, ref):                 # Inception is tested elsewhere; here: what reaches it
        seen[len(seen)] = images
        return {"fid": float(images.mean()), "sfid": 0.0, "is": None}

    monkeypatch.setattr(bf, "evaluate", fake_evaluate)
    fp_images = bf.generate(tiny_unet, bf.make_sampler(make_betas(DiffusionConfig()), 6, "quad", 0.0), 4,
                            (1, 16, 16), 4, 1234, torch.device("cpu"))[0]
    np.savez(tmp_path / "fp.npz", arr_0=fp_images)
    argv = [str(tmp_path / "q.pt"), "--n", "4", "--batch_size", "4", "--fp_npz", str(tmp_path / "fp.npz"),
            "--out", str(tmp_path / "b.json"), "--bands", "0:1000", "2000:3000"]
    report = bf.main(argv)
    inside, outside = report["bands"]["0:1000"], report["bands"]["2000:3000"]
    assert inside["quantized_calls"] == 6 and outside["quantized_calls"] == 0
    assert np.isinf(outside["psnr_to_fp_median_db"]) and np.isfinite(inside["psnr_to_fp_median_db"])
    assert not np.array_equal(seen[0], seen[1]) and np.array_equal(seen[1], fp_images)
    assert bf.main(argv)["bands"] == report["bands"] and len(seen) == 2          # rerun: both bands reused
    with pytest.raises(SystemExit, match="lo:hi"):
        bf.main(argv[:-2] + ["50-200"])
