"""The LDM / SD entry points: Q-Diffusion's flags, the embedded class-conditional LDM end to end (FP and
quantized, reload, refusals), txt2img on a tiny random Stable Diffusion, and the paper's for_*.sh scripts."""
import json
import subprocess

import numpy as np
import pytest
import torch
import yaml

from common.errors import UsageError
from conftest import ROOT
from experiments.ldm_task import build_parser, main
from tools.tiny_ldm import TINY_CLIP_TEXT, random_weights, tiny_config
from ldm.util import instantiate_from_config, load_config
from test_ldm_encoders import write_tiny_tokenizer

EMBEDDED = ["--config", str(ROOT / "configs" / "latent-diffusion" / "mnist-ldm-kl-4.yaml")]
SMALL = ["-n", "8", "--batch_size", "4", "-c", "4", "--no_fid"]
W4A4 = ["--ptq", "--quant_mode", "dilatequant", "--weight_bit", "4", "--quant_act", "--act_bit", "4", "--split",
        "--cali_n", "16", "--cali_iters", "2", "--distill_batch_size", "4"]


def test_help_lists_the_seed_flags():
    text = build_parser().format_help()
    for flag in ("-r", "--resume", "-n", "--n_samples", "--batch_size", "-c", "--custom_steps", "-e", "--eta", "--seed",
                 "-l", "--logdir", "--ptq", "--quant_act", "--weight_bit", "--act_bit", "--a_sym", "--quant_mode",
                 "--cali_st", "--cali_n", "--cali_iters", "--cali_ckpt", "--cali_data_path", "--resume_w", "--cond",
                 "--sm_abit", "--dpm", "--scale", "--sampler", "--no_fid", "--split"):
        assert f" {flag}" in text, flag


@pytest.mark.parametrize("command", [
    # the seed README's LSUN commands (Q-Diffusion, seed 003), as written
    "-r models/ldm/lsun_beds256/model.ckpt -n 20 --batch_size 10 -c 200 -e 1.0 --seed 41 --ptq --weight_bit 4 "
    "-l out --cali_ckpt q.pth",
    "-r models/ldm/lsun_beds256/model.ckpt -n 20 --batch_size 10 -c 200 -e 1.0 --seed 41 --ptq --weight_bit 8 "
    "--quant_act --act_bit 8 --a_sym -l out --cali_ckpt q.pth",
    "-r models/ldm/lsun_churches256/model.ckpt -n 20 --batch_size 10 -c 400 -e 0.0 --seed 41 --ptq --weight_bit 4 "
    "-l out --cali_ckpt q.pth",
    "-r models/ldm/lsun_churches256/model.ckpt -n 20 --batch_size 10 -c 400 -e 0.0 --seed 41 --ptq --weight_bit 8 "
    "--quant_act --act_bit 8 -l out --cali_ckpt q.pth",
])
def test_seed_readme_commands_parse(command):
    args = build_parser().parse_args(command.split())
    assert args.resume.endswith("model.ckpt") and args.n_samples == 20 and args.ptq


