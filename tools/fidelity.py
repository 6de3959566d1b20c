"""How faithfully each run reproduces the FP model: FID and sFID of its samples against the FP model's own
samples, and the PSNR between paired samples (same seed, so the same x_T image by image; eta 0, so the same
trajectory up to quantization).

    python tools/fidelity.py runs/mnist/fp/samples.npz runs/mnist_ablation/*/samples.npz \\
        --out results/mnist_ablation_fidelity.json

FID against real images (tools/fid.py) scores sample quality, and so also rewards a quantization error that
happens to move samples toward the data. FID against FP samples scores what quantization tries to keep,
the FP model's output distribution; PSNR scores it image by image. The first file is the FP reference;
a file equal to it is skipped. A `<name>.json` record beside a `<name>.npz` (results_table's archive
layout) or a results.json beside a samples.npz (a run folder) supplies the FID against real images for the table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from common.files import write_json  # noqa: E402
from evaluation.fid import InceptionExtractor, feature_stats, fid_sfid, load_images_npz  # noqa: E402
from evaluation.fidelity import paired_psnr_db  # noqa: E402


def run_record(npz: Path) -> dict:
    """The run's results record beside its samples, if any."""
    for path in (npz.with_suffix(".json"), npz.parent / "results.json"):
        if path.is_file():
            return json.loads(path.read_text())
    return {}


def name_of(npz: Path) -> str:
    return npz.parent.name if npz.stem == "samples" else npz.stem


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("fp", help="npz of the FP model's samples (the reference)")
    p.add_argument("runs", nargs="+", help="npz of quantized runs' samples, drawn with the same seed and count")
    p.add_argument("--device", default=None)
    p.add_argument("--batch_size", type=int, default=50)
    p.add_argument("--no_fid", action="store_true", help="paired PSNR only (no Inception: seconds instead of minutes)")
    p.add_argument("--out", default=None, help="JSON file for the rows")
    args = p.parse_args(argv)

    fp_path = Path(args.fp)
    fp_images = load_images_npz(fp_path)
    runs = [Path(r) for r in args.runs if Path(r).resolve() != fp_path.resolve()]
    pairs = {r: load_images_npz(r) for r in runs}
    psnrs = {}                                                   # fail on a bad file before any Inception work
    for r, images in pairs.items():
        try:
            psnrs[r] = paired_psnr_db(fp_images, images)
        except ValueError as e:
            raise ValueError(f"{r} against {fp_path}: {e}") from None
    if not args.no_fid:
        extractor = InceptionExtractor(args.device)
        fp_stats = feature_stats(extractor(fp_images, args.batch_size))
    rows = []
    for r, images in pairs.items():
        fid = {"fid_to_fp": None, "sfid_to_fp": None}
        if not args.no_fid:
            d = fid_sfid(feature_stats(extractor(images, args.batch_size)), fp_stats)
            fid = {"fid_to_fp": d["fid"], "sfid_to_fp": d["sfid"]}
        psnr = psnrs[r]
        record = run_record(r)
        finite = psnr[np.isfinite(psnr)]
        rows.append({"run": name_of(r), "npz": str(r), "method": record.get("method")} | fid | {
            "psnr_median_db": float(np.median(psnr)),
            "psnr_mean_db": float(finite.mean()) if finite.size else float("inf"),
            "identical_images": int(np.isinf(psnr).sum()), "mean_px": float(images.mean()),
            "fid_to_real": record.get("fid"), "sfid_to_real": record.get("sfid")})
        print(json.dumps(rows[-1]), flush=True)
    print(markdown(rows, fp_path))
    report = {"fp": str(fp_path), "n": len(fp_images), "fp_mean_px": float(fp_images.mean()), "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, report)
    return report


def markdown(rows: list[dict], fp_path: Path) -> str:
    def num(v):
        return "-" if v is None else f"{v:.2f}"
    lines = [f"FP reference: {fp_path}", "",
             "| run | FID to FP | sFID to FP | PSNR median dB | mean pixel | FID to real | sFID to real |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {num(r['fid_to_fp'])} | {num(r['sfid_to_fp'])} | {num(r['psnr_median_db'])} | "
              f"{num(r['mean_px'])} | {num(r['fid_to_real'])} | {num(r['sfid_to_real'])} |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    from common.errors import entry_point
    entry_point(main)
