"""How close is the integer backend to the simulation, against how close the simulation is to itself?

The simulation (fake quantization, float32) rounds its sums differently from the exact integer products of the
integer backend; where such a difference moves a value across a rounding boundary of the next quantizer, one
code changes, and a 4-bit chain carries that change to the sample. This study samples the same images from the
same noise three ways, with one calibrated checkpoint: the simulation in float32 (what the tables use), the
simulation in float64 (its sums nearly exact), and the integer backend; and reports the median PSNR between each
pair. The float32 simulation's distance to the float64 one is its own rounding floor.

    python studies/int_rounding_floor.py --cali_ckpt runs/mnist/dilatequant_w4a4/quantized.pt --images 250 \\
        --out results/mnist_int_rounding_floor_w4a4.json
    python studies/int_rounding_floor.py --config configs/latent-diffusion/mnist-ldm-kl-4.yaml \\
        --cali_ckpt runs/mnist_ldm/dilatequant_w4a4/quantized.pt --images 250 --steps 20 \\
        --out results/mnist_ldm_int_rounding_floor_w4a4.json

With an LDM config (the embedded class-conditional LDM), the images are its guided samples (guidance --scale,
classes 0, 1, ... in turn, the FP autoencoder decoding), as scripts/sample_diffusion_ldm.py draws them.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.files import write_json  # noqa: E402
from ddim import load_config, make_betas  # noqa: E402
from ddim.checkpoint import load_unet  # noqa: E402
from ddim.sampling import generate, make_sampler  # noqa: E402
from evaluation.fidelity import paired_psnr_db  # noqa: E402
from quant.checkpoint import load_quantized  # noqa: E402
from quant.deploy import convert  # noqa: E402
from quant.model import frozen  # noqa: E402


class Float64(torch.nn.Module):
    """A model run in float64 on float32 inputs (its output cast back)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, **cond):
        return self.model(x.double(), t, **{k: v.double() if v.is_floating_point() else v
                                            for k, v in cond.items()}).float()


def ldm_drawer(args):
    """(the FP UNet, draw(model) -> uint8 images) for an LDM config: guided class-conditional DDIM sampling, as
    scripts/sample_diffusion_ldm.py draws it (classes 0, 1, ... in turn; x_T from --seed)."""
    from experiments.ldm_task import Conditioning
    from ldm.checkpoint import load_model_from_config
    from diffusion.samplers import make_sampler as ldm_sampler
    from tools.ldm_images import class_conditional_images
    from ldm.util import load_config as ldm_config
    config = ldm_config(args.config)
    ldm = load_model_from_config(config, Path(config["ckpt"]), config_path=Path(args.config)).eval()
    sampler = ldm_sampler("ddim", args.steps, ldm.alphas_cumprod.double().cpu())
    cond = Conditioning(ldm, config)
    fp, crop = ldm.model.diffusion_model, int(config.get("image", {}).get("crop", 0))

    def draw(model) -> np.ndarray:
        ldm.model.diffusion_model = model
        try:
            return class_conditional_images(ldm, sampler, cond.for_images(0, args.images), args.scale, cond.null,
                                            args.seed, args.batch, crop)
        finally:
            ldm.model.diffusion_model = fp
    return fp, draw


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cali_ckpt", required=True, help="a calibrated quantized.pt of the embedded DDIM model")
    p.add_argument("--config", default="configs/mnist.yml", help="a DDIM config, or an LDM config (.yaml)")
    p.add_argument("--scale", type=float, default=3.0, help="LDM: the guidance scale")
    p.add_argument("--images", type=int, default=250)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--seed", type=int, default=1234, help="the noise seed (the tables' runs: 1234)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.config.endswith(".yaml"):
        fp, draw = ldm_drawer(args)
    else:
        cfg = load_config(args.config)
        fp = load_unet(cfg).eval()
        sample = make_sampler(make_betas(cfg.diffusion), args.steps, "quad", 0.0)
        shape, device = (cfg.channels, cfg.image_size, cfg.image_size), torch.device("cpu")

        def draw(model) -> np.ndarray:
            return generate(model, sample, args.images, shape, args.batch, args.seed, device)[0]
    qmodel, payload = load_quantized(args.cali_ckpt, fp)
    qmodel.eval()

    with frozen(qmodel):
        images = {"fake float32": draw(qmodel)}
    q64 = copy.deepcopy(qmodel).double()
    for _, layer in q64.quant_layers():      # a layer fed float32 by the network (an LDM's timestep embedding)
        layer.register_forward_pre_hook(lambda m, a: tuple(v.double() if torch.is_tensor(v) and v.is_floating_point()
                                                           else v for v in a))
    for m in q64.modules():                  # the LDM's GroupNorm32 computes in float32 by design: here in float64
        if isinstance(m, torch.nn.GroupNorm) and type(m) is not torch.nn.GroupNorm:
            m.forward = torch.nn.GroupNorm.forward.__get__(m)
    with frozen(q64):
        images["fake float64"] = draw(Float64(q64))
    images["int"] = draw(convert(qmodel))
    pairs = [("fake float32", "fake float64"), ("int", "fake float32"), ("int", "fake float64")]
    report = {"config": args.config, "cali_ckpt": args.cali_ckpt, "method": payload["method"], "images": args.images, "steps": args.steps,
              "seed": args.seed, "median_psnr_db": {}}
    for a, b in pairs:
        psnr = paired_psnr_db(images[a], images[b])
        report["median_psnr_db"][f"{a} vs {b}"] = float(np.median(psnr))
        print(f"{a:>12} vs {b:<12} median PSNR {np.median(psnr):6.2f} dB (10th percentile "
              f"{np.percentile(psnr, 10):.2f})", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    from common.errors import entry_point
    entry_point(main)
