"""Runs never lie and never lose work (issue 21): every case below once exited 0 with wrong output or a wrong
record, lost finished work, or died in a raw traceback. Each test is one such case, on a tiny random-weight model."""
import errno
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from common.errors import CheckpointError, DiskFull, LogdirLocked, NonFiniteError, UsageError
from common.files import atomic_torch_save
from conftest import COMMON, ROOT, run, tiny_unet_config
from ddim import UNet
from experiments.ddim_task import main
from experiments.runtime import locked

W8A8 = ["--ptq", "--quant_mode", "baseline", "--weight_bit", "8", "--quant_act", "--act_bit", "8", "--cali_n", "16",
        "--no_fid"]


def argv(task, logdir, *extra, ckpt=None):
    return ["--config", str(task / "tiny.yml"), "--ckpt", str(ckpt or task / "tiny.ckpt"), "-l", str(logdir),
            *COMMON, *extra]


def test_a_checkpoint_of_other_bits_is_refused_naming_both(tiny_task, tmp_path):
    run(tiny_task, tmp_path / "w8a8", *W8A8)
    w4a4 = [a if a != "8" else "4" for a in W8A8]
    with pytest.raises(UsageError, match=r"--weight_bit = 8, but this run has 4"):
        run(tiny_task, tmp_path / "as_w4a4", *w4a4, "--cali_ckpt", str(tmp_path / "w8a8" / "quantized.pt"))
    rec = run(tiny_task, tmp_path / "reload", *W8A8, "--cali_ckpt", str(tmp_path / "w8a8" / "quantized.pt"))
    made = rec["quantized_from"]                                         # results.json says what the model is
    assert (made["weight_bit"], made["act_bit"], made["method"]) == (8, 8, "baseline") and len(made["sha256"]) == 64


@pytest.mark.parametrize("flags, message", [
    (["--eta", "2"], r"--eta 2.0 is out of range: use \[0, 1\]"),
    (["--eta", "-1"], r"--eta -1.0 is out of range"),
    (["--max_images", "0"], r"--max_images 0 is out of range: use >= 1"),
    (["--max_images", "-1"], r"--max_images -1 is out of range"),
    (["--timesteps", "0"], r"--timesteps 0 is out of range: use 1..1000"),
    (["--weight_bit", "44", "--ptq"], r"--weight_bit 44 is out of range: use 2..8"),
    (["--ptq", "--sm_abit", "12"], r"--sm_abit 12 is out of range: use 2..8 or 16"),
    (["--ptq", "--cali_n", "0"], r"--cali_n 0 is out of range"),
    (["--ptq", "--quant_mode", "dilatequant", "--distill_fp_input", "1.5"],
     r"--distill_fp_input 1.5 is out of range: use 0..1"),
    (["--ptq", "--distill_fp_input", "1"],
     r"--distill_fp_input 1.0 is a setting of qdiff and dilatequant, not of baseline"),
    (["--ptq", "--quant_mode", "qdiff", "--bkd_training", "staged"],
     r"--bkd_training staged is a setting of dilatequant, not of qdiff"),
])
def test_flags_out_of_range_fail_before_any_write(tiny_task, tmp_path, flags, message):
    with pytest.raises(UsageError, match=message):
        main(argv(tiny_task, tmp_path / "x", "--no_fid", *flags))
    assert not (tmp_path / "x").exists()


def test_a_nan_weight_in_the_checkpoint_is_refused(tiny_task, tmp_path):
    state = torch.load(tiny_task / "tiny.ckpt")
    state["conv_out.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.ckpt")
    with pytest.raises(CheckpointError, match="NaN/inf values in 1 tensor.*conv_out.weight"):
        main(argv(tiny_task, tmp_path / "x", "--no_fid", ckpt=tmp_path / "nan.ckpt"))
    assert not (tmp_path / "x" / "results.json").exists()


def test_an_inf_reaching_a_quantizer_never_makes_its_range_infinite(tiny_unet):
    from quant.calib_data import CalibSet
    from quant.calibrate import calibrate
    from quant.model import QuantModel
    from quant.settings import QuantConfig
    x, t = torch.randn(8, 1, 16, 16), torch.tensor([0, 10, 20, 30] * 2)
    x[3, 0, 5, 5] = float("inf")
    q = calibrate(QuantModel(tiny_unet, QuantConfig(weight_bit=4, act_bit=4, temporal=True), [0, 10, 20, 30]),
                  CalibSet(x, t))
    deltas = torch.cat([a.delta for _, m in q.act_quant_modules() for a in m.a_quant])
    assert bool(torch.isfinite(deltas).all())
    with torch.no_grad():
        assert bool(torch.isfinite(q(x[:2], t[:2])).all())