def test_embedded_ldm_runs_fp_and_quantized_and_reloads_identically(tmp_path):
    fp = main([*EMBEDDED, *SMALL, "-l", str(tmp_path / "fp")])
    assert fp["method"] == "fp" and fp["conditioning"] == "ClassEmbedder" and fp["guided"]
    images = np.load(tmp_path / "fp" / "samples.npz")["arr_0"]
    assert images.shape == (8, 28, 28, 1)                      # 32x32 decodes, 2 px of padding cropped
    q = main([*EMBEDDED, *SMALL, *W4A4, "-l", str(tmp_path / "q")])
    assert q["method"] == "dilatequant" and q["unquantized_layers"] == []
    calib = torch.load(tmp_path / "q" / "calib.pt")
    assert set(calib["cond"]) == {"context"} and calib["cond"]["context"].shape[1:] == (1, 64)   # class contexts
    again = main([*EMBEDDED, *SMALL, *W4A4, "-l", str(tmp_path / "reload"),
                  "--cali_ckpt", str(tmp_path / "q" / "quantized.pt")])
    assert again["quantized_from"]["method"] == "dilatequant"
    assert np.array_equal(np.load(tmp_path / "q" / "samples.npz")["arr_0"],
                          np.load(tmp_path / "reload" / "samples.npz")["arr_0"])
    rescaled = main([*EMBEDDED, *SMALL, *W4A4, "-l", str(tmp_path / "rescale"), "--eps_rescale",
                     "--cali_ckpt", str(tmp_path / "q" / "quantized.pt"), "--cali_data_path", str(tmp_path / "q" / "calib.pt")])
    assert rescaled["method"] == "dilatequant+rescale" and 0.5 < rescaled["eps_gain_median"] < 2
    assert not np.array_equal(np.load(tmp_path / "q" / "samples.npz")["arr_0"],
                              np.load(tmp_path / "rescale" / "samples.npz")["arr_0"])
    corrected = main([*EMBEDDED, *SMALL, *W4A4, "-l", str(tmp_path / "epsbc"), "--eps_correction", "2",
                      "--cali_ckpt", str(tmp_path / "q" / "quantized.pt")])      # through the guided sampler
    assert corrected["method"] == "dilatequant+epsbc" and corrected["eps_correction_trajectories"] == 2
    assert corrected["eps_bias_abs_max"] > 0 and corrected["method_identity"]["output_correction"]["trajectories"] == 2
    assert not np.array_equal(np.load(tmp_path / "q" / "samples.npz")["arr_0"],
                              np.load(tmp_path / "epsbc" / "samples.npz")["arr_0"])
    from studies.ldm_error_anatomy import main as anatomy           # the study runs on these checkpoints
    out = anatomy([str(tmp_path / "q" / "quantized.pt"), str(tmp_path / "rescale" / "quantized.pt"), *EMBEDDED,
                   "--calib", str(tmp_path / "q" / "calib.pt"), "--n", "8", "--out", str(tmp_path / "anatomy.json")])
    plain, fixed = (out["runs"][str(tmp_path / d / "quantized.pt")] for d in ("q", "rescale"))
    assert set(plain["groups"]) >= {"skip projections", "attention matmuls"} and plain["groups"]["skip projections"]["layers"] == 7
    assert plain["mse"]["all quantized"] > 0 and plain["guided"]["mse_guided"] > 0
    assert plain["per_timestep"].keys() == fixed["per_timestep"].keys()
    with pytest.raises(UsageError, match="use one"):
        main([*EMBEDDED, *SMALL, *W4A4, "--eps_rescale", "--eps_correction", "4", "-l", str(tmp_path / "both")])
    with pytest.raises(UsageError, match="has TPQ parameters for .* timesteps"):  # DPM-Solver visits other t
        main([*EMBEDDED, *SMALL, *W4A4, "--sampler", "dpm", "-l", str(tmp_path / "dpm"),
              "--cali_ckpt", str(tmp_path / "q" / "quantized.pt")])


