"""Tests of studies/calib_draw_spread.py (the spread between calibration draws of one method)."""
import json

import numpy as np
import pytest

from common.errors import UsageError


def test_calib_draw_spread_compares_draws_of_one_method(tiny_task, tmp_path):
    from studies.calib_draw_spread import main as spread

    common = ["--config", str(tiny_task / "tiny.yml"), "--ckpt", str(tiny_task / "tiny.ckpt"), "--timesteps", "5",
              "--cali_n", "16", "--per_traj", "4", "--sample_n", "4"]
    rows = spread([*common, "--seeds", "1", "1", "2", "--out", str(tmp_path / "spread.json")])
    same, other = rows[1], rows[2]
    assert same["psnr_to_fp_db"] == rows[0]["psnr_to_fp_db"] and same["steps_vs_first_max_abs_log2"] == 0
    assert other["steps_vs_first_median_abs_log2"] > 0 and np.isfinite(other["psnr_to_fp_db"])
    assert json.loads((tmp_path / "spread.json").read_text())["summary"]["psnr_max"] >= other["psnr_to_fp_db"]
    dq = spread([*common, "--method", "dilatequant", "--seeds", "1"])
    assert dq[0]["samples"] == 16
    with pytest.raises(SystemExit, match="no such file"):
        spread([*common, "--seeds", "1", "--calib", str(tmp_path / "missing.pt")])   # before any draw
    with pytest.raises(UsageError, match="give W/A"):
        spread([*common, "--bits", "4", "--seeds", "1"])
