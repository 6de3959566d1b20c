#!/usr/bin/env bash
# LSUN-Bedroom 256, LDM-4 (VQ-f4), the paper's settings (configs/tasks/bedroom.yml).
#   bash scripts/for_bedroom.sh [CKPT] [REAL_IMAGES_NPZ] [run_task args, e.g. --only fp,dilatequant_w4a4]
# CKPT: CompVis's lsun_beds256 model.ckpt with its config.yaml beside it (default models/ldm/lsun_beds256/);
# REAL_IMAGES_NPZ: real LSUN bedroom images, uint8 NHWC 256x256 under arr_0 (default data/lsun_bedroom_real.npz).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_need.sh
check_options "$@"
ckpt=models/ldm/lsun_beds256/model.ckpt; ref=data/lsun_bedroom_real.npz
if [ $# -gt 0 ] && [[ $1 != -* ]]; then ckpt=$1; shift; fi
if [ $# -gt 0 ] && [[ $1 != -* ]]; then ref=$1; shift; fi
need "$ckpt" "the LDM-4 LSUN-Bedroom checkpoint" "download CompVis latent-diffusion's lsun_beds256 (model.ckpt + config.yaml) there, or pass its path first"
need "$(dirname "$ckpt")/config.yaml" "its config.yaml" "CompVis ships it beside model.ckpt (or copy configs/latent-diffusion/lsun_bedrooms-ldm-vq-4.yaml there)"
need "$ref" "the real LSUN-Bedroom images for FID" "an .npz of uint8 NHWC images under arr_0, or pass its path second"
bash scripts/setup.sh
exec .venv/bin/python scripts/run_task.py --task configs/tasks/bedroom.yml "$@" -- -r "$ckpt" --ref "$ref"
