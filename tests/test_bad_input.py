"""Nothing finished is ever lost, nothing non-finite is ever saved (issue 29): one test per failure that a second
round of bad-input trials found (the item numbers are the issue's). Tiny random-weight models, except where the
embedded LDM is the quickest model with guidance."""
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml

from common.errors import CheckpointError, ConfigError, DiskFull, NonFiniteError, UsageError
from conftest import COMMON, ROOT, run
from experiments.ddim_task import main
from quant.adapters import register

LDM_CONFIG = ROOT / "configs" / "latent-diffusion" / "mnist-ldm-kl-4.yaml"
E = ["--config", str(LDM_CONFIG), "-n", "4", "--batch_size", "4", "-c", "4", "--no_fid"]
DQ = ["--ptq", "--quant_mode", "dilatequant", "--weight_bit", "4", "--quant_act", "--act_bit", "4", "--cali_n", "16",
      "--cali_iters", "2", "--distill_batch_size", "4", "--no_fid"]
W8A8 = ["--ptq", "--quant_mode", "baseline", "--weight_bit", "8", "--quant_act", "--act_bit", "8", "--cali_n", "16",
        "--no_fid"]


def ldm(*argv):
    from experiments.ldm_task import main as ldm_main
    return ldm_main([*E, *argv])


def txt2img(*argv):
    from experiments.txt2img_task import main as txt2img_main
    return txt2img_main(list(argv))


