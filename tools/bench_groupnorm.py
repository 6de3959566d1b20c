"""GroupNorm on a channels-last activation: torch's channels-last kernel against a contiguous copy plus the
contiguous kernel (then back to channels-last, as quant.deploy's integer model does for narrow groups), at the
shapes of the embedded LDM, the embedded MNIST DDIM and the CIFAR-10 UNet. The reason for
quant.deploy.model.NARROW_GROUP.

    python tools/bench_groupnorm.py --out results/bench_groupnorm_cpu.json

Times are the fastest of --repeats calls after two warm-up calls, in ms, on this process's threads.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.files import write_json  # noqa: E402
from quant.deploy.model import NARROW_GROUP  # noqa: E402

# (network, batch rows, channels, height = width), 32 groups as in every UNet here
SHAPES = [("MNIST LDM", 500, 32, 8), ("MNIST LDM", 500, 64, 8), ("MNIST LDM", 500, 64, 4),
          ("MNIST DDIM", 250, 64, 28), ("MNIST DDIM", 250, 128, 14), ("MNIST DDIM", 250, 128, 7),
          ("CIFAR-10", 64, 128, 32), ("CIFAR-10", 64, 256, 16), ("CIFAR-10", 64, 256, 8), ("CIFAR-10", 64, 256, 4)]
GROUPS = 32


def fastest_ms(fn, repeats: int) -> float:
    fn(), fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


@torch.no_grad()
def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats} is out of range: use >= 1")
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms, fastest of {args.repeats}")
    for net, n, c, h in SHAPES:
        x = torch.randn(n, c, h, h, generator=torch.Generator().manual_seed(0)).contiguous(
            memory_format=torch.channels_last)
        norm = torch.nn.GroupNorm(GROUPS, c)
        cl = fastest_ms(lambda: norm(x), args.repeats)
        copied = fastest_ms(lambda: norm(x.contiguous()).contiguous(memory_format=torch.channels_last), args.repeats)
        per_group = c // GROUPS
        rows.append({"network": net, "shape": [n, c, h, h], "channels_per_group": per_group,
                     "channels_last_ms": cl, "contiguous_copy_ms": copied,
                     "integer_model_uses": "contiguous copy" if per_group <= NARROW_GROUP else "channels-last"})
        print(f"  {net:<11} [{n}, {c}, {h}, {h}] {per_group} ch/group: channels-last {cl:7.2f}, contiguous copy "
              f"{copied:7.2f} ({cl / copied:4.1f}x)  -> {rows[-1]['integer_model_uses']}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, {"torch": torch.__version__, "threads": torch.get_num_threads(),
                              "repeats": args.repeats, "rows": rows})
    return rows


if __name__ == "__main__":
    from common.errors import entry_point
    entry_point(main)
