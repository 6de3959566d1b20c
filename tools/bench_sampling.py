"""Milliseconds per image per sampling step of the FP network (and its fake-quantized W4A4 TPQ twin).

    python tools/bench_sampling.py --config configs/mnist.yml --batch 100 --threads 2

One sampling step is one network evaluation; the time is the median of --repeats forwards after a
warm-up. The quantized twin is calibrated on random inputs: only its speed is meaningful here.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ddim import load_config  # noqa: E402
from ddim.checkpoint import load_unet  # noqa: E402
from quant.calib_data import CalibSet  # noqa: E402
from quant.calibrate import calibrate  # noqa: E402
from quant.model import QuantModel  # noqa: E402
from quant.settings import QuantConfig  # noqa: E402


@torch.no_grad()
def ms_per_image(model, x, t, repeats: int) -> float:
    model(x, t)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x, t)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times) / x.shape[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/mnist.yml")
    p.add_argument("--ckpt", default=None)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    fp = load_unet(cfg, args.ckpt)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, cfg.channels, cfg.image_size, cfg.image_size, generator=gen)
    t = torch.randint(0, 1000, (args.batch,), generator=gen)
    q = QuantModel(fp, QuantConfig(weight_bit=4, act_bit=4, temporal=True), sorted(set(t.tolist())))
    calibrate(q, CalibSet(x, t))
    fp_ms, q_ms = ms_per_image(fp, x, t, args.repeats), ms_per_image(q, x, t, args.repeats)
    print(f"{cfg.name}: batch {args.batch}, {torch.get_num_threads()} threads: FP {fp_ms:.2f} ms per image per step, "
          f"fake-quant W4A4 TPQ {q_ms:.2f} ms ({q_ms / fp_ms:.2f}x)")


if __name__ == "__main__":
    main()
