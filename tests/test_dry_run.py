"""tools/dry_run.py: the plan of a real-scale run from the config alone (meta device) — layer and unit counts,
cache sizes checked by hand, the timed iteration on a tiny config, and the paper's calibration sizes by default."""
import math

import pytest
import torch.nn as nn
import yaml

from common.errors import UsageError
from conftest import ROOT
from tools.tiny_ldm import tiny_config
from ldm.util import instantiate_from_config, load_config
from tools.dry_run import main

# config, the paper's calibration size, UNet parameters (M) and conv+linear layers (SPEC §9), the unit with the
# largest cache, input (= output) blocks
PUBLIC = [("latent-diffusion/lsun_bedrooms-ldm-vq-4", 5120, 274.06, 123, "output_blocks.9", 12),
          ("latent-diffusion/lsun_churches-ldm-kl-8", 5120, 294.97, 168, "output_blocks.12", 15),
          ("latent-diffusion/cin256-v2", 1024, 400.92, 283, "output_blocks.9", 12),
          ("stable-diffusion/v1-inference", 512, 859.52, 282, "output_blocks.9", 12)]


def test_full_size_plans_without_weights(tmp_path):
    out = tmp_path / "plan.md"
    paths = [str(ROOT / "configs" / f"{c}.yaml") for c, *_ in PUBLIC]
    rows = main(["--config", *paths, "--no_time", "--out", str(out)])
    for row, (config, cali_n, params_m, layers, largest, blocks) in zip(rows, PUBLIC):
        assert row["cali_n"] == cali_n and round(row["params_m"], 2) == params_m
        assert row["quant_layers"] == row["weight_layers"] == layers and row["unquantized"] == []
        assert row["units"] == (["time_embed"] + [f"input_blocks.{i}" for i in range(blocks)] + ["middle_block"]
                                + [f"output_blocks.{i}" for i in range(blocks)] + ["out"])
        assert row["largest"] == largest and "time" not in row
        assert row["cache_gb"]["float32"] == pytest.approx(2 * row["cache_gb"]["float16"])
        assert row["size_mb"]["W32A32"] == pytest.approx(params_m * 4, abs=0.03)
        assert row["size_mb"]["W32A32"] > row["size_mb"]["W6A6"] > row["size_mb"]["W4A4"]
    sd = rows[-1]                                # cat([h, skip]) 960x64x64, emb 1280, context 77x768 -> 320x64x64
    per_sample = 960 * 64 * 64 + 1280 + 77 * 768 + 320 * 64 * 64
    assert sd["context"] == {"context": (77, 768)} and rows[2]["context"] == {"context": (1, 512)}
    assert rows[0]["context"] == {} and sd["cache_gb"]["float32"] == pytest.approx(512 * per_sample * 4 / 2 ** 30)
    assert [r["peak_unit"] for r in rows] == [r["largest"] for r in rows]     # at the paper's sizes: the cache
    assert sd["training_gb"] > 3 * 4 * sd["peak_unit_trained_m"] * 1e6 / 2 ** 30      # + the initial state copy
    peak = sd["fp_gb"] + sd["quant_gb"] + sd["training_gb"] + sd["cache_gb"]["float16"]
    assert sd["peak_gb"]["float16"] == pytest.approx(peak)
    text = out.read_text()
    assert text.splitlines()[2].strip() == "python tools/dry_run.py --config " + " ".join(paths) + " --no_time --out " \
        + str(out)
    assert "| v1-inference | 859.52 | 282 | 282 |" in text


def test_tiny_config_is_timed_in_seconds(tmp_path):
    cfg = tiny_config(load_config(ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"))
    path = tmp_path / "tiny-sd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    (row,) = main(["--config", str(path), "--cali_n", "64", "--steps", "10", "--time_batch", "2", "--time_iters", "1",
                   "--out", str(tmp_path / "plan.md")])
    unet = instantiate_from_config(cfg["model"]["params"]["unet_config"])
    assert row["params_m"] == sum(p.numel() for p in unet.parameters()) / 1e6
    assert row["quant_layers"] == sum(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) for m in unet.modules())
    assert row["context"] == {"context": (77, 32)} and row["steps"] == 10
    elements = sum(math.prod(s) for s in row["largest_shapes"])            # inputs + output, per sample
    assert row["cache_gb"]["float32"] == pytest.approx(64 * elements * 4 / 2 ** 30)
    timing = row["time"]
    assert timing["batch"] == 2 and timing["seconds"] > 0 and timing["saved_gb"] > 0 and timing["transient_gb"] >= 0
    assert timing["seconds_32"] == pytest.approx(16 * timing["seconds"])
    assert "LINEAR EXTRAPOLATION" in (tmp_path / "plan.md").read_text()


