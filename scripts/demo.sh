#!/usr/bin/env bash
# The main job on the embedded default: FP vs baseline PTQ vs DilateQuant at W4A4 on the MNIST DDIM
# model shipped in models/mnist/, with real (offline) FID/sFID. Sets up .venv first if needed.
# Outputs go to runs/mnist_quick/ (table: runs/mnist_quick/report.md); nothing under results/ changes.
# Extra arguments go to scripts/run_task.py; `bash scripts/for_mnist.sh` runs the full tables.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python scripts/run_task.py --task configs/tasks/mnist.yml --preset quick "$@"
