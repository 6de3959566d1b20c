"""Hugging Face diffusers networks as a model family: `hf.unet.DiffusersUNet` wraps a diffusers UNet so that the
quantization core sees a network called as `net(x, t, **cond)` that returns a tensor, with its attention products
exposed as modules (through diffusers' own `set_attn_processor`; the diffusers network is not edited). diffusers
is imported only by the code that builds or loads such a model."""
