"""FID and sFID of generated samples against real images (and IS when its real weights are on disk).

    python tools/fid.py --samples runs/x/samples.npz --ref mnist [--out runs/x/results.json]

--samples and an .npz --ref hold uint8 NHWC images under `arr_0` or `images`. A named --ref is one of
evaluation.fid.REFERENCES; its Inception statistics are cached under cache/ref_stats/ on first use.
--out merges the metrics into a JSON record (created if absent).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.runtime import update_json  # noqa: E402
from evaluation.fid import evaluate, load_images_npz  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", required=True, help="npz of generated uint8 NHWC images")
    p.add_argument("--ref", default="mnist", help="reference set name or npz of real uint8 NHWC images")
    p.add_argument("--out", default=None, help="JSON record to merge the metrics into")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--batch_size", type=int, default=50)
    p.add_argument("--is_weights", default=None,
                   help="Inception weights with classifier head for IS (default: look in torch hub's cache)")
    args = p.parse_args(argv)

    images = load_images_npz(args.samples)
    result = evaluate(images, ref=args.ref, device=args.device, batch_size=args.batch_size,
                      is_weights=args.is_weights)
    print(f"FID {result['fid']:.3f}  sFID {result['sfid']:.3f}  (n={result['n_samples']}, ref={result['ref']})")
    print(f"IS {result['is']:.3f}" if result["is"] is not None else result["is_note"])
    if args.out:
        update_json(args.out, result)


if __name__ == "__main__":
    from common.errors import entry_point
    entry_point(main)
