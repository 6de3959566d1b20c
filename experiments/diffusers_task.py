"""A local diffusers pipeline folder quantized and sampled (scripts/quantize_diffusers.py): load (never from a hub
id) -> quantize the UNet with --quant_mode and its flags, calibrated on the pipeline's own guided sampling
(hf.pipeline) -> sample -> samples.npz, grid.png, images/, quantized.pt and results.json with provenance.

The method flags are the other scripts' (experiments/flags.py): --weight_bit, --act_bit, --split, --quant_mode and
each method's options. --cali_n is the number of calibration prompts (one guided trajectory each, every step kept).
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

PIPELINE_FILES = ("model_index.json", "unet/config.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model_dir", required=True, help="a local diffusers pipeline folder (save_pretrained)")
    p.add_argument("--prompt", action="append", default=None, help="a sampling prompt (repeatable)")
    p.add_argument("--cali_prompts", default=None, help="a text file of calibration prompts, one per line "
                                                        "(default: the sampling prompts in turn)")
    p.add_argument("--steps", type=int, default=50, help="scheduler steps (calibration and sampling)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--n_samples", type=int, default=4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--outdir", required=True)
    p.add_argument("--device", default=None)
    add_quant_flags(p)
    return p


def check_flags(args) -> None:
    folder = Path(args.model_dir)
    missing = [f for f in PIPELINE_FILES if not (folder / f).is_file()]
    if missing:
        raise UsageError(f"--model_dir {folder} is not a diffusers pipeline folder (no {', '.join(missing)})",
                         "pass the folder a pipeline's save_pretrained wrote (hub ids are never fetched)")
    if not args.prompt:
        raise UsageError("no --prompt given", "pass --prompt \"...\" (repeatable)")
    for flag, ok in (("steps", args.steps >= 1), ("n_samples", args.n_samples >= 1), ("cali_n", args.cali_n >= 1),
                     ("guidance", args.guidance >= 1.0)):
        if not ok:
            raise UsageError(f"--{flag} {getattr(args, flag)} is out of range")
    if args.ptq:
        check_quant_flags(args)
    if args.cali_prompts and not Path(args.cali_prompts).is_file():
        raise UsageError(f"--cali_prompts {args.cali_prompts}: no such file")


def main(argv=None) -> dict:
    args = parse_flags(build_parser, argv)
    check_flags(args)
    import diffusers
    device = pick_device(args.device)
    set_seed(args.seed)
    pipe = diffusers.DiffusionPipeline.from_pretrained(args.model_dir, local_files_only=True).to(device)
    out = Path(args.outdir)
    record = {"model_dir": str(args.model_dir), "pipeline": type(pipe).__name__, "steps": args.steps,
              "guidance": args.guidance, "seed": args.seed, "prompts": args.prompt, "method": "fp"}
    if args.ptq:
        from hf.pipeline import quantize_unet
        cali = (Path(args.cali_prompts).read_text().splitlines() if args.cali_prompts else args.prompt)
        cali = [cali[i % len(cali)] for i in range(args.cali_n)]
        method = method_config(args)
        start = time.perf_counter()
        qunet = quantize_unet(pipe, quant_config(args), method, cali, args.steps, args.guidance, out, seed=args.seed,
                              batch_size=args.cali_batch_size)
        record |= {"method": method.label(), "method_identity": method.identity(), "weight_bit": args.weight_bit,
                   "act_bit": args.act_bit if args.quant_act else None, "calib_seconds": time.perf_counter() - start,
                   "calibration_prompts": len(cali)}
        save_quantized(out / "quantized.pt", qunet.qmodel, method.label(), method_identity=method.identity(),
                       sampler={"scheduler": type(pipe.scheduler).__name__, "steps": args.steps})
        pipe.unet = qunet
    images, start = [], time.perf_counter()
    for i in range(args.n_samples):
        gen = torch.Generator(device=device).manual_seed(args.seed + i)
        result = pipe(args.prompt[i % len(args.prompt)], num_inference_steps=args.steps, guidance_scale=args.guidance,
                      generator=gen, output_type="np")
        images.append((np.clip(result.images[0], 0, 1) * 255).round().astype(np.uint8))
    record |= {"sampling_seconds": time.perf_counter() - start, "n_samples": len(images),
               "provenance": provenance(device)}
    save_samples(out, np.stack(images))
    write_json(out / "results.json", record)
    return record
