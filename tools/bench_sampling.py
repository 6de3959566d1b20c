"""Milliseconds per image per network call (one sampling step) of a DDIM UNet: FP32, autocast FP16/BF16 and
fake-quantized W8A8 / W4A4 TPQ side by side, on any device.

    python tools/bench_sampling.py --config configs/mnist.yml --batch 100 --threads 2
    python tools/bench_sampling.py --config configs/cifar10.yml --random_weights --device cuda --batch 256 --compile

The quantized twins are calibrated on random inputs over a 100-step quad schedule: only their speed is
meaningful. They run as sampling runs them, with weights quantized once (quant.model.frozen). Each time is
the median of --repeats forwards after --warmup ones (CUDA timed with synchronisation). --compile adds
torch.compile'd rows (the first calls compile and are not timed). --out writes the table as JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ddim import UNet, load_config, timestep_sequence  # noqa: E402
from ddim.checkpoint import load_unet  # noqa: E402
from quant.calib_data import CalibSet  # noqa: E402
from quant.calibrate import calibrate  # noqa: E402
from quant.model import QuantModel, frozen  # noqa: E402
from quant.settings import QuantConfig  # noqa: E402
from common.device import pick_device  # noqa: E402


def ms_per_image(model, x, t, repeats: int, warmup: int, autocast: torch.dtype | None = None) -> float:
    device = x.device
    amp = torch.autocast(device.type, dtype=autocast) if autocast else nullcontext()

    def call():
        with amp:
            model(x, t)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.no_grad():
        for _ in range(warmup):
            call()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times) / x.shape[0]


def quantized_twin(fp, bits: int, x, t, schedule) -> QuantModel:
    q = QuantModel(fp, QuantConfig(weight_bit=bits, act_bit=bits, temporal=True), schedule)
    return calibrate(q, CalibSet(x.cpu(), t.cpu()), batch_size=len(x))


def rows(fp, x, t, schedule, args) -> list[tuple[str, callable]]:
    """(label, timing thunk) of every mode this device supports."""
    out = [("FP32", lambda: ms_per_image(fp, x, t, args.repeats, args.warmup))]
    amp = [torch.bfloat16] if x.device.type == "cpu" else [torch.float16, torch.bfloat16]
    for dtype in amp:
        out.append((f"FP32 + autocast {str(dtype).removeprefix('torch.')}",
                     lambda d=dtype: ms_per_image(fp, x, t, args.repeats, args.warmup, autocast=d)))
    for bits in (8, 4):
        q = quantized_twin(fp, bits, x, t, schedule)
        out.append((f"fake-quant W{bits}A{bits} TPQ", lambda q=q: _frozen_ms(q, q, x, t, args)))
        if args.compile:
            out.append((f"fake-quant W{bits}A{bits} TPQ, compiled",
                        lambda q=q: _frozen_ms(q, torch.compile(q), x, t, args)))
    if args.compile:
        out.append(("FP32, compiled", lambda: ms_per_image(torch.compile(fp), x, t, args.repeats, args.warmup)))
    return out


def _frozen_ms(q: QuantModel, callable_model, x, t, args) -> float:
    with frozen(q):
        return ms_per_image(callable_model, x, t, args.repeats, args.warmup)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/mnist.yml")
    p.add_argument("--ckpt", default=None, help="default: the config's shipped checkpoint")
    p.add_argument("--random_weights", action="store_true", help="random weights (speed only; e.g. cifar10.yml)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd FP and fake-quant models")
    p.add_argument("--out", default=None, help="write the table as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    device = pick_device(args.device)
    fp = (UNet(cfg.model) if args.random_weights else load_unet(cfg, args.ckpt)).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    schedule = timestep_sequence(cfg.diffusion.num_diffusion_timesteps, 100, "quad")
    x = torch.randn(args.batch, cfg.channels, cfg.image_size, cfg.image_size, generator=gen).to(device)
    t = torch.tensor(schedule)[torch.randint(0, len(schedule), (args.batch,), generator=gen)].to(device)

    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"{cfg.name} UNet ({sum(p.numel() for p in fp.parameters()) / 1e6:.2f} M params), batch {args.batch}, "
          f"{where}, torch {torch.__version__}")
    table, fp_ms = [], None
    for label, thunk in rows(fp, x, t, schedule, args):
        ms = thunk()
        fp_ms = fp_ms or ms
        table.append({"mode": label, "ms_per_image": ms, "x_fp32": ms / fp_ms})
        print(f"  {label:<34} {ms:8.4f} ms/img  {ms / fp_ms:5.2f}x FP32", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"config": args.config, "batch": args.batch, "device": where,
                                              "torch": torch.__version__, "rows": table}, indent=2) + "\n")


if __name__ == "__main__":
    from common.errors import entry_point
    entry_point(main)