def test_nan_samples_are_never_saved_or_scored(tiny_task, tmp_path, monkeypatch):
    import ddim.sampling
    real = ddim.sampling.ddim_sample
    monkeypatch.setattr(ddim.sampling, "ddim_sample", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(NonFiniteError, match="NaN/inf"):
        main(argv(tiny_task, tmp_path / "x", "--ref", str(tiny_task / "ref.npz")))
    assert not (tmp_path / "x" / "results.json").exists() and not (tmp_path / "x" / "samples.npz").exists()


def test_a_checkpoint_replaced_at_the_same_path_is_a_new_input(tiny_task, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    shutil.copy(tiny_task / "tiny.ckpt", ckpt)
    first = main(argv(tiny_task, tmp_path / "q", *W8A8, ckpt=ckpt))
    a = np.load(tmp_path / "q" / "samples.npz")["arr_0"]
    torch.manual_seed(1)
    torch.save(UNet(tiny_unet_config(resolution=28, attn_resolutions=(14,))).state_dict(), ckpt)
    second = main(argv(tiny_task, tmp_path / "q", *W8A8, "--overwrite", ckpt=ckpt))
    assert second["inputs"]["ckpt"] != first["inputs"]["ckpt"]
    assert not np.array_equal(np.load(tmp_path / "q" / "samples.npz")["arr_0"], a)     # recalibrated, resampled
    calib = torch.load(tmp_path / "q" / "calib.pt")
    assert calib["meta"]["key"]["ckpt"] == second["inputs"]["ckpt"]                   # redrawn from the new model


def test_a_rerun_with_other_settings_leaves_nothing_stale(tiny_task, tmp_path):
    logdir = tmp_path / "r"
    run(tiny_task, logdir, "--ref", str(tiny_task / "ref.npz"))
    assert len(list((logdir / "images").glob("*.png"))) == 12
    rec = run(tiny_task, logdir, "--no_fid", "--timesteps", "5", "--eta", "1", "--max_images", "3", "--overwrite")
    saved = json.loads((logdir / "results.json").read_text())
    assert "fid" not in saved and saved["steps"] == 5 and saved == json.loads(json.dumps(rec, default=str))
    assert len(list((logdir / "images").glob("*.png"))) == 3


def test_run_task_skips_only_runs_with_the_same_settings_and_inputs(tiny_task, tmp_path):
    from experiments.task import is_done
    run_args, task = argv(tiny_task, tmp_path / "t", "--no_fid"), {}
    assert not is_done(task, run_args, tmp_path / "t" / "results.json")
    main(run_args)
    assert is_done(task, run_args, tmp_path / "t" / "results.json")
    assert not is_done(task, run_args + ["--eta", "0.5"], tmp_path / "t" / "results.json")


def test_a_second_run_on_a_locked_logdir_gets_one_line_naming_the_holder(tiny_task, tmp_path):
    logdir = tmp_path / "busy"
    with locked(logdir):
        with pytest.raises(LogdirLocked, match=f"being written by pid {os.getpid()}"):
            run(tiny_task, logdir, *W8A8)
    run(tiny_task, logdir, *W8A8)                                          # free again once the holder is done


def test_a_typo_on_a_finished_logdir_deletes_and_overwrites_nothing(tiny_task, tmp_path):
    q = ["--ptq", "--quant_mode", "dilatequant", "--weight_bit", "4", "--quant_act", "--act_bit", "4", "--cali_n", "16",
         "--cali_iters", "2", "--distill_batch_size", "4", "--no_fid"]
    logdir = tmp_path / "dq"
    run(tiny_task, logdir, *q)
    before = {p: p.read_bytes() for p in logdir.rglob("*") if p.is_file()}
    with pytest.raises(UsageError, match="--weight_bit 44"):
        run(tiny_task, logdir, *q, "--weight_bit", "44")
    assert {p: p.read_bytes() for p in logdir.rglob("*") if p.is_file()} == before


def test_an_interrupted_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "calib.pt"
    atomic_torch_save({"x": 1}, path)

    class Killed(BaseException):
        pass

    def killed(obj, f):
        open(f, "wb").write(b"half")
        raise Killed
    real = torch.save
    torch.save = killed
    try:
        with pytest.raises(Killed):
            atomic_torch_save({"x": 2}, path)
    finally:
        torch.save = real
    assert torch.load(path) == {"x": 1} and [p.name for p in tmp_path.iterdir()] == ["calib.pt"]


def test_a_full_disk_says_so_and_leaves_no_temp(tiny_task, tmp_path, monkeypatch):
    def full(obj, f):
        open(f, "wb").write(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFull, match="disk full while writing .*calib.pt"):
        run(tiny_task, tmp_path / "full", *W8A8)
    assert not [p for p in (tmp_path / "full").rglob("*") if ".tmp" in p.name]


@pytest.mark.parametrize("flag", ["--ckpt", "--cali_ckpt"])
def test_a_truncated_or_foreign_checkpoint_is_one_line(tiny_task, tmp_path, flag):
    data = (tiny_task / "tiny.ckpt").read_bytes()
    (tmp_path / "half.ckpt").write_bytes(data[:len(data) // 2])
    (tmp_path / "text.ckpt").write_text("not a checkpoint\n")
    for bad in ("half.ckpt", "text.ckpt"):
        extra = ["--ckpt", str(tmp_path / bad)] if flag == "--ckpt" else [*W8A8, "--cali_ckpt", str(tmp_path / bad)]
        with pytest.raises(CheckpointError, match=f"{flag} .*{bad} is not a readable PyTorch checkpoint") as e:
            main(argv(tiny_task, tmp_path / "x", "--no_fid", *extra))
        assert "\n" not in str(e.value)


def test_entry_points_print_one_line_and_exit_nonzero(tiny_task, tmp_path):
    script = [sys.executable, str(ROOT / "scripts" / "sample_diffusion_ddim.py"), *argv(tiny_task, tmp_path / "x")]
    bad = subprocess.run([*script, "--eta", "2"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines() == ["error: --eta 2.0 is out of range: use [0, 1]",
                                       "hint: --debug shows the traceback"]
    debug = subprocess.run([*script, "--eta", "2", "--debug"], capture_output=True, text=True, cwd=ROOT)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    task = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_task.py"), "--task", "nope.yml"],
                          capture_output=True, text=True, cwd=ROOT)
    assert task.returncode == 2 and task.stderr.startswith("error: task nope.yml not found")