def contents(folder) -> dict:
    """Every file under `folder` (hidden lock file aside) -> its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != ".lock"}


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# 1. A failing rerun destroys a finished run -------------------------------------------------------------------

def test_1_a_rerun_with_a_non_finite_flag_is_refused_and_the_finished_run_stays(tmp_path):
    ldm("-l", str(tmp_path / "d"))
    before = contents(tmp_path / "d")
    for scale in ("inf", "nan"):
        with pytest.raises(UsageError, match=f"--scale {scale} is out of range"):
            ldm("--scale", scale, "-l", str(tmp_path / "d"))
    assert contents(tmp_path / "d") == before


def test_1_an_overwriting_rerun_on_nan_trajectories_fails_before_replacing_anything(tiny_task, tmp_path,
                                                                                     monkeypatch):
    run(tiny_task, tmp_path / "d", *W8A8)
    before = contents(tmp_path / "d")
    import ddim.sampling
    real = ddim.sampling.ddim_sample

    def diverging(*args, on_step=None, **kwargs):                          # the FP trajectories turn NaN
        spoiled = None if on_step is None else lambda x, t, *a: on_step(x * float("nan"), t, *a)
        return real(*args, on_step=spoiled, **kwargs)
    monkeypatch.setattr(ddim.sampling, "ddim_sample", diverging)
    with pytest.raises(NonFiniteError, match=r"the calibration set .* NaN/inf .*; it was not saved"):
        run(tiny_task, tmp_path / "d", *W8A8, "--cali_n", "12", "--overwrite")
    assert contents(tmp_path / "d") == before


def test_1_an_overwriting_rerun_moves_the_finished_run_aside_whole_before_replacing_its_model(tiny_task, tmp_path,
                                                                                            monkeypatch):
    run(tiny_task, tmp_path / "d", *W8A8)
    before = contents(tmp_path / "d")
    import experiments.run as run_mod

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(run_mod, "run_batches", killed)
    with pytest.raises(KeyboardInterrupt):                                   # killed after the new calibration
        run(tiny_task, tmp_path / "d", *W8A8, "--act_bit", "6", "--overwrite")
    moved = contents(tmp_path / "d" / "previous_run")
    assert moved and all(before[name] == data for name, data in moved.items())
    assert {"results.json", "samples.npz", "quantized.pt"} <= {str(name) for name in moved}
    assert not (tmp_path / "d" / "results.json").exists()                  # no record beside the new model
    monkeypatch.undo()
    rec = run(tiny_task, tmp_path / "d", *W8A8, "--act_bit", "6")          # resumes; the old run is gone now
    assert rec["act_bit"] == 6 and not (tmp_path / "d" / "previous_run").exists()


# 2. Starting a rerun with other settings deletes the finished results -----------------------------------------

def test_2_a_rerun_with_other_settings_is_refused_and_with_overwrite_killed_loses_nothing(tiny_task, tmp_path,
                                                                                        monkeypatch):
    run(tiny_task, tmp_path / "d", "--no_fid")
    before = contents(tmp_path / "d")
    with pytest.raises(UsageError, match=r"holds a finished run with other settings \(--max_images 12 -> 20\)"):
        run(tiny_task, tmp_path / "d", "--max_images", "20", "--no_fid")
    import experiments.run as run_mod

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(run_mod, "run_batches", killed)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_task, tmp_path / "d", "--max_images", "20", "--no_fid", "--overwrite")
    after = contents(tmp_path / "d")
    assert {k: v for k, v in after.items() if k.parts[0] != "sample_batches"} == \
        {k: v for k, v in before.items() if k.parts[0] != "sample_batches"}       # results, samples, images: all


def test_2_overwrite_replaces_the_results_only_once_the_new_run_has_written_its_own(tiny_task, tmp_path):
    run(tiny_task, tmp_path / "d", "--no_fid")
    rec = run(tiny_task, tmp_path / "d", "--max_images", "3", "--no_fid", "--overwrite")
    assert rec["n_samples"] == 3 and len(list((tmp_path / "d" / "images").glob("*.png"))) == 3
    assert json.loads((tmp_path / "d" / "results.json").read_text())["settings"]["max_images"] == 3
    assert json.loads((tmp_path / "d" / "args.json").read_text())["max_images"] == 3
    assert not [p for p in (tmp_path / "d").iterdir() if p.name.startswith(".") and p.name != ".lock"]


# 3. Non-finite calibration data is never checked --------------------------------------------------------------

def test_3_a_calibration_set_with_nan_is_refused_before_any_write(tiny_task, tmp_path):
    run(tiny_task, tmp_path / "a", *W8A8)
    calib = torch.load(tmp_path / "a" / "calib.pt")
    calib["x"][0, 0, 0, 0] = float("nan")
    torch.save(calib, tmp_path / "nan.pt")
    with pytest.raises(NonFiniteError, match=r"--cali_data_path .*nan.pt holds NaN/inf values in x"):
        run(tiny_task, tmp_path / "b", *W8A8, "--cali_data_path", str(tmp_path / "nan.pt"))
    assert not (tmp_path / "b").exists()


def test_3_a_model_with_a_nan_tensor_is_never_saved(tiny_unet, tmp_path):
    from quant.checkpoint import save_quantized
    from quant.model import QuantModel
    from quant.settings import QuantConfig
    q = QuantModel(tiny_unet, QuantConfig(weight_bit=8))
    with torch.no_grad():
        next(q.parameters())[0] = float("nan")
    with pytest.raises(NonFiniteError, match="the quantized model .* NaN/inf .*; it was not saved"):
        save_quantized(tmp_path / "q.pt", q, "baseline")
    assert list(tmp_path.iterdir()) == []


# 4. quantized.pt is never byte-identical between runs ---------------------------------------------------------

def test_4_a_killed_distillation_resumes_to_a_byte_identical_quantized_pt(tiny_task, tmp_path, monkeypatch):
    run(tiny_task, tmp_path / "full", *DQ)
    import quant.distill as distill_mod
    real, calls = distill_mod.train_unit, []

    def killed_at_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(distill_mod, "train_unit", killed_at_third)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_task, tmp_path / "killed", *DQ)
    assert len(list((tmp_path / "killed" / "distill").glob("unit_*.pt"))) == 2
    argv = ["--config", str(tiny_task / "tiny.yml"), "--ckpt", str(tiny_task / "tiny.ckpt"), *COMMON, *DQ,
            "-l", str(tmp_path / "killed")]                              # resumed by another process (another pid)
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "sample_diffusion_ddim.py"), *argv],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-800:]
    for name in ("quantized.pt", "samples.npz", "distill/unit_00.pt", "distill/unit_05.pt"):
        assert md5(tmp_path / "full" / name) == md5(tmp_path / "killed" / name), name
    full, killed = (torch.load(tmp_path / d / "calib.pt") for d in ("full", "killed"))   # its draw time differs
    assert torch.equal(full["x"], killed["x"]) and full["meta"]["key"] == killed["meta"]["key"]


# 5. All the work, then a traceback ----------------------------------------------------------------------------

def test_5_eps_rescale_without_every_timestep_is_refused_before_distillation(tiny_task, tmp_path):
    with pytest.raises(UsageError, match=r"has no sample at .* timesteps .*--eps_rescale fits one gain per timestep"):
        run(tiny_task, tmp_path / "r", *DQ, "--cali_n", "2", "--eps_rescale")
    assert not list((tmp_path / "r").glob("distill/unit_*.pt"))           # no unit was distilled


# 6. Silent calibration gaps ------------------------------------------------------------------------------------

def test_6_a_tpq_slot_without_calibration_samples_is_named_before_calibration(tiny_unet, tiny_task, tmp_path,
                                                                             capsys):
    from quant.calib_data import CalibSet
    from quant.calibrate import calibrate
    from quant.model import QuantModel
    from quant.settings import QuantConfig
    q = QuantModel(tiny_unet, QuantConfig(weight_bit=4, act_bit=4, temporal=True), [0, 10, 20, 30])
    with pytest.warns(UserWarning, match=r"no sample at 1 of the 4 timesteps of the TPQ model \(\[20\]\)"):
        calibrate(q, CalibSet(torch.randn(6, 1, 16, 16), torch.tensor([0, 10, 30, 0, 10, 30])))
    rec = run(tiny_task, tmp_path / "r", *DQ, "--cali_n", "2")             # 2 samples, 4 timesteps
    assert "has no sample at 2 of the sampler's 4 timesteps" in capsys.readouterr().out
    assert len(rec["tpq_timesteps_without_samples"]) == 2                   # and the record says which


def test_6_fp_samples_neither_invalidate_the_quantization_nor_come_in_another_count(tiny_task, tmp_path,
                                                                                  monkeypatch):
    run(tiny_task, tmp_path / "fp", "--no_fid")
    run(tiny_task, tmp_path / "q", *W8A8)
    import experiments.quantize as quantize_mod

    def must_not_run(*args, **kwargs):
        raise AssertionError("the quantization stage ran again")
    monkeypatch.setattr(quantize_mod, "quantize_with", must_not_run)          # the method handler
    rec = run(tiny_task, tmp_path / "q", *W8A8, "--fp_samples", str(tmp_path / "fp" / "samples.npz"))
    assert rec["inputs"]["fp_samples"] is not None
    with pytest.raises(UsageError, match=r"--fp_samples .* holds 12 images, this run samples 5 \(--max_images\)"):
        run(tiny_task, tmp_path / "five", "--max_images", "5", "--no_fid",
            "--fp_samples", str(tmp_path / "fp" / "samples.npz"))
    assert not (tmp_path / "five").exists()


# 7. Python API edges (a diffusers-style caller) ---------------------------------------------------------------

def test_7_a_quantized_model_takes_python_and_0d_timesteps(tiny_unet):
    from quant.calibrate import calibrate
    from quant.calib_data import CalibSet
    from quant.model import QuantModel
    from quant.settings import QuantConfig
    q = calibrate(QuantModel(tiny_unet, QuantConfig(weight_bit=8, act_bit=8, temporal=True), [10, 20]),
                  CalibSet(torch.randn(4, 1, 16, 16), torch.tensor([10, 20, 10, 20])))
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        want = q(x, torch.tensor([20, 20]))
        assert torch.equal(q(x, 20), want) and torch.equal(q(x, torch.tensor(20)), want)
        assert torch.equal(q(x, 20.0), want)


def test_7_calibration_draws_accept_a_0d_timestep(tiny_unet):
    from quant.calib_data import draw_over_steps

    def sampler(x_T, on_step, rows=None):                                 # a diffusers-style loop: t is 0-d
        x = x_T
        for t in (torch.tensor(30), torch.tensor(20), torch.tensor(10)):
            on_step(x, t, {})
            x = x - 0.1 * tiny_unet(x, t.expand(len(x)))
    calib = draw_over_steps(sampler, torch.randn(4, 1, 16, 16), 4, 3, 1, torch.Generator().manual_seed(0))
    assert calib.t.shape == (4,) and set(calib.t.tolist()) <= {10, 20, 30}


class TupleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x, scale: float = 1.0):
        return self.conv(x) * scale, x


class ScaledBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x, scale: float = 1.0):
        return self.conv(x) * scale


class Net(nn.Module):
    """A diffusers-style network: a unit returning a tuple, or one taking a Python keyword argument."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.conv_in, self.block, self.conv_out = nn.Conv2d(1, 2, 3, padding=1), block, nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x, t):
        h = self.block(self.conv_in(x), scale=3.0)
        return self.conv_out(h[0] if isinstance(h, tuple) else h)