def test_bad_ldm_flags_fail_before_any_write(tmp_path):
    for bad, message in ((["-e", "0.5", "--sampler", "plms"], "DDIM setting"), (["-c", "0"], "--custom_steps 0"),
                         (["--scale", "0.5"], "--scale 0.5"), (["--ckpt", str(tmp_path / "m.ckpt")], "no such file")):
        with pytest.raises(UsageError, match=message):
            main([*EMBEDDED, *SMALL, *bad, "-l", str(tmp_path / "x")])
    with pytest.raises(UsageError, match="no config.yaml beside it"):
        main(["-r", str(tmp_path / "m.ckpt"), *SMALL, "-l", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A tiny random Stable Diffusion (same classes as v1-inference) with a local tokenizer, as files."""
    d = tmp_path_factory.mktemp("sd")
    write_tiny_tokenizer(d / "clip" / "tokenizer")
    cfg = tiny_config(load_config(ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"))
    cfg["model"]["params"]["cond_stage_config"]["params"] = {"version": str(d / "clip"), "text_config": TINY_CLIP_TEXT}
    model = random_weights(instantiate_from_config(cfg["model"]))
    torch.save({"state_dict": model.state_dict()}, d / "model.ckpt")
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "prompts.txt").write_text("a horse\nzebra\nho ho\n")
    return d


def test_txt2img_runs_fp_and_quantized_on_a_tiny_sd(tiny_sd, tmp_path):
    from experiments.txt2img_task import main as txt2img
    common = ["--config", str(tiny_sd / "config.yaml"), "--ckpt", str(tiny_sd / "model.ckpt"), "--H", "64", "--W",
              "64", "--ddim_steps", "4", "--n_samples", "2", "--n_iter", "1", "--from-file", str(tiny_sd / "prompts.txt"),
              "--plms", "--precision", "full"]
    fp = txt2img([*common, "--outdir", str(tmp_path / "fp")])
    assert fp["n_samples"] == 4 and fp["conditioning"] == "FrozenCLIPEmbedder" and fp["clip_score"] is None
    assert np.load(tmp_path / "fp" / "samples.npz")["arr_0"].shape == (4, 64, 64, 3)
    q = txt2img([*common, "--outdir", str(tmp_path / "q"), "--ptq", "--quant_mode", "qdiff", "--weight_bit", "8",
                 "--quant_act", "--act_bit", "8", "--sm_abit", "16", "--split", "--cond", "--cali_n", "4", "--cali_st",
                 "2", "--cali_iters", "1", "--cali_iters_a", "1", "--no_grad_ckpt"])
    assert q["method"] == "qdiff" and json.loads((tmp_path / "q" / "results.json").read_text())["weight_bit"] == 8


def test_for_imagenet_without_a_checkpoint_is_one_line_and_runs_embedded(tmp_path):
    missing = subprocess.run(["bash", str(ROOT / "scripts" / "for_imagenet.sh"), str(tmp_path / "no.ckpt")],
                             capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 2 and len(missing.stderr.splitlines()) == 1 and "cin256-v2 checkpoint" in missing.stderr
    embedded = subprocess.run(["bash", str(ROOT / "scripts" / "for_imagenet.sh"), "--embedded", "--only", "fp",
                               "--out", str(tmp_path / "runs"), "--", "-n", "4", "--batch_size", "4", "--no_fid"],
                              capture_output=True, text=True, cwd=ROOT)
    assert embedded.returncode == 0, embedded.stderr[-500:]
    assert np.load(tmp_path / "runs" / "fp" / "samples.npz")["arr_0"].shape == (4, 28, 28, 1)
    for script in ("for_bedroom.sh", "for_church.sh", "for_coco.sh"):
        out = subprocess.run(["bash", str(ROOT / "scripts" / script), str(tmp_path / "no.ckpt")],
                             capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 2 and len(out.stderr.splitlines()) == 1 and "not found at" in out.stderr


def test_txt2img_scores_clip_with_local_weights_and_says_why_without(tiny_sd, tiny_clip, tmp_path):
    from experiments.txt2img_task import main as txt2img
    common = ["--config", str(tiny_sd / "config.yaml"), "--ckpt", str(tiny_sd / "model.ckpt"), "--H", "64", "--W",
              "64", "--ddim_steps", "2", "--n_samples", "2", "--n_iter", "1", "--from-file", str(tiny_sd / "prompts.txt"),
              "--precision", "full"]
    scored = txt2img([*common, "--clip_model", str(tiny_clip), "--outdir", str(tmp_path / "a")])
    assert isinstance(scored["clip_score"], float) and scored["clip_note"] is None
    assert scored["clip_model"] == str(tiny_clip)
    missing = txt2img([*common, "--clip_model", str(tmp_path / "none"), "--outdir", str(tmp_path / "b")])
    assert missing["clip_score"] is None and "no CLIP weights" in missing["clip_note"]
