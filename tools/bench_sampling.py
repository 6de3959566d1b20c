"""Milliseconds per image per network call (one sampling step) of a DDIM UNet: FP32, autocast FP16/BF16 and
fake-quantized W8A8 / W4A4 TPQ side by side, on any device.

    python tools/bench_sampling.py --config configs/mnist.yml --batch 100 --threads 2
    python tools/bench_sampling.py --config configs/cifar10.yml --random_weights --device cuda --batch 256 --compile

The quantized twins are calibrated on random inputs over a 100-step quad schedule: only their speed is
meaningful. They run as sampling runs them, with weights quantized once (quant.model.frozen). Each time is
the median of --repeats forwards after --warmup ones (CUDA timed with synchronisation); with --rounds R every
row is timed R times in rotation and the table gives medians, the ratio to FP32 as the median of each round's
ratio. --compile adds torch.compile'd rows (the first calls compile and are not timed). --out writes JSON.
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


def workload(cfg, batch: int, device: torch.device) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(schedule, x, t): a 100-step quad schedule and a seeded batch of noise with timesteps drawn from it."""
    gen = torch.Generator().manual_seed(0)
    schedule = timestep_sequence(cfg.diffusion.num_diffusion_timesteps, 100, "quad")
    x = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, generator=gen).to(device)
    t = torch.tensor(schedule)[torch.randint(0, len(schedule), (batch,), generator=gen)].to(device)
    return schedule, x, t


def quantized_twin(fp, bits: int, x, t, schedule) -> QuantModel:
    """A TPQ model calibrated on the first noise image at each timestep of the schedule (every slot needs
    samples; only the speed is measured)."""
    q = QuantModel(fp, QuantConfig(weight_bit=bits, act_bit=bits, temporal=True), schedule)
    steps = torch.unique(torch.tensor(schedule))
    calib = CalibSet(x[:1].cpu().expand(len(steps), *x.shape[1:]).contiguous(), steps)
    return calibrate(q, calib, batch_size=len(x))


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
        if args.compile:                                   # compiled once, on the first call
            out.append((f"fake-quant W{bits}A{bits} TPQ, compiled",
                        lambda q=q, cq=torch.compile(q): _frozen_ms(q, cq, x, t, args)))
    if args.compile:
        cfp = torch.compile(fp)
        out.append(("FP32, compiled", lambda: ms_per_image(cfp, x, t, args.repeats, args.warmup)))
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
    p.add_argument("--rounds", type=int, default=1, help="time every row this many times, in rotation; report "
                   "medians (a noisy machine drifts between rows)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd FP and fake-quant models")
    p.add_argument("--out", default=None, help="write the table as JSON here")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds} is out of range: use >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    device = pick_device(args.device)
    fp = (UNet(cfg.model) if args.random_weights else load_unet(cfg, args.ckpt)).to(device).eval()
    schedule, x, t = workload(cfg, args.batch, device)

    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"{cfg.name} UNet ({sum(p.numel() for p in fp.parameters()) / 1e6:.2f} M params), batch {args.batch}, "
          f"{where}, torch {torch.__version__}")
    thunks = rows(fp, x, t, schedule, args)
    times = {label: [] for label, _ in thunks}
    for r in range(args.rounds):                     # rows in rotation: each round's ratios share its machine state
        fp_ms = None
        for label, thunk in thunks:
            ms = thunk()
            fp_ms = fp_ms or ms
            times[label].append((ms, ms / fp_ms))
            print(f"  {label:<34} {ms:8.4f} ms/img  {ms / fp_ms:5.2f}x FP32"
                  + (f"  (round {r + 1}/{args.rounds})" if args.rounds > 1 else ""), flush=True)
    table = [{"mode": label, "ms_per_image": statistics.median(ms for ms, _ in v),
              "x_fp32": statistics.median(ratio for _, ratio in v), "rounds": [ms for ms, _ in v]}
             for label, v in times.items()]
    if args.rounds > 1:
        print(f"median over {args.rounds} rounds (ratio: median of each round's ratio to that round's FP32):")
        for row in table:
            print(f"  {row['mode']:<34} {row['ms_per_image']:8.4f} ms/img  {row['x_fp32']:5.2f}x FP32")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"config": args.config, "batch": args.batch, "device": where,
                                              "torch": torch.__version__, "repeats": args.repeats,
                                              "rounds": args.rounds, "rows": table}, indent=2) + "\n")


if __name__ == "__main__":
    from common.errors import entry_point
    entry_point(main)
