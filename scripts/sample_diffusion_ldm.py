"""Sample from a (quantized) latent diffusion model and evaluate it. Flags follow Q-Diffusion's script of this
name (experiments/ldm_task.py).

    python scripts/sample_diffusion_ldm.py --config configs/latent-diffusion/mnist-ldm-kl-4.yaml -l runs/ldm_fp
    python scripts/sample_diffusion_ldm.py -r models/ldm/lsun_beds256/model.ckpt -n 20 --batch_size 10 -c 200 \
        -e 1.0 --seed 41 --ptq --weight_bit 4 -l runs/bedroom_w4 --ref lsun_bedroom_real.npz
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.errors import entry_point  # noqa: E402
from experiments.ldm_task import main  # noqa: E402

if __name__ == "__main__":
    entry_point(main)
