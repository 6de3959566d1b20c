#!/usr/bin/env bash
# Embedded default: FP, baseline PTQ and DilateQuant at W8A8/W6A6/W4A4 on the MNIST DDIM model.
# Regenerates results/mnist.md (+ .png, mnist_runs/). Extra arguments go to scripts/run_task.py (e.g.
# --only dilatequant_w4a4); finished runs (same settings and inputs) are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python scripts/run_task.py --task configs/tasks/mnist.yml --report results/mnist.md "$@"
