"""A diffusers pipeline's denoiser quantized in a few lines, calibrated on the pipeline's own sampling: the UNet of
a UNet pipeline (Stable Diffusion, DDPM), the transformer of a DiT or PixArt pipeline.

    from hf.pipeline import quantize_pipeline
    pipe.unet = quantize_pipeline(pipe, QuantConfig(weight_bit=4, act_bit=4, split=True), DilateQuantConfig(),
                                  prompts=["a photo of a cat", ...], steps=20, run_dir="runs/sd_w4a4")
    image = pipe("a photo of a dog", num_inference_steps=20).images[0]
    # DiT: pipe.transformer = quantize_pipeline(pipe, ..., class_labels=[207, 360, ...], steps=20)

Calibration trajectories run the pipeline's scheduler with classifier-free guidance, conditioned as the pipeline
conditions its denoiser: `pipe.encode_prompt` for text (with PixArt's caption mask and, at 1024 px, its resolution
and aspect-ratio micro-conditions), the class labels against the null class for DiT, nothing for an unconditional
UNet. Every denoiser input of every step is kept, both guidance halves, and the scheduler's integer timesteps are
the TPQ slots. A scheduler that calls the model at non-integer timesteps is refused in one line naming it (TPQ
keeps one step size per integer timestep). The returned `PipelineDenoiser` is called as the pipeline calls its
denoiser and carries its `config`; sampling with other steps than it was calibrated for is an error naming the
timestep (quant.slots).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from common.errors import UsageError
from hf.unet import wrap_diffusers
from quant.calib_data import CalibSet
from quant.methods import MethodContext, quantize
from quant.model import QuantModel, frozen
from quant.settings import QuantConfig

TEXT = ("UNet2DConditionModel", "PixArtTransformer2DModel")
# the pipelines' own default guidance scales (StableDiffusionPipeline, DiTPipeline, PixArtAlphaPipeline)
DEFAULT_GUIDANCE = {"UNet2DConditionModel": 7.5, "DiTTransformer2DModel": 4.0, "PixArtTransformer2DModel": 4.5,
                    "UNet2DModel": 1.0}


def denoiser_attr(pipe) -> str:
    """The pipeline attribute that holds its denoiser: "unet" or "transformer"."""
    for name in ("unet", "transformer"):
        if isinstance(getattr(pipe, name, None), nn.Module):
            return name
    raise UsageError(f"{type(pipe).__name__} has neither a `unet` nor a `transformer` to quantize",
                     "pass a UNet, DiT or PixArt pipeline")


def denoiser_kind(pipe) -> str:
    """The class of the pipeline's denoiser, one this module quantizes (else one line naming them)."""
    kind = type(getattr(pipe, denoiser_attr(pipe))).__name__
    if kind not in DEFAULT_GUIDANCE:
        raise UsageError(f"{type(pipe).__name__}'s denoiser is a {kind}",
                         f"use a pipeline of {', '.join(DEFAULT_GUIDANCE)}")
    return kind


def scheduler_timesteps(scheduler) -> list[int]:
    """The integer timesteps the scheduler (after set_timesteps) calls the model at, increasing."""
    ts = torch.as_tensor(scheduler.timesteps).double()
    if not bool((ts == ts.round()).all()):
        raise UsageError(f"{type(scheduler).__name__} calls the UNet at non-integer timesteps "
                         f"({[round(float(t), 3) for t in ts[:3]]} ...): TPQ keeps one step size per integer timestep",
                         "use a scheduler on the integer grid (DDIM, DDPM, PNDM, DPMSolverMultistep, ...)")
    return sorted({int(t) for t in ts})


@dataclass
class Conditions:
    """The denoiser's conditioning keyword tensors for n images (one row each): conditional, and unconditional
    (None without guidance)."""
    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor] | None

    def rows(self, idx: slice) -> "Conditions":
        return Conditions({k: v[idx] for k, v in self.cond.items()},
                          None if self.uncond is None else {k: v[idx] for k, v in self.uncond.items()})