@register(f"{__name__}.Net")
class NetAdapter:
    def units(self, model):
        return ["conv_in", "block", "conv_out"]

    def edge_layers(self, model):
        return "conv_in", "conv_out"

    def split_channels(self, model):
        return {}

    def softmax_operands(self, model):
        return {}

    def shared_inputs(self, model):
        return []

    def norm_producers(self, model):
        return {}

    def head_layout(self, model):
        return "(b h)"


def _calibrated(block):
    from quant.calib_data import CalibSet
    from quant.calibrate import calibrate
    from quant.model import QuantModel
    from quant.settings import QuantConfig
    torch.manual_seed(0)
    fp = Net(block).eval()
    calib = CalibSet(torch.randn(4, 1, 8, 8), torch.tensor([10, 20, 10, 20]))
    return fp, calibrate(QuantModel(fp, QuantConfig(weight_bit=8, act_bit=8, temporal=True), [10, 20]), calib), calib


def test_7_a_unit_returning_a_tuple_is_one_line_naming_it(tmp_path):
    from common.errors import AdapterError
    from quant.distill import DistillConfig, distill
    fp, q, calib = _calibrated(TupleBlock())
    with pytest.raises(AdapterError, match="unit block returns a tuple, not a tensor"):
        distill(q, fp, calib, DistillConfig(iters=0, cache_batch_size=4), tmp_path / "distill")


