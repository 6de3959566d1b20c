"""A local diffusers pipeline folder quantized and sampled (scripts/quantize_diffusers.py): load (never from a hub
id) -> quantize its denoiser (the UNet, or the DiT / PixArt transformer) with --quant_mode and its flags, calibrated
on the pipeline's own guided sampling (hf.pipeline) -> sample -> samples.npz, grid.png, images/, quantized.pt and
results.json with provenance.

The method flags are the other scripts' (experiments/flags.py): --weight_bit, --act_bit, --split, --quant_mode and
each method's options. Conditioning follows the pipeline: --prompt for text pipelines (Stable Diffusion, PixArt),
--class_label for DiT, neither for an unconditional UNet. --cali_n is the number of calibration trajectories (one
guided trajectory per prompt or class label in turn, every step kept), --cali_batch_size of them at a time.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from common.device import pick_device, set_seed
from common.errors import UsageError
from common.files import write_json
from diffusion.sampling import save_samples
from experiments.flags import HelpFormatter, add_quant_flags, check_quant_flags, method_config, parse_flags, quant_config
from experiments.runtime import provenance
from quant.checkpoint import save_quantized

DENOISER_CONFIGS = ("unet/config.json", "transformer/config.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model_dir", required=True, help="a local diffusers pipeline folder (save_pretrained)")
    p.add_argument("--prompt", action="append", default=None,
                   help="a sampling prompt (repeatable; text pipelines: Stable Diffusion, PixArt)")
    p.add_argument("--class_label", type=int, action="append", default=None,
                   help="a sampling class label (repeatable; DiT pipelines)")
    p.add_argument("--cali_prompts", default=None, help="a text file of calibration prompts, one per line "
                                                        "(default: the sampling prompts in turn)")
    p.add_argument("--steps", type=int, default=50, help="scheduler steps (calibration and sampling)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale (default: the pipeline's own: SD 7.5, DiT 4.0, PixArt 4.5, unconditional 1)")
    p.add_argument("--n_samples", type=int, default=4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--outdir", required=True)
    p.add_argument("--device", default=None)
    add_quant_flags(p)
    return p


def check_flags(args) -> None:
    folder = Path(args.model_dir)
    missing = [f for f in ("model_index.json",) if not (folder / f).is_file()]
    if not any((folder / f).is_file() for f in DENOISER_CONFIGS):
        missing.append(" or ".join(DENOISER_CONFIGS))
    if missing:
        raise UsageError(f"--model_dir {folder} is not a diffusers pipeline folder (no {', '.join(missing)})",
                         "pass the folder a pipeline's save_pretrained wrote (hub ids are never fetched)")
    if args.prompt and args.class_label:
        raise UsageError("both --prompt and --class_label given", "pass prompts for a text pipeline, class labels "
                         "for DiT")
    for flag, ok in (("steps", args.steps >= 1), ("n_samples", args.n_samples >= 1), ("cali_n", args.cali_n >= 1),
                     ("guidance", args.guidance is None or args.guidance >= 1.0)):
        if not ok:
            raise UsageError(f"--{flag} {getattr(args, flag)} is out of range")
    if args.ptq:
        check_quant_flags(args)
    if args.cali_prompts and not Path(args.cali_prompts).is_file():
        raise UsageError(f"--cali_prompts {args.cali_prompts}: no such file")


def conditioning(kind: str, args) -> tuple[str, list] | None:
    """(the flag, its values) this pipeline samples with, or None (unconditional); a missing one is one line."""
    from hf.pipeline import TEXT
    flag, values = (("prompt", args.prompt) if kind in TEXT else ("class_label", args.class_label)
                    if kind == "DiTTransformer2DModel" else (None, None))
    if flag is None:
        if args.prompt or args.class_label:
            raise UsageError(f"a {kind} pipeline is unconditional", "pass no --prompt or --class_label")
        return None
    other = "class_label" if flag == "prompt" else "prompt"
    if getattr(args, other):
        raise UsageError(f"a {kind} pipeline takes no --{other}", f"pass --{flag} ... (repeatable) instead")
    if not values:
        raise UsageError(f"a {kind} pipeline needs --{flag}", f"pass --{flag} ... (repeatable)")
    return flag, values


def main(argv=None) -> dict:
    args = parse_flags(build_parser, argv)
    check_flags(args)
    import diffusers
    from hf.pipeline import DEFAULT_GUIDANCE, denoiser_attr, denoiser_kind
    device = pick_device(args.device)
    set_seed(args.seed)
    pipe = diffusers.DiffusionPipeline.from_pretrained(args.model_dir, local_files_only=True).to(device)
    kind = denoiser_kind(pipe)
    cond = conditioning(kind, args)
    guidance = DEFAULT_GUIDANCE[kind] if args.guidance is None else args.guidance
    out = Path(args.outdir)
    record = {"model_dir": str(args.model_dir), "pipeline": type(pipe).__name__, "denoiser": kind,
              "steps": args.steps, "guidance": guidance, "seed": args.seed, "method": "fp"}
    if cond is not None:
        record[cond[0] + "s"] = cond[1]
    if args.ptq:
        from hf.pipeline import quantize_pipeline
        given = {}
        if cond is not None:
            pool = (Path(args.cali_prompts).read_text().splitlines() if cond[0] == "prompt" and args.cali_prompts
                    else cond[1])
            given = {"prompts" if cond[0] == "prompt" else "class_labels":
                     [pool[i % len(pool)] for i in range(args.cali_n)]}
        method = method_config(args)
        start = time.perf_counter()
        qmodel = quantize_pipeline(pipe, quant_config(args), method, **given, steps=args.steps, guidance=guidance,
                                   run_dir=out, seed=args.seed,
                                   batch_size=args.cali_batch_size if cond is not None else args.cali_n)
        record |= {"method": method.label(), "method_identity": method.identity(), "weight_bit": args.weight_bit,
                   "act_bit": args.act_bit if args.quant_act else None, "calib_seconds": time.perf_counter() - start,
                   "calibration_trajectories": args.cali_n}
        save_quantized(out / "quantized.pt", qmodel.qmodel, method.label(), method_identity=method.identity(),
                       sampler={"scheduler": type(pipe.scheduler).__name__, "steps": args.steps})
        setattr(pipe, denoiser_attr(pipe), qmodel)
    images, start = [], time.perf_counter()
    for i in range(args.n_samples):
        gen = torch.Generator(device=device).manual_seed(args.seed + i)
        call = {"num_inference_steps": args.steps, "generator": gen, "output_type": "np"}
        if cond is not None:
            value = cond[1][i % len(cond[1])]
            call |= {"guidance_scale": guidance} | ({"prompt": value} if cond[0] == "prompt"
                                                     else {"class_labels": [value]})
        images.append((np.clip(pipe(**call).images[0], 0, 1) * 255).round().astype(np.uint8))
    record |= {"sampling_seconds": time.perf_counter() - start, "n_samples": len(images),
               "provenance": provenance(device)}
    save_samples(out, np.stack(images))
    write_json(out / "results.json", record)
    return record
