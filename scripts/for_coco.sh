#!/usr/bin/env bash
# MS-COCO 512, Stable Diffusion v1.4, the paper's settings (configs/tasks/coco.yml).
#   bash scripts/for_coco.sh [CKPT] [CAPTIONS_TXT] [REAL_IMAGES_NPZ] [run_task args]
# CKPT: sd-v1-4.ckpt (default models/ldm/stable-diffusion-v1/model.ckpt); the CLIP tokenizer files (vocab.json,
# merges.txt) must be in the local Hugging Face cache of openai/clip-vit-large-patch14;
# CAPTIONS_TXT: one COCO caption per line, e.g. 10,000 val2014 captions (default data/coco/captions.txt);
# REAL_IMAGES_NPZ: the matching real COCO images resized and centre-cropped to 512, uint8 NHWC under arr_0
# (default data/coco/val2014_512.npz).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_need.sh
check_options "$@"
ckpt=models/ldm/stable-diffusion-v1/model.ckpt; captions=data/coco/captions.txt; ref=data/coco/val2014_512.npz
if [ $# -gt 0 ] && [[ $1 != -* ]]; then ckpt=$1; shift; fi
if [ $# -gt 0 ] && [[ $1 != -* ]]; then captions=$1; shift; fi
if [ $# -gt 0 ] && [[ $1 != -* ]]; then ref=$1; shift; fi
need "$ckpt" "the Stable Diffusion v1.4 checkpoint" "put sd-v1-4.ckpt there, or pass its path first"
need "$captions" "the COCO captions" "a text file with one caption per line, or pass its path second"
need "$ref" "the real COCO images for FID" "an .npz of uint8 NHWC 512x512 images under arr_0, or pass its path third"
bash scripts/setup.sh
exec .venv/bin/python scripts/run_task.py --task configs/tasks/coco.yml "$@" -- --ckpt "$ckpt" --from-file "$captions" --ref "$ref"
