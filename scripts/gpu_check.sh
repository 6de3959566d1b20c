#!/usr/bin/env bash
# The GPU check (tools/gpu_check.py): cuda tests, the sampling benchmark at CIFAR-10 size, and DilateQuant
# W4A4 calibration + sampling on the embedded model; prints a table, writes results/gpu_check/.
# Runs with the python3 on PATH (a stock CUDA image needs torch, numpy, pyyaml, tqdm, pillow, pytest, scipy).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PY" tools/gpu_check.py "$@"
