"""Latent Diffusion / Stable Diffusion v1 for inference and quantization (no quantization here).

Module paths, class names, constructor arguments and state_dict keys follow the public CompVis code, so the
published YAML configs (`target: ldm.models.diffusion.ddpm.LatentDiffusion`, ...) build through
`ldm.util.instantiate_from_config` and the published checkpoints load strictly (`ldm.checkpoint`).
Samplers (`diffusion.samplers`) are plain functions of an eps callable.
"""