def pipeline_conditions(pipe, kind: str, prompts: Sequence[str] | None, class_labels: Sequence[int] | None,
                        guided: bool, negative_prompt: str, device: torch.device) -> Conditions:
    """How the pipeline conditions its `kind` of denoiser, for each prompt or class label."""
    if kind in TEXT:
        if not prompts or class_labels:
            raise UsageError(f"a {kind} pipeline is conditioned on text", "pass prompts=[...] (and no class_labels)")
        n = len(prompts)
        if kind == "UNet2DConditionModel":
            c, u = pipe.encode_prompt(list(prompts), device, 1, guided, negative_prompt=[negative_prompt] * n)
            return Conditions({"encoder_hidden_states": c}, {"encoder_hidden_states": u} if guided else None)
        c, cm, u, um = pipe.encode_prompt(list(prompts), guided, negative_prompt=negative_prompt, device=device,
                                          clean_caption=False)
        cond = {"encoder_hidden_states": c, "encoder_attention_mask": cm}
        uncond = {"encoder_hidden_states": u, "encoder_attention_mask": um} if guided else None
        config = getattr(pipe, denoiser_attr(pipe)).config
        if config.sample_size == 128:                # PixArt at 1024 px: the pipeline's micro-conditions
            side = config.sample_size * pipe.vae_scale_factor
            micro = {"resolution": torch.tensor([[side, side]] * n, dtype=c.dtype, device=device),
                     "aspect_ratio": torch.ones(n, 1, dtype=c.dtype, device=device)}
            cond |= micro
            uncond = None if uncond is None else uncond | micro
        return Conditions(cond, uncond)
    if kind == "DiTTransformer2DModel":
        if not class_labels or prompts:
            raise UsageError("a DiT pipeline is conditioned on class labels",
                             "pass class_labels=[...] (and no prompts)")
        labels = torch.as_tensor(list(class_labels), dtype=torch.long, device=device)
        null = getattr(pipe, denoiser_attr(pipe)).config.num_embeds_ada_norm          # the null class's row
        return Conditions({"class_labels": labels}, {"class_labels": torch.full_like(labels, null)} if guided else None)
    if prompts or class_labels:
        raise UsageError(f"a {kind} pipeline is unconditional", "pass no prompts or class_labels")
    if guided:
        raise UsageError(f"a {kind} pipeline is unconditional: it has no guidance", "pass guidance=1.0")
    return Conditions({}, None)


@torch.no_grad()
def guided_calibration(net: nn.Module, scheduler, latents: torch.Tensor, conditions: Conditions, guidance: float,
                       batch_size: int) -> CalibSet:
    """Every input of the scheduler's guided loop from `latents` [N, C, h, w] (net: an FP wrap_diffusers model;
    `scheduler` after set_timesteps): x, t and the conditioning of both halves (uncond first), every step, for
    batch_size trajectories at a time (each batch on its own copy of the scheduler, whose multistep state is
    per trajectory)."""
    xs, ts, ctx = [], [], []
    for i in range(0, len(latents), batch_size):
        rows = slice(i, i + batch_size)
        part = _trajectories(net, copy.deepcopy(scheduler), latents[rows], conditions.rows(rows), guidance)
        for store, got in zip((xs, ts, ctx), part):
            store.extend(got)
    return CalibSet(torch.cat(xs), torch.cat(ts), {k: torch.cat([c[k] for c in ctx]) for k in ctx[0]})


def _trajectories(net, scheduler, latents, conditions: Conditions, guidance: float):
    guided = conditions.uncond is not None
    context = ({k: torch.cat([conditions.uncond[k], v]) for k, v in conditions.cond.items()} if guided
               else conditions.cond)
    channels = latents.shape[1]
    z = latents * scheduler.init_noise_sigma
    xs, ts, ctx = [], [], []
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([z, z]) if guided else z, t)
        tt = torch.full((len(x),), int(t), dtype=torch.long, device=x.device)
        xs.append(x.cpu()), ts.append(tt.cpu()), ctx.append({k: v.cpu() for k, v in context.items()})
        eps = net(x, tt, **context)[:, :channels]                   # DiT/PixArt also predict the variance
        if guided:
            e_u, e_c = eps.chunk(2)
            eps = e_u + guidance * (e_c - e_u)
        z = scheduler.step(eps, t, z).prev_sample
    return xs, ts, ctx


