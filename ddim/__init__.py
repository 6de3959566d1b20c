"""Our DDPM/DDIM noise-prediction UNet and noise schedules (no quantization here). Its samplers are the DDIM
repository's (diffusion.samplers.generalized_steps / ddpm_steps), exported here as ddim_sample / ddpm_sample."""
from ddim.config import UNetConfig, DiffusionConfig, load_config
from ddim.model import UNet
from ddim.schedule import make_betas, timestep_sequence
from diffusion.samplers import ddpm_steps as ddpm_sample, generalized_steps as ddim_sample

__all__ = ["UNetConfig", "DiffusionConfig", "load_config", "UNet", "make_betas",
           "timestep_sequence", "ddim_sample", "ddpm_sample"]
