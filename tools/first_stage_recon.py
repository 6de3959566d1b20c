"""The floor under any LDM sample: how well the first stage (autoencoder) reconstructs the real images.

    python tools/first_stage_recon.py --config configs/latent-diffusion/mnist-ldm-kl-4.yaml \
        --out results/mnist_ldm_first_stage.json

Encodes each real image of the config's reference set (image.reference; digits padded as in training), decodes
the posterior mode, and reports the per-image PSNR (uint8 scale, inside the padding) and FID/sFID of the
reconstructions against the real images. No sample of the LDM can be closer to the data than this.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common.files import write_json  # noqa: E402
from common.device import pick_device  # noqa: E402
from ddim.data import to_model_range  # noqa: E402
from diffusion.sampling import to_uint8  # noqa: E402
from evaluation.fid import evaluate, load_reference_images  # noqa: E402
from experiments.flags import HelpFormatter  # noqa: E402
from ldm.checkpoint import load_model_from_config  # noqa: E402
from ldm.train import reconstruction_psnr  # noqa: E402
from ldm.util import load_config  # noqa: E402


@torch.no_grad()
def reconstructions(ae, images: torch.Tensor, crop: int, batch_size: int = 500) -> np.ndarray:
    """uint8 NHWC reconstructions (posterior mode), cropped like the samples."""
    out = []
    for i in range(0, len(images), batch_size):
        rec = ae.decode(ae.encode(images[i:i + batch_size]).mode())
        out.append(to_uint8(rec[..., crop:-crop, crop:-crop] if crop else rec))
    return np.concatenate(out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", default="configs/latent-diffusion/mnist-ldm-kl-4.yaml")
    p.add_argument("--ckpt", default=None, help="default: the checkpoint the config names")
    p.add_argument("--ref", default=None, help="real images (default: the config's image.reference)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="JSON file for the numbers")
    args = p.parse_args(argv)
    config = load_config(args.config)
    ref = args.ref or config.get("image", {}).get("reference")
    if ref is None:
        raise SystemExit("no reference images: pass --ref (a name or an .npz of real uint8 NHWC images)")
    device = pick_device(args.device)
    ae = load_model_from_config(config, args.ckpt, config_path=args.config).first_stage_model.to(device).eval()
    crop = int(config.get("image", {}).get("crop", 0))
    real = to_model_range(load_reference_images(ref))
    x = F.pad(real, (crop,) * 4, value=-1.0).to(device)           # as the digits were padded for training
    psnr = reconstruction_psnr(ae, x, crop).cpu()
    metrics = evaluate(reconstructions(ae, x, crop), ref=ref, device=device)
    record = {"config": args.config, "ref": ref, "n_images": len(real), "psnr_db_mean": float(psnr.mean()),
              "psnr_db_median": float(psnr.median()), "fid": metrics["fid"], "sfid": metrics["sfid"],
              "command": "python tools/first_stage_recon.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(json.dumps(record, indent=2))
    if args.out:
        write_json(args.out, record)
    return record


if __name__ == "__main__":
    from common.errors import entry_point
    entry_point(main)