def test_7_non_tensor_keyword_arguments_of_a_unit_are_replayed():
    from quant.distill import cache_unit_io
    from quant.model import quant_enabled
    fp, q, calib = _calibrated(ScaledBlock())
    with quant_enabled(q, weight=False, act=False), torch.no_grad():      # unquantized: the FP unit exactly
        data = cache_unit_io(q, fp, "block", calib, batch_size=4)
        args, kwargs, target, _ = data.batch(torch.arange(4), torch.device("cpu"))
        assert kwargs == {"scale": 3.0}
        torch.testing.assert_close(q.model.block(*args, **kwargs), target)


# 8. Tracebacks instead of one line -----------------------------------------------------------------------------

def test_8_a_prompt_file_that_is_not_utf8_is_one_line(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"a horse\n\xff\xfe zebra\n")
    with pytest.raises(UsageError, match=r"--from-file .*p.txt is not UTF-8 text"):
        txt2img("--from-file", str(tmp_path / "p.txt"), "--outdir", str(tmp_path / "o"))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["model"].__setitem__("target", "ldm.models.diffusion.ddpm.LatentDiffusio"),
     "module ldm.models.diffusion.ddpm has no LatentDiffusio"),
    (lambda c: c["model"].__setitem__("target", "ldm.models.diffusion.dpm.LatentDiffusion"),
     "no module ldm.models.diffusion.dpm"),
    (lambda c: c["model"]["params"]["unet_config"]["params"].__setitem__("model_channelz", 32),
     "unexpected keyword argument 'model_channelz'"),
    (None, "is not valid YAML at line"),
])
def test_8_a_config_with_a_typo_is_one_line(tmp_path, edit, message):
    cfg = yaml.safe_load(LDM_CONFIG.read_text())
    cfg["ckpt"] = str(ROOT / cfg["ckpt"])
    if edit is None:
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg) + "model: [unclosed\n")
    else:
        edit(cfg)
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    from experiments.ldm_task import main as ldm_main
    with pytest.raises(ConfigError, match=message):
        ldm_main(["--config", str(tmp_path / "c.yaml"), "-n", "2", "--no_fid", "-l", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("image, message", [({"null_class": 11}, r"image.null_class 11 is not one of the model's 11"),
                                            ({"crop": 16}, r"image.crop 16 leaves nothing of the 32x32")])
def test_8_image_settings_out_of_range_are_one_line(tmp_path, image, message):
    cfg = yaml.safe_load(LDM_CONFIG.read_text())
    cfg["ckpt"] = str(ROOT / cfg["ckpt"])
    cfg["image"].update(image)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    from experiments.ldm_task import main as ldm_main
    with pytest.raises(UsageError, match=message):
        ldm_main(["--config", str(tmp_path / "c.yaml"), "-n", "2", "--no_fid", "-l", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_8_a_failed_image_write_leaves_no_temp_folder(tmp_path):
    from common.files import replace_dir

    def fill(folder):
        (folder / "a.png").write_bytes(b"x")
        raise ValueError("tile cannot extend outside image")
    with pytest.raises(ValueError):
        replace_dir(tmp_path / "images", fill)
    assert list(tmp_path.iterdir()) == []


def test_8_a_logdir_that_is_a_file_under_a_file_or_read_only_is_one_line(tiny_task, tmp_path, monkeypatch):
    (tmp_path / "f").write_text("")
    with pytest.raises(UsageError, match=r"-l .*f is a file, not a directory"):
        run(tiny_task, tmp_path / "f", "--no_fid")
    with pytest.raises(UsageError, match=r"-l .*f/run lies under .*f, which is a file"):
        run(tiny_task, tmp_path / "f" / "run", "--no_fid")
    monkeypatch.setattr(os, "access", lambda path, mode: False)           # root writes anywhere: as if read-only
    with pytest.raises(UsageError, match=r"-l .*ro/run cannot be written"):
        run(tiny_task, tmp_path / "ro" / "run", "--no_fid")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_8_device_cuda_without_a_gpu_is_one_line(tiny_task, tmp_path):
    with pytest.raises(UsageError, match="--device cuda: no CUDA GPU is visible here"):
        run(tiny_task, tmp_path / "x", "--no_fid", "--device", "cuda")
    assert not (tmp_path / "x").exists()


def test_8_txt2img_with_no_images_per_batch_is_one_line(tmp_path):
    with pytest.raises(UsageError, match="--n_samples 0 is out of range: use >= 1"):
        txt2img("--n_samples", "0", "--outdir", str(tmp_path / "o"))


def test_8_a_full_disk_inside_torch_save_is_one_line(tmp_path, monkeypatch):
    from common.files import atomic_torch_save

    def full(obj, f):
        open(f, "wb").write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 100, 0))
    with pytest.raises(DiskFull, match="disk full while writing .*q.pt"):
        atomic_torch_save({"x": 1}, tmp_path / "q.pt")
    assert list(tmp_path.iterdir()) == []


def test_8_tools_refuse_bad_input_in_one_line(tmp_path):
    from tools.dry_run import main as dry_run
    from tools.results_table import main as results_table
    sd = str(ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml")
    with pytest.raises(UsageError, match="--steps 0 is out of range"):
        dry_run(["--config", sd, "--steps", "0", "--no_time"])
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "results.json").write_text('{"method": "fp", ')
    with pytest.raises(UsageError, match=r"results.json is not a readable results.json"):
        results_table([str(tmp_path / "runs"), "--out", str(tmp_path / "t.md")])


# 9. Messages that name the wrong flag --------------------------------------------------------------------------

def test_9_txt2img_errors_name_txt2img_flags(tmp_path):
    out = ["--outdir", str(tmp_path / "o")]
    with pytest.raises(UsageError, match=r"^--ddim_steps 0 is out of range") as e:
        txt2img("--ddim_steps", "0", *out)
    assert "custom_steps" not in str(e.value)
    with pytest.raises(UsageError, match=r"^--ddim_eta 0.5 is a DDIM setting; --plms is deterministic") as e:
        txt2img("--plms", "--ddim_eta", "0.5", *out)
    assert "--sampler" not in e.value.hint and "--eta " not in e.value.hint
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(UsageError, match=r"^--cali_prompts .*empty.txt holds no prompts"):
        txt2img("--cali_prompts", str(tmp_path / "empty.txt"), *out)


def test_9_a_ddim_calibration_set_given_to_the_ldm_names_no_ddim_flag(tiny_task, tmp_path):
    run(tiny_task, tmp_path / "ddim", *W8A8)
    with pytest.raises(UsageError, match=r"holds samples of shape \[1, 28, 28\], but this model takes \[4, 8, 8\]") \
            as e:
        ldm(*W8A8, "--cali_data_path", str(tmp_path / "ddim" / "calib.pt"), "-l", str(tmp_path / "l"))
    assert "--timesteps" not in str(e.value) + e.value.hint and not (tmp_path / "l").exists()


def test_9_a_checkpoint_that_is_a_directory_says_so(tiny_task, tmp_path):
    (tmp_path / "dir.ckpt").mkdir()
    with pytest.raises(UsageError, match=r"--ckpt .*dir.ckpt is a directory, not a file"):
        main(["--config", str(tiny_task / "tiny.yml"), "--ckpt", str(tmp_path / "dir.ckpt"), "-l",
              str(tmp_path / "x"), "--no_fid"])


# 10. Silently wrong tools and flags ----------------------------------------------------------------------------

def test_10_tools_refuse_out_of_range_sizes_and_bits():
    from tools.dry_run import main as dry_run
    sd = str(ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml")
    for n in ("0", "-5"):
        with pytest.raises(UsageError, match=f"--cali_n {n} is out of range"):
            dry_run(["--config", sd, "--cali_n", n, "--no_time"])
    with pytest.raises(UsageError, match="'99/99' are out of range"):
        dry_run(["--config", sd, "--bits", "99/99", "--no_time"])


def test_10_a_table_of_several_models_has_a_model_column(tiny_task, tmp_path):
    from tools.results_table import main as results_table
    run(tiny_task, tmp_path / "runs" / "ddim_fp", "--no_fid")
    ldm("-l", str(tmp_path / "runs" / "ldm_fp"))
    results_table([str(tmp_path / "runs"), "--out", str(tmp_path / "t.md")])
    lines = (tmp_path / "t.md").read_text().splitlines()
    head = next(line for line in lines if line.startswith("| run"))
    assert head.startswith("| run | model | method")
    assert any(line.startswith("| ddim_fp | tiny |") for line in lines)
    assert any(line.startswith("| ldm_fp | mnist-ldm-kl-4 |") for line in lines)


def test_10_quantization_flags_without_ptq_are_refused(tiny_task, tmp_path):
    for flags in (["--weight_bit", "4"], ["--quant_mode", "dilatequant"], ["--split"]):
        with pytest.raises(UsageError, match=f"{flags[0]} is a quantization flag, but --ptq is not given"):
            run(tiny_task, tmp_path / "x", "--no_fid", *flags)
    assert not (tmp_path / "x").exists()


def test_10_a_task_script_refuses_an_unknown_option():
    out = subprocess.run(["bash", str(ROOT / "scripts" / "for_imagenet.sh"), "--embeded"], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 2 and out.stderr.startswith("for_imagenet.sh: unknown option --embeded")
    assert len(out.stderr.splitlines()) == 1


# 11. Refusals that write first ---------------------------------------------------------------------------------

def test_11_refusals_of_cali_ckpt_and_cali_data_path_write_nothing(tiny_task, tmp_path):
    run(tiny_task, tmp_path / "a", *W8A8)
    payload = torch.load(tmp_path / "a" / "quantized.pt")
    key = next(k for k in payload["state_dict"] if k.endswith(".weight"))
    payload["state_dict"][key].view(-1)[0] = float("nan")
    torch.save(payload, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=r"--cali_ckpt .*nan.pt has NaN/inf values"):
        run(tiny_task, tmp_path / "b", *W8A8, "--cali_ckpt", str(tmp_path / "nan.pt"))
    (tmp_path / "text.pt").write_text("no")
    with pytest.raises(CheckpointError, match=r"--cali_data_path .*text.pt is not a readable"):
        run(tiny_task, tmp_path / "c", *W8A8, "--cali_data_path", str(tmp_path / "text.pt"))
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


# 12. The loader refuses first_stage_model.loss.* keys ----------------------------------------------------------

def test_12_training_loss_keys_of_the_first_stage_are_ignored(tmp_path):
    from ldm.checkpoint import load_model_from_config
    from ldm.util import load_config
    state = torch.load(ROOT / "models" / "mnist_ldm" / "model.ckpt", weights_only=True)
    state = state.get("state_dict", state)
    state["first_stage_model.loss.logvar"] = torch.zeros(())
    state["first_stage_model.loss.discriminator.main.0.weight"] = torch.zeros(8, 3, 4, 4)
    torch.save({"state_dict": state}, tmp_path / "trained.ckpt")
    model = load_model_from_config(load_config(LDM_CONFIG), tmp_path / "trained.ckpt")
    assert not any(k.startswith("first_stage_model.loss.") for k in model.state_dict())
