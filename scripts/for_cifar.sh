#!/usr/bin/env bash
# DDIM CIFAR-10 (paper Table 1 settings). Usage:
#   bash scripts/for_cifar.sh /path/to/model-790000.ckpt /path/to/cifar10_train_uint8.npz [run_task args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_need.sh
ckpt=${1:-}; ref=${2:-}
if [ -z "$ckpt" ] || [ ! -f "$ckpt" ]; then
  echo "for_cifar.sh: pass the public DDIM CIFAR-10 checkpoint (ema_cifar10 model-790000.ckpt) as the first argument" >&2
  exit 2
fi
if [ -z "$ref" ] || [ ! -f "$ref" ]; then
  echo "for_cifar.sh: pass real CIFAR-10 images (.npz, uint8 NHWC, key arr_0) for FID as the second argument" >&2
  exit 2
fi
shift 2
check_options "$@"
bash scripts/setup.sh
.venv/bin/python scripts/run_task.py --task configs/tasks/cifar10.yml "$@" -- --ckpt "$ckpt" --ref "$ref"