def test_other_configs_need_their_calibration_size(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(tiny_config(load_config(ROOT / "configs" / "latent-diffusion" / "cin256-v2.yaml"))))
    with pytest.raises(UsageError, match="--cali_n"):
        main(["--config", str(path), "--no_time"])
    with pytest.raises(UsageError, match="one per --config"):
        main(["--config", str(path), str(path), str(path), "--cali_n", "1", "2", "--no_time"])


@pytest.mark.slow
@pytest.mark.parametrize("config", [c for c, *_ in PUBLIC], ids=[c.split("/")[-1] for c, *_ in PUBLIC])
def test_a_full_size_smoke_run_agrees_with_the_plan(config, tmp_path):
    """Issue 31: the full architecture with random weights through every stage (DilateQuant W4A4 and Q-Diffusion
    W4A8: calibrate, dilate, distil, save, reload, sample and decode one image), in fresh processes, and the
    measured peak memory and seconds per iteration within 25% of the dry run's for the same settings."""
    from tools.dry_run import TOLERANCE, smoke_against_plan
    result = smoke_against_plan(ROOT / "configs" / f"{config}.yaml", tmp_path)
    for method, run in result["runs"].items():
        assert run["image_shape"][0] == 1, method
        assert abs(run["quantization_peak_gb"] / result["planned_peak_gb"] - 1) <= TOLERANCE, (method, result)
    dq = result["runs"]["dilatequant"]
    assert abs(dq["seconds_per_iteration"] / result["planned_seconds"] - 1) <= TOLERANCE, result


def test_stage_memory_records_each_stage_and_keeps_nested_calls_in_theirs():
    """tools/smoke_run.StageMemory: the high-water mark of each watched call, relative to the baseline; a watched
    function called inside another watched one is part of the outer stage, not a stage of its own."""
    import types
    import sys
    import torch
    from tools.smoke_run import StageMemory, memory_gb
    module = types.ModuleType("stage_memory_probe")

    def inner():
        block = torch.ones(64 * 2 ** 20 // 4)           # 64 MiB, touched, then freed
        return float(block[-1])

    def outer():
        return inner() + 1
    module.inner, module.outer = inner, outer
    sys.modules[module.__name__] = module
    try:
        stages = StageMemory(memory_gb("VmRSS"))
        with stages.watching(module.__name__, ("inner", "outer")):
            assert module.outer() == 2.0
            with stages.stage("small"):
                pass
        assert module.inner is inner                    # restored
    finally:
        del sys.modules[module.__name__]
    assert [r["stage"] for r in stages.records] == ["outer", "small"]
    big, small = stages.records
    assert big["peak_gb"] - big["rss_before_gb"] >= 0.055 and small["peak_gb"] - small["rss_before_gb"] < 0.03


def test_a_smoke_run_starts_from_an_empty_directory(tmp_path):
    """Units a previous run left would be reloaded instead of trained: a smoke run's own directory is cleared, any
    other non-empty one refused."""
    from tools.smoke_run import MARKER, fresh_directory
    out = tmp_path / "smoke"
    fresh_directory(out)
    (out / "distill").mkdir()
    (out / "distill" / "unit_00.pt").write_bytes(b"old")
    fresh_directory(out)
    assert sorted(p.name for p in out.iterdir()) == [MARKER]
    other = tmp_path / "mine"
    other.mkdir()
    (other / "results.json").write_text("{}")
    with pytest.raises(UsageError, match="not empty"):
        fresh_directory(other)
    assert (other / "results.json").exists()


def test_watching_a_function_that_does_not_exist_is_one_line_naming_it():
    from tools.smoke_run import StageMemory
    stages = StageMemory(0.0)
    with pytest.raises(UsageError, match="no function not_there"):
        with stages.watching("quant.distill", ("train_stages", "not_there")):
            pass
    with pytest.raises(UsageError, match="cannot watch"):
        with stages.watching("quant.no_such_module", ("f",)):
            pass
