#!/usr/bin/env bash
# ImageNet 256, class-conditional LDM-4 cin256-v2, the paper's settings (configs/tasks/imagenet.yml).
#   bash scripts/for_imagenet.sh [CKPT] [REAL_IMAGES_NPZ] [run_task args, e.g. --only fp,dilatequant_w4a4]
#   bash scripts/for_imagenet.sh --embedded [run_task args]   the same settings on the embedded MNIST LDM
#                                                               (configs/tasks/mnist_ldm.yml), which runs offline
# CKPT: CompVis's cin256-v2 model.ckpt with its config.yaml beside it (default models/ldm/cin256-v2/);
# REAL_IMAGES_NPZ: real ImageNet images, uint8 NHWC 256x256 under arr_0 (default data/imagenet_real.npz).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_need.sh
if [ "${1:-}" = "--embedded" ]; then
  shift
  check_options "$@"
  bash scripts/setup.sh
  exec .venv/bin/python scripts/run_task.py --task configs/tasks/mnist_ldm.yml "$@"
fi
check_options "$@"
ckpt=models/ldm/cin256-v2/model.ckpt; ref=data/imagenet_real.npz
if [ $# -gt 0 ] && [[ $1 != -* ]]; then ckpt=$1; shift; fi
if [ $# -gt 0 ] && [[ $1 != -* ]]; then ref=$1; shift; fi
need "$ckpt" "the cin256-v2 checkpoint" "download CompVis latent-diffusion's cin256-v2 (model.ckpt + config.yaml) there, pass its path first, or run --embedded"
need "$(dirname "$ckpt")/config.yaml" "its config.yaml" "CompVis ships it beside model.ckpt (or copy configs/latent-diffusion/cin256-v2.yaml there)"
need "$ref" "the real ImageNet images for FID" "an .npz of uint8 NHWC images under arr_0, or pass its path second"
bash scripts/setup.sh
exec .venv/bin/python scripts/run_task.py --task configs/tasks/imagenet.yml "$@" -- -r "$ckpt" --ref "$ref"