class PipelineDenoiser(nn.Module):
    """A quantized denoiser in a diffusers pipeline's place: called as the pipeline calls `pipe.unet` or
    `pipe.transformer` (sample, timestep, encoder_hidden_states / class_labels / encoder_attention_mask /
    added_cond_kwargs=..., return_dict=...), with the FP model's `config`.

    Its weights are quantized once (quant.model.frozen) and reused by every call of every sampling run, until the
    parameters change: moved (`pipe.to(...)`), replaced or edited in place, they are quantized again on the next
    call."""

    def __init__(self, qmodel: QuantModel, fp_model: nn.Module):
        super().__init__()
        self.qmodel = qmodel
        self.config = fp_model.config
        self.kind = type(fp_model).__name__
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
                return_dict: bool = True, added_cond_kwargs: dict | None = None, **kwargs):
        cond = {k: v for k, v in {"encoder_hidden_states": encoder_hidden_states,
                                  "class_labels": kwargs.pop("class_labels", None),
                                  "encoder_attention_mask": kwargs.pop("encoder_attention_mask", None)}.items()
                if v is not None}
        if self.kind == "PixArtTransformer2DModel":
            cond |= {k: v for k, v in (added_cond_kwargs or {}).items() if v is not None}
        elif added_cond_kwargs:
            kwargs["added_cond_kwargs"] = added_cond_kwargs
        unused = [k for k, v in kwargs.items() if v is not None]
        if unused:
            raise UsageError(f"the quantized {self.kind} takes no {', '.join(unused)}",
                             "sample without those arguments")
        self._freeze()
        out = self.qmodel(sample, timestep, **cond)
        if not return_dict:
            return (out,)
        if self.kind.startswith("UNet"):
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
            return UNet2DConditionOutput(sample=out)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput
        return Transformer2DModelOutput(sample=out)


def quantize_pipeline(pipe, quant: QuantConfig, method, prompts: Sequence[str] | None = None,
                      class_labels: Sequence[int] | None = None, steps: int = 50, guidance: float | None = None,
                      run_dir: str | Path = "runs/diffusers", negative_prompt: str = "", seed: int = 0,
                      batch_size: int = 8) -> PipelineDenoiser:
    """Quantize the pipeline's denoiser with `method` (a quant.methods config), calibrated on one guided trajectory
    of `steps` steps of the pipeline's scheduler per prompt (text pipelines) or class label (DiT), or on
    `batch_size` unconditional ones (UNet2DModel), seeded, `batch_size` trajectories at a time; guidance: the
    pipeline's default when None. -> the module to put in `pipe.unet` or `pipe.transformer`
    (`denoiser_attr(pipe)`)."""
    kind = denoiser_kind(pipe)
    model = getattr(pipe, denoiser_attr(pipe))
    guidance = DEFAULT_GUIDANCE[kind] if guidance is None else guidance
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    timesteps = scheduler_timesteps(scheduler)
    device = model.device
    conditions = pipeline_conditions(pipe, kind, prompts, class_labels, guidance > 1.0, negative_prompt, device)
    n = len(prompts or class_labels or range(batch_size))
    c = model.config
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, c.in_channels, c.sample_size, c.sample_size, generator=gen).to(device)
    fp = wrap_diffusers(copy.deepcopy(model)).eval()
    calib = guided_calibration(fp, scheduler, latents, conditions, guidance, batch_size)
    qmodel = quantize(fp, quant, method, MethodContext(timesteps, calib, Path(run_dir), batch_size, seed))
    qmodel.check_timesteps(timesteps)
    return PipelineDenoiser(qmodel.eval(), model)
