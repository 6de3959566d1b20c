"""Gather runs' results.json into a markdown table and a sample-grid figure (experiments/report.py).

    python tools/results_table.py runs/mnist --out results/mnist.md
    python tools/results_table.py --archive results/mnist_runs --out results/mnist_headline.md \\
        --only fp,baseline_w4a4,dilatequant_w4a4

Rows are archived in <out>_runs/ (or --archive) and drawn from there. The table lists, per row, the commit of
the code that made it; rows of different method versions are refused in one table unless --allow_mixed_versions.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.flags import HelpFormatter  # noqa: E402
from experiments.report import write_report  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="?", default=None, help="a folder of run directories to add to the archive")
    p.add_argument("--out", required=True, help="the table (.md; its figure is the .png beside it)")
    p.add_argument("--archive", default=None, help="the archive of rows and samples (default: <out>_runs/)")
    p.add_argument("--title", default=None)
    p.add_argument("--only", default=None, help="comma-separated runs to show (default: every archived run)")
    p.add_argument("--allow_mixed_versions", action="store_true", help="allow rows of different method versions")
    args = p.parse_args(argv)
    only = args.only.split(",") if args.only else None
    report = write_report(Path(args.runs) if args.runs else None, Path(args.out), args.title or args.out, only,
                          args.allow_mixed_versions, Path(args.archive) if args.archive else None)
    print(report.read_text())


if __name__ == "__main__":
    from common.errors import entry_point
    entry_point(main)
