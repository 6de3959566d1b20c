"""Text-to-image with a (quantized) Stable Diffusion model. Flags follow CompVis's and Q-Diffusion's script of this
name (experiments/txt2img_task.py).

    python scripts/txt2img.py --prompt "a puppet wearing a hat" --plms --cond --ptq --weight_bit 4 \
        --quant_mode qdiff --no_grad_ckpt --split --n_samples 5 --outdir runs/sd_w4 \
        --ckpt models/ldm/stable-diffusion-v1/model.ckpt
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.errors import entry_point  # noqa: E402
from experiments.txt2img_task import main  # noqa: E402

if __name__ == "__main__":
    entry_point(main)
