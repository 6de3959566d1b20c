"""Tests of studies/fid_perturb.py (FID under pixel noise and a floor on faint pixels)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from evaluation import fid as metrics
from studies import fid_perturb


def test_pixel_noise_and_floor_are_exact_and_seeded():
    images = np.array([0, 1, 8, 9, 128, 255], np.uint8).reshape(1, 2, 3, 1)
    np.testing.assert_array_equal(fid_perturb.floor_faint(images, 8).ravel(), [0, 0, 0, 9, 128, 255])
    np.testing.assert_array_equal(fid_perturb.add_pixel_noise(images, 0.0, 1), images)
    a, b = (fid_perturb.add_pixel_noise(np.full((64, 8, 8, 1), 128, np.uint8), 2.0, s) for s in (1, 1))
    assert a.dtype == np.uint8 and np.array_equal(a, b) and 1.5 < a.astype(float).std() < 2.5
    edge = fid_perturb.add_pixel_noise(np.zeros((4, 8, 8, 1), np.uint8), 3.0, 0)
    assert edge.min() == 0 and (edge > 0).any()                  # clipped at black, not wrapped
    with pytest.raises(ValueError, match="standard deviation"):
        fid_perturb.add_pixel_noise(images, -1.0, 0)
    with pytest.raises(ValueError, match="outside 0..255"):
        fid_perturb.floor_faint(images, 300)


def test_fid_perturb_cli_grows_with_noise(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 40, size=(64, 4, 4, 1), dtype=np.uint8)
    np.savez(tmp_path / "base.npz", base)
    np.savez(tmp_path / "other.npz", base // 2)

    class FakeExtractor:                 # 4-d "features": the first pixels of each image
        def __init__(self, device):
            pass

        def __call__(self, images, batch_size=50, progress=True):
            feats = images.reshape(len(images), -1)[:, :4].astype(np.float64)
            return metrics.Features(pool=feats, spatial=feats[:, :3])

    monkeypatch.setattr(fid_perturb, "InceptionExtractor", FakeExtractor)
    monkeypatch.setattr(fid_perturb, "reference_stats",
                        lambda ref, extractor, cache_dir: metrics.feature_stats(extractor(base)))
    out = tmp_path / "perturb.json"
    report = fid_perturb.main([str(tmp_path / "base.npz"), "--noise", "1", "8", "--floor", "8",
                               "--floor_runs", str(tmp_path / "other.npz"), "--out", str(out)])
    rows = report["runs"][str(tmp_path / "base.npz")]
    assert rows["as is"]["fid"] == pytest.approx(0.0, abs=1e-6)
    assert 0 < rows["noise sigma 1"]["fid"] < rows["noise sigma 8"]["fid"]
    other = report["runs"][str(tmp_path / "other.npz")]
    assert set(other) == {"as is", "floor 1..8 to 0"}
    assert other["floor 1..8 to 0"]["zero_share"] > other["as is"]["zero_share"]
    assert json.loads(out.read_text())["runs"].keys() == report["runs"].keys()
    with pytest.raises(FileNotFoundError):
        fid_perturb.main([str(tmp_path / "missing.npz")])
