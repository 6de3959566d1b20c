"""Quantize and sample a local diffusers pipeline folder (experiments/diffusers_task.py).

    python scripts/quantize_diffusers.py --model_dir path/to/sd-pipeline --prompt "a photo of a cat" --steps 20 \
        --ptq --quant_mode dilatequant --weight_bit 4 --quant_act --act_bit 4 --split --cali_n 64 --outdir runs/sd_dq
    python scripts/quantize_diffusers.py --model_dir path/to/dit-pipeline --class_label 207 --class_label 360 \
        --steps 20 --ptq --quant_mode dilatequant --weight_bit 4 --quant_act --act_bit 8 --cali_n 32 --outdir runs/dit
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.errors import entry_point  # noqa: E402
from experiments.diffusers_task import main  # noqa: E402

if __name__ == "__main__":
    entry_point(main)
