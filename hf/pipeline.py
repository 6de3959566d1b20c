"""A diffusers pipeline's UNet quantized in a few lines, calibrated on the pipeline's own sampling:

    from hf.pipeline import quantize_unet
    pipe.unet = quantize_unet(pipe, QuantConfig(weight_bit=4, act_bit=4, split=True), DilateQuantConfig(),
                              prompts=["a photo of a cat", ...], steps=20, guidance=7.5, run_dir="runs/sd_w4a4")
    image = pipe("a photo of a dog", num_inference_steps=20).images[0]

Calibration trajectories run the pipeline's scheduler with classifier-free guidance from the pipeline's own prompt
encoding (`pipe.encode_prompt`); every UNet input of every step is kept, both guidance halves, with its
`encoder_hidden_states`, and the scheduler's integer timesteps are the TPQ slots. A scheduler that calls the UNet
at non-integer timesteps is refused in one line naming it (TPQ keeps one step size per integer timestep). The
returned `PipelineUNet` is called as the pipeline calls its UNet and carries its `config`; sampling with other
steps than it was calibrated for is an error naming the timestep (quant.slots).
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from common.errors import UsageError
from hf.unet import DiffusersUNet
from quant.calib_data import CalibSet
from quant.methods import MethodContext, quantize
from quant.model import QuantModel, frozen
from quant.settings import QuantConfig


def scheduler_timesteps(scheduler) -> list[int]:
    """The integer timesteps the scheduler (after set_timesteps) calls the UNet at, increasing."""
    ts = torch.as_tensor(scheduler.timesteps).double()
    if not bool((ts == ts.round()).all()):
        raise UsageError(f"{type(scheduler).__name__} calls the UNet at non-integer timesteps "
                         f"({[round(float(t), 3) for t in ts[:3]]} ...): TPQ keeps one step size per integer timestep",
                         "use a scheduler on the integer grid (DDIM, DDPM, PNDM, DPMSolverMultistep, ...)")
    return sorted({int(t) for t in ts})


@torch.no_grad()
def guided_calibration(net: nn.Module, scheduler, latents: torch.Tensor, cond: torch.Tensor,
                       uncond: torch.Tensor | None, guidance: float) -> CalibSet:
    """Every UNet input of the scheduler's guided loop from `latents` [N, C, h, w] (net: a DiffusersUNet, FP):
    x, t and encoder_hidden_states of both halves (uncond first), every step."""
    xs, ts, ctx = [], [], []
    guided = uncond is not None and guidance != 1.0
    context = torch.cat([uncond, cond]) if guided else cond
    z = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([z, z]) if guided else z, t)
        tt = torch.full((len(x),), int(t), dtype=torch.long, device=x.device)
        xs.append(x.cpu()), ts.append(tt.cpu()), ctx.append(context.cpu())
        eps = net(x, tt, encoder_hidden_states=context)
        if guided:
            e_u, e_c = eps.chunk(2)
            eps = e_u + guidance * (e_c - e_u)
        z = scheduler.step(eps, t, z).prev_sample
    return CalibSet(torch.cat(xs), torch.cat(ts), {"encoder_hidden_states": torch.cat(ctx)})


class PipelineUNet(nn.Module):
    """A quantized UNet in a diffusers pipeline's place: called as the pipeline calls `pipe.unet`
    (sample, timestep, encoder_hidden_states=..., return_dict=...), with the FP UNet's `config`.

    Its weights are quantized once (quant.model.frozen) and reused by every call of every sampling run, until the
    parameters change: moved (`pipe.to(...)`), replaced or edited in place, they are quantized again on the next
    call."""

    def __init__(self, qmodel: QuantModel, fp_unet: nn.Module):
        super().__init__()
        self.qmodel = qmodel
        self.config = fp_unet.config
        self._frozen: contextlib.ExitStack | None = None
        self._frozen_for: tuple = ()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.qmodel.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.qmodel.parameters()).device

    def _weights(self) -> tuple:
        """What the frozen weights depend on: each parameter's identity, device and in-place version."""
        return tuple((id(p), p.device, p._version) for p in self.qmodel.parameters())

    def _freeze(self) -> None:
        weights = self._weights()
        if self._frozen is not None and weights == self._frozen_for:
            return
        self.release()
        stack = contextlib.ExitStack()
        stack.enter_context(frozen(self.qmodel))
        self._frozen, self._frozen_for = stack, weights

    def release(self) -> None:
        """Drop the frozen weights (the next call quantizes them again)."""
        if self._frozen is not None:
            self._frozen.close()
        self._frozen, self._frozen_for = None, ()

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor | None = None,
                return_dict: bool = True, **kwargs):
        unused = [k for k, v in kwargs.items() if v is not None]
        if unused:
            raise UsageError(f"the quantized UNet takes no {', '.join(unused)}", "sample without those arguments")
        cond = {} if encoder_hidden_states is None else {"encoder_hidden_states": encoder_hidden_states}
        self._freeze()
        out = self.qmodel(sample, timestep, **cond)
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
            return UNet2DConditionOutput(sample=out)
        return (out,)


def quantize_unet(pipe, quant: QuantConfig, method, prompts: Sequence[str], steps: int = 50, guidance: float = 7.5,
                  run_dir: str | Path = "runs/diffusers", negative_prompt: str = "", seed: int = 0,
                  batch_size: int = 8) -> PipelineUNet:
    """Quantize `pipe.unet` with `method` (a quant.methods config), calibrated on len(prompts) guided trajectories
    of `steps` steps of the pipeline's scheduler (seeded), then -> the module to put in `pipe.unet`."""
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    timesteps = scheduler_timesteps(scheduler)
    unet = pipe.unet
    device = unet.device
    cond, uncond = pipe.encode_prompt(list(prompts), device, 1, guidance > 1.0,
                                      negative_prompt=[negative_prompt] * len(prompts))
    c = unet.config
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(len(prompts), c.in_channels, c.sample_size, c.sample_size, generator=gen).to(device)
    fp = DiffusersUNet(copy.deepcopy(unet)).eval()
    calib = guided_calibration(fp, scheduler, latents, cond, uncond if guidance > 1.0 else None, guidance)
    qmodel = quantize(fp, quant, method, MethodContext(timesteps, calib, Path(run_dir), batch_size, seed))
    qmodel.check_timesteps(timesteps)
    return PipelineUNet(qmodel.eval(), unet)
