"""Digests of what a fixed set of small runs produce: the bytes of each run's samples.npz, and of its calibrated
model (every tensor of quantized.pt's state_dict, in order; the file's metadata aside). Two checkouts that print
the same digests sample the same images from the same models: a refactoring check.

    python tools/behaviour_digests.py --out runs/digests.json            # then, on the other checkout:
    python tools/behaviour_digests.py --out runs/digests_after.json --compare runs/digests.json

The runs: baseline, Q-Diffusion and DilateQuant, with and without the options beyond the papers, on the embedded
DDIM and LDM models, and txt2img on a tiny random Stable Diffusion (built here from the public config; seeded).
Each is a few seconds to a minute on a CPU.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.files import write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DDIM = ["--config", str(ROOT / "configs" / "mnist.yml"), "--timesteps", "10", "--max_images", "8", "--batch_size",
        "8", "--no_fid"]
LDM = ["--config", str(ROOT / "configs" / "latent-diffusion" / "mnist-ldm-kl-4.yaml"), "-n", "8", "--batch_size", "8",
       "-c", "5", "--no_fid"]
Q = ["--ptq", "--quant_act", "--cali_n", "64", "--cali_iters", "4", "--distill_batch_size", "8"]


def bits(w: int, a: int) -> list[str]:
    return ["--weight_bit", str(w), "--act_bit", str(a)]


RUNS = {
    "ddim_fp": ("ddim", []),
    "ddim_baseline_w4a4": ("ddim", [*Q, "--quant_mode", "baseline", *bits(4, 4)]),
    "ddim_qdiff_w4a8": ("ddim", [*Q, "--quant_mode", "qdiff", *bits(4, 8), "--split", "--cali_n", "8", "--cali_st", "4",
                                 "--cali_iters_a", "4"]),
    "ddim_dilatequant_w4a4": ("ddim", [*Q, "--quant_mode", "dilatequant", *bits(4, 4)]),
    "ddim_dilatequant_w4a4_split_staged_fpin": ("ddim", [*Q, "--quant_mode", "dilatequant", *bits(4, 4), "--split",
                                                         "--bkd_training", "staged", "--distill_fp_input", "1"]),
    "ddim_dilatequant_w6a6_tw_rescale": ("ddim", [*Q, "--quant_mode", "dilatequant", *bits(6, 6), "--t_weight_sigma",
                                                  "0.2", "--eps_rescale", "--cali_n", "128"]),
    "ddim_dilatequant_w4a4_epsbc": ("ddim", [*Q, "--quant_mode", "dilatequant", *bits(4, 4), "--eps_correction", "4"]),
    "ddim_ablation_wd_tpq_smoothquant": ("ddim", [*Q, "--quant_mode", "dilatequant", *bits(4, 4), "--no-bkd",
                                                  "--scaling", "smoothquant"]),
    "ldm_fp": ("ldm", []),
    "ldm_baseline_w8a8": ("ldm", [*Q, "--quant_mode", "baseline", *bits(8, 8)]),
    "ldm_qdiff_w4a8": ("ldm", [*Q, "--quant_mode", "qdiff", *bits(4, 8), "--split", "--cali_n", "8", "--cali_st", "4",
                               "--cali_iters_a", "4"]),
    "ldm_dilatequant_w4a4_split": ("ldm", [*Q, "--quant_mode", "dilatequant", *bits(4, 4), "--split"]),
    "ldm_dilatequant_w4a4_staged_fpin_rescale": ("ldm", [*Q, "--quant_mode", "dilatequant", *bits(4, 4), "--split",
                                                         "--bkd_training", "staged", "--distill_fp_input", "1",
                                                         "--eps_rescale", "--cali_n", "128"]),
    "txt2img_fp": ("txt2img", []),
    "txt2img_qdiff_w8a8": ("txt2img", ["--ptq", "--quant_mode", "qdiff", "--quant_act", *bits(8, 8), "--sm_abit", "16",
                                       "--split", "--cali_n", "4", "--cali_st", "2", "--cali_iters", "2",
                                       "--cali_iters_a", "2"]),
    "txt2img_dilatequant_w4a4": ("txt2img", ["--ptq", "--quant_mode", "dilatequant", "--quant_act", *bits(4, 4),
                                             "--cali_n", "8", "--cali_iters", "2", "--distill_batch_size", "4"]),
}


def tiny_sd(folder: Path) -> list[str]:
    """A tiny random Stable Diffusion (the public config's classes, widths of 32) as files, and its flags."""
    import yaml
    from tools.tiny_ldm import TINY_CLIP_TEXT, random_weights, tiny_config
    from ldm.util import instantiate_from_config, load_config
    tok = folder / "clip" / "tokenizer"
    tok.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (tok / "vocab.json").write_text(json.dumps(vocab))
    (tok / "merges.txt").write_text("#version: 0.2\n")
    cfg = tiny_config(load_config(ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"))
    cfg["model"]["params"]["cond_stage_config"]["params"] = {"version": str(folder / "clip"),
                                                            "text_config": TINY_CLIP_TEXT}
    torch.manual_seed(0)
    model = random_weights(instantiate_from_config(cfg["model"]))
    torch.save({"state_dict": model.state_dict()}, folder / "model.ckpt")
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    (folder / "prompts.txt").write_text("a horse\nzebra\nho ho\n")
    return ["--config", str(folder / "config.yaml"), "--ckpt", str(folder / "model.ckpt"), "--H", "64", "--W", "64",
            "--ddim_steps", "4", "--n_samples", "2", "--n_iter", "1", "--from-file", str(folder / "prompts.txt"),
            "--plms", "--precision", "full"]


def model_digest(path: Path) -> str | None:
    """sha256 of every tensor of a quantized.pt's state_dict (names and bytes, in order)."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    h = hashlib.sha256()
    for key, value in state.items():
        h.update(key.encode())
        h.update(value.contiguous().view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return h.hexdigest()


def run_all(work: Path, only: list[str] | None = None) -> dict:
    from experiments import ddim_task, ldm_task, txt2img_task
    mains = {"ddim": (ddim_task.main, DDIM, "-l"), "ldm": (ldm_task.main, LDM, "-l")}
    sd_flags = None
    out = {}
    for name, (family, flags) in RUNS.items():
        if only and name not in only:
            continue
        logdir = work / name
        if family == "txt2img":
            sd_flags = sd_flags or tiny_sd(work / "tiny_sd")
            txt2img_task.main([*sd_flags, *flags, "--outdir", str(logdir)])
        else:
            main, common, flag = mains[family]
            main([*common, *flags, flag, str(logdir)])
        out[name] = {"samples.npz": hashlib.sha256((logdir / "samples.npz").read_bytes()).hexdigest(),
                     "quantized.pt": model_digest(logdir / "quantized.pt")}
        print(f"[digests] {name}: {out[name]}", flush=True)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--compare", default=None, help="digests of another checkout: every run must match them")
    p.add_argument("--only", default=None, help="comma-separated run names")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as d:
        digests = run_all(Path(d), args.only.split(",") if args.only else None)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, digests)
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        differ = [n for n in digests if before.get(n) != digests[n]]
        print(f"[digests] {len(digests) - len(differ)} of {len(digests)} runs identical to {args.compare}"
              + (f"; different: {differ}" if differ else ""))
        if differ:
            raise SystemExit(1)
    return digests


if __name__ == "__main__":
    from common.errors import entry_point
    entry_point(main)
