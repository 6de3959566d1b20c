"""Our DDPM/DDIM noise-prediction UNet, noise schedules and samplers (no quantization here)."""
from ddim.config import UNetConfig, DiffusionConfig, load_config
from ddim.model import UNet
from ddim.schedule import make_betas, timestep_sequence
from ddim.samplers import ddim_sample, ddpm_sample

__all__ = ["UNetConfig", "DiffusionConfig", "load_config", "UNet", "make_betas",
           "timestep_sequence", "ddim_sample", "ddpm_sample"]
