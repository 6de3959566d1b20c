"""Sample from a (quantized) DDIM model and evaluate it. Flags follow Q-Diffusion's script of this name.

    python scripts/sample_diffusion_ddim.py --config configs/mnist.yml --timesteps 100 --eta 0 \
        --skip_type quad --max_images 1000 -l runs/fp_mnist
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.errors import entry_point  # noqa: E402
from experiments.ddim_task import main  # noqa: E402

if __name__ == "__main__":
    entry_point(main)
