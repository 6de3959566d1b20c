"""How much do fake quantizers cost when FP and quantized forwards alternate back to back? The same forwards as
tools/bench_sampling.py (the embedded MNIST UNet and its W4A4 TPQ twin, weights quantized once), timed as pairs
within one process: per round a block of FP forwards, then a block of quantized ones. Ratios are per round, then
the median over rounds. On a shared CPU the ratio depends on what ran just before (allocator and cache state);
this is the least favourable order for the quantized model.

    python studies/paired_speed.py --rounds 12 --threads 2 --out results/mnist_paired_speed_cpu.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.files import write_json  # noqa: E402
from ddim import load_config  # noqa: E402
from ddim.checkpoint import load_unet  # noqa: E402
from quant.model import frozen  # noqa: E402
from tools.bench_sampling import ms_per_image, quantized_twin, workload  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/mnist.yml")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    fp = load_unet(cfg, None).eval()
    schedule, x, t = workload(cfg, args.batch, torch.device("cpu"))
    q = quantized_twin(fp, args.bits, x, t, schedule)
    rounds = []
    with frozen(q):
        for r in range(args.rounds):
            fp_ms = ms_per_image(fp, x, t, args.repeats, 1)
            q_ms = ms_per_image(q, x, t, args.repeats, 1)
            rounds.append({"fp_ms": fp_ms, "quant_ms": q_ms})
            print(f"round {r + 1}: FP {fp_ms:.3f} ms/img, W{args.bits}A{args.bits} TPQ {q_ms:.3f} "
                  f"({q_ms / fp_ms:.3f}x)", flush=True)
    summary = {"x_fp32": statistics.median(r["quant_ms"] / r["fp_ms"] for r in rounds),
               "fp_ms": statistics.median(r["fp_ms"] for r in rounds),
               "quant_ms": statistics.median(r["quant_ms"] for r in rounds)}
    result = {"config": args.config, "batch": args.batch, "bits": args.bits, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "rounds": rounds, "median": summary}
    write_json(args.out, result)
    print(summary)
    return result


if __name__ == "__main__":
    main()
