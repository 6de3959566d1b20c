"""The LDM/SD UNet quantized through the core (quant/adapters/ldm_unet.py), on tiny random-weight versions of
every public config: each method calibrates on guided FP trajectories, distills and samples with guidance;
Weight Dilation keeps FP outputs (cross-attention k/v on the context, AttentionBlock's Conv1d qkv); TPQ looks
slots up per sample inside a guided batch; an interrupted distillation resumes to the same state; the adapter's
units, split layers, attention matmuls and edge layers."""
import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from conftest import ROOT
from diffusion.samplers import make_sampler
from tools.tiny_ldm import random_weights, tiny_config
from ldm.util import instantiate_from_config, load_config
from quant import distill as distill_mod
from quant.calib_data import draw_over_steps, trajectories_for
from quant.calibrate import calibrate
from quant.dilation import dilate
from quant.distill import DistillConfig, distill
from quant.layers import QuantLayer, QuantMatMul
from quant.methods import MethodContext, quantize as quantize_with
from quant.methods.baseline import BaselineConfig
from quant.methods.dilatequant import DilateQuantConfig
from quant.methods.qdiff import QDiffConfig
from quant.model import QuantModel, frozen, quant_enabled
from quant.settings import QuantConfig, RangeInit, Signedness
from test_ldm_encoders import write_tiny_tokenizer

CONFIGS = {"bedroom": "latent-diffusion/lsun_bedrooms-ldm-vq-4", "church": "latent-diffusion/lsun_churches-ldm-kl-8",
           "cin256": "latent-diffusion/cin256-v2", "sd_v1": "stable-diffusion/v1-inference"}
W4A4 = QuantConfig(weight_bit=4, act_bit=4, split=True)
TPQ_MINMAX = replace(W4A4, temporal=True, act_init=RangeInit.MINMAX)      # min-max ranges: calibrates quickly
STEPS, SCALE, CALIB_N = 4, 3.0, 4
PROMPTS = ["a horse", "a red house", "zebra", "ship"]


class Tiny:
    """A tiny LatentDiffusion of a public config with its guided DDIM sampler (4 steps, scale 3): class labels
    (cin256, null class 1000) or prompts (SD) per trajectory, nothing for the unconditional LSUN models."""

    def __init__(self, name: str, ldm: nn.Module):
        self.name, self.ldm = name, ldm
        self.unet = ldm.model.diffusion_model
        self.sampler = make_sampler("ddim", STEPS, ldm.alphas_cumprod)
        self.kind = None if ldm.cond_stage_model is None else type(ldm.cond_stage_model).__name__
        self.halves = 1 if self.kind is None else 2

    @torch.no_grad()
    def pair(self, rows: torch.Tensor):
        """(cond, uncond) [B, L, D] of trajectories `rows`; (None, None) for an unconditional model."""
        if self.kind == "ClassEmbedder":
            labels = rows % 1000
            return (self.ldm.get_learned_conditioning({"class_label": labels}),
                    self.ldm.get_learned_conditioning({"class_label": torch.full_like(labels, 1000)}))
        if self.kind == "FrozenCLIPEmbedder":
            return (self.ldm.get_learned_conditioning([PROMPTS[int(r) % len(PROMPTS)] for r in rows]),
                    self.ldm.get_learned_conditioning([""] * len(rows)))
        return None, None

    def guided_inputs(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The network call of a guided sampler step: cat([x, x]), cat([t, t]), context cat([uncond, cond])."""
        c, u = self.pair(torch.arange(len(x)))
        if c is None:
            return x, t, {}
        return torch.cat([x, x]), torch.cat([t, t]), {"context": torch.cat([u, c])}

    def sample(self, x_T: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Guided DDIM with whatever network sits in ldm.model.diffusion_model, decoded by the FP first stage."""
        c, u = self.pair(torch.arange(len(x_T)))
        z = self.sampler.sample(self.ldm.apply_model, x_T, c, u, SCALE, generator=torch.Generator().manual_seed(seed))
        return self.ldm.decode_first_stage(z)

    def x_T(self, n: int, seed: int = 0) -> torch.Tensor:
        return torch.randn(n, self.ldm.channels, self.ldm.image_size, self.ldm.image_size,
                           generator=torch.Generator().manual_seed(seed))

    def calibration_set(self, per_traj: int = STEPS, seed: int = 0):
        """As experiments/ldm_task.py:calibration_set: random steps of guided FP trajectories, every network
        input of a chosen call (both halves under guidance) with its keyword arguments (the context), recorded
        by a forward pre-hook on the UNet. STEPS samples per half, all the steps of one trajectory by default:
        every TPQ slot gets calibration samples."""
        n = STEPS * self.halves
        x_T = self.x_T(trajectories_for(math.ceil(n / self.halves), per_traj), seed + 7)

        def fp_sample(x, on_step, rows=None):
            rows = torch.arange(len(x)) if rows is None else torch.as_tensor(rows)
            c, u = self.pair(rows)
            hook = self.unet.register_forward_pre_hook(lambda m, a, kw: on_step(a[0], a[1], kw), with_kwargs=True)
            try:
                self.sampler.sample(self.ldm.apply_model, x, c, u, SCALE)
            finally:
                hook.remove()

        return draw_over_steps(fp_sample, x_T, n, self.sampler.calls, per_traj, torch.Generator().manual_seed(seed),
                               halves=self.halves)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (the tiny LatentDiffusion, its calibration set), built once; tests take deep copies."""
    clip = tmp_path_factory.mktemp("clip") / "clip"
    write_tiny_tokenizer(clip / "tokenizer")
    out = {}
    for name, path in CONFIGS.items():
        cfg = tiny_config(load_config(ROOT / "configs" / f"{path}.yaml"))
        cond = cfg["model"]["params"]["cond_stage_config"]
        if isinstance(cond, dict) and cond["target"].endswith("FrozenCLIPEmbedder"):
            cond["params"]["version"] = str(clip)
        torch.manual_seed(0)
        ldm = random_weights(instantiate_from_config(cfg["model"])).eval()
        out[name] = (ldm, Tiny(name, ldm).calibration_set())
    return out


def tiny(built, name: str) -> tuple[Tiny, object]:
    ldm, calib = built[name]
    return Tiny(name, copy.deepcopy(ldm)), calib


METHODS = {"baseline": BaselineConfig(), "qdiff": QDiffConfig(weight_iters=2, act_iters=2, batch_size=2),
           "dilatequant": DilateQuantConfig(distill=DistillConfig(iters=2, batch_size=2, cache_batch_size=CALIB_N))}


def quantize(mode: str, m: Tiny, calib, run_dir) -> QuantModel:
    """Through the method registry: the config's type picks the handler."""
    context = MethodContext(m.sampler.timesteps, calib, run_dir, batch_size=CALIB_N)
    return quantize_with(m.unet, W4A4, METHODS[mode], context)


# Every method on every config; the default run keeps one method per config (each method and each config once,
# distillation on a cross-attention and an AttentionBlock model), the rest run with `-m slow` (~40 s more).
FAST = {("sd_v1", "dilatequant"), ("bedroom", "qdiff"), ("cin256", "baseline"), ("church", "baseline")}
MATRIX = [pytest.param(name, mode, marks=() if (name, mode) in FAST else pytest.mark.slow, id=f"{name}-{mode}")
          for name in CONFIGS for mode in METHODS]


@pytest.mark.parametrize("name, mode", MATRIX)
def test_each_method_calibrates_distills_and_samples_with_guidance(built, name, mode, tmp_path):
    m, calib = tiny(built, name)
    assert calib.x.shape == (STEPS * m.halves, m.ldm.channels, m.ldm.image_size, m.ldm.image_size)
    if m.kind is None:
        assert calib.cond == {}
    else:                                               # each sample's context: both halves of guided calls
        tokens = 77 if m.kind == "FrozenCLIPEmbedder" else 1
        context, uncond = calib.cond.get("context"), m.pair(torch.arange(1))[1][0]
        assert set(calib.cond) == {"context"} and context.shape[:2] == (len(calib.t), tokens)
        assert 0 < sum(torch.equal(row, uncond) for row in context) < len(calib.t)
    q = quantize(mode, m, calib, tmp_path)
    assert q.config.split and q.config.temporal == (mode == "dilatequant") and q.unquantized == []
    units = q.adapter.units(q.model)
    finished = {"dilatequant": ["distill"], "qdiff": ["recon_w", "recon_a"]}.get(mode, [])
    for stage in finished:
        assert len(list((tmp_path / stage).glob("unit_*.pt"))) == len(units)
    q.check_timesteps(m.sampler.timesteps)
    m.ldm.model.diffusion_model = q                     # only the UNet is quantized
    with frozen(q):
        images = m.sample(m.x_T(2, seed=1))
    size = m.ldm.first_stage_model.decoder.resolution   # latent size x the first stage's factor (4 or 8)
    assert images.shape == (2, 3, size, size) and size > m.ldm.image_size
    assert torch.isfinite(images).all()


def _named(model: nn.Module, *class_names: str) -> list[str]:
    return [n for n, mod in model.named_modules() if type(mod).__name__ in class_names]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_weight_dilation_keeps_fp_outputs(built, name):
    """Y = (X/s)(s·W) everywhere: with quantization off the dilated model equals the FP UNet on guided calls.
    X/s folds into the norm a layer group reads (attn1 q/k/v <- norm1, AttentionBlock's Conv1d qkv <- its
    GroupNorm); attn2's k/v read the FP context, share one s and keep X/s in their quantizer."""
    m, calib = tiny(built, name)
    # Groups with 2-3x more out- than in-channels (q/k/v) have nearly every in-channel holding some out-channel's
    # max or min in random weights (s = 1); in-channels 0-3 made small are dilated
    groups = [(f"{b}.qkv",) for b in _named(m.unet, "AttentionBlock")]
    for b in _named(m.unet, "BasicTransformerBlock"):
        groups += [tuple(f"{b}.attn1.to_{p}" for p in "qkv"), (f"{b}.attn2.to_k", f"{b}.attn2.to_v")]
    with torch.no_grad():
        for group in groups:
            for n in group:
                m.unet.get_submodule(n).weight[:, :4] *= 0.1
    q = QuantModel(m.unet, W4A4)
    x, t, cond = calib.x, calib.t, calib.cond
    with torch.no_grad():
        ref = m.unet(x, t, **cond)
    scales = dilate(q)
    with torch.no_grad(), quant_enabled(q, weight=False, act=False):
        out = q(x, t, **cond)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert sum(bool((s > 1).any()) for s in scales.values()) > len(scales) // 2
    layer = q.model.get_submodule
    assert groups
    for group in groups:                               # one s per group, in-channels 0-3 dilated
        s = scales[group[0]]
        assert all(scales[n] is s for n in group) and bool((s[:4] > 1).all())
    for b in _named(m.unet, "BasicTransformerBlock"):                  # cin256, SD
        for p in "qkv":                                                # attn1: 1/s folded into norm1
            assert torch.equal(layer(f"{b}.attn1.to_{p}").in_scale, torch.ones_like(scales[f"{b}.attn1.to_q"]))
        torch.testing.assert_close(layer(f"{b}.norm1").weight * scales[f"{b}.attn1.to_q"],
                                   m.unet.get_submodule(f"{b}.norm1").weight)
        for p in "kv":                                                 # attn2 k/v: X/s kept in the quantizer
            assert torch.equal(layer(f"{b}.attn2.to_{p}").in_scale, scales[f"{b}.attn2.to_k"])
    for b in _named(m.unet, "AttentionBlock"):                         # bedroom, church: Conv1d qkv <- GroupNorm
        qkv = layer(f"{b}.qkv")
        assert isinstance(qkv, QuantLayer) and qkv.conv_op is torch.nn.functional.conv1d
        assert torch.equal(qkv.in_scale, torch.ones_like(qkv.in_scale))
        torch.testing.assert_close(layer(f"{b}.norm").weight * scales[f"{b}.qkv"],
                                   m.unet.get_submodule(f"{b}.norm").weight)


@pytest.mark.parametrize("name", ["sd_v1", "bedroom"])
def test_tpq_slots_follow_each_samples_t_inside_a_guided_batch(built, name):
    """A guided call cat([uncond, cond]) with a different t per sample (SD) equals per-sample runs: each sample
    (and each of its heads, rows laid out (b h)) gathers the TPQ slot of its own t. The same for a mixed batch
    through bedroom's AttentionBlocks (unconditional: no guidance)."""
    m, calib = tiny(built, name)
    sched = m.sampler.timesteps
    q = calibrate(QuantModel(m.unet, TPQ_MINMAX, sched), calib, batch_size=CALIB_N)
    with torch.no_grad():                              # make the slots differ, so a wrong lookup shows
        for _, module in q.act_quant_modules():
            for quantizer in module.a_quant:
                quantizer.delta.mul_(torch.linspace(1.0, 2.0, len(quantizer.delta)))
    x, t = m.x_T(2, seed=3), torch.tensor([sched[0], sched[2]])
    xg, tg, cond = m.guided_inputs(x, t)               # SD: 4 rows (u0, u1, c0, c1), t (t0, t1, t0, t1)
    core = _named(m.unet, "CrossAttention", "QKVAttentionLegacy")[0]
    rows = []
    hook = q.model.get_submodule(f"{core}.av").register_forward_pre_hook(lambda mod, a: rows.append(len(a[0])))
    with torch.no_grad():
        mixed = q(xg, tg, **cond)
        hook.remove()
        alone = torch.cat([q(xg[i:i + 1], tg[i:i + 1], **{k: v[i:i + 1] for k, v in cond.items()})
                           for i in range(len(xg))])
        swapped = q(xg, tg.flip(0), **cond)
    heads = getattr(m.unet.get_submodule(core), "heads", None) or m.unet.get_submodule(core).n_heads
    assert heads > 1 and rows[0] == len(xg) * heads
    assert len(xg) == (4 if name == "sd_v1" else 2)
    torch.testing.assert_close(mixed, alone, rtol=0, atol=1e-6)
    assert not torch.allclose(mixed, swapped)


def test_killed_distillation_resumes_to_the_same_state(built, tmp_path, monkeypatch):
    """Kill after 5 of 27 units, lose the last finished unit's file too: the rerun reloads units 0-3, retrains
    the rest and ends bit for bit where an uninterrupted run does."""
    m, calib = tiny(built, "bedroom")
    cfg = DistillConfig(iters=2, batch_size=2, cache_batch_size=CALIB_N)
    start = calibrate(QuantModel(m.unet, TPQ_MINMAX, m.sampler.timesteps), calib,
                      batch_size=CALIB_N)
    full = copy.deepcopy(start)
    distill(full, m.unet, calib, cfg, tmp_path / "a")

    real_train, calls = distill_mod.train_unit, []

    def killed_at_sixth(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(distill_mod, "train_unit", killed_at_sixth)
    with pytest.raises(KeyboardInterrupt):
        distill(copy.deepcopy(start), m.unet, calib, cfg, tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").glob("unit_*.pt")) == [f"unit_{k:02d}.pt" for k in range(5)]
    (tmp_path / "b" / "unit_04.pt").unlink()
    monkeypatch.setattr(distill_mod, "train_unit", real_train)
    resumed = copy.deepcopy(start)
    distill(resumed, m.unet, calib, cfg, tmp_path / "b")
    a, b = full.state_dict(), resumed.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], v) for k, v in start.state_dict().items())    # distillation changed it


@pytest.mark.parametrize("name", list(CONFIGS))
def test_adapter_units_splits_matmuls_and_edge_layers(built, name):
    m, calib = tiny(built, name)
    unet = m.unet
    q = QuantModel(unet, W4A4)
    units = q.adapter.units(q.model)
    assert units == (["time_embed"] + [f"input_blocks.{i}" for i in range(len(unet.input_blocks))] + ["middle_block"]
                     + [f"output_blocks.{i}" for i in range(len(unet.output_blocks))] + ["out"])
    # forward order, and the channels of each output block's cat([h, skip]) measured on the FP forward
    order, skips, cat_in = [], [], []
    hooks = [unet.get_submodule(u).register_forward_pre_hook(lambda mod, a, u=u: order.append(u)) for u in units]
    hooks += [b.register_forward_hook(lambda mod, a, out: skips.append(out.shape[1])) for b in unet.input_blocks]
    hooks += [b.register_forward_pre_hook(lambda mod, a: cat_in.append(a[0].shape[1])) for b in unet.output_blocks]
    with torch.no_grad():
        unet(calib.x[:1], calib.t[:1], **{k: v[:1] for k, v in calib.cond.items()})
    for h in hooks:
        h.remove()
    assert order == units
    layers = dict(q.quant_layers())
    n_weight_layers = sum(isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear)) for mod in unet.modules())
    assert len(layers) == n_weight_layers and q.unquantized == []
    assert all(sum(n.startswith(u + ".") for u in units) == 1 for n in layers)      # each layer in one unit
    split = {n: layer.split for n, layer in layers.items() if layer.split}
    expected = {}
    for i, channels in enumerate(cat_in):
        h = channels - skips[len(skips) - 1 - i]                        # hs.pop(): the last pushed first
        expected[f"output_blocks.{i}.0.in_layers.2"] = expected[f"output_blocks.{i}.0.skip_connection"] = h
    assert split == expected and all(len(layers[n].a_quant) == 2 for n in split)
    for n, layer in layers.items():                                     # first/last at 8 bits, the rest at 4
        bits = 8 if n in ("input_blocks.0.0", "out.2") else 4
        assert layer.w_quant.spec.bits == bits and {a.spec.bits for a in layer.a_quant} == {bits}, n
    cores = _named(unet, "CrossAttention", "QKVAttentionLegacy", "QKVAttention")
    matmuls = {n: mod for n, mod in q.model.named_modules() if isinstance(mod, QuantMatMul)}
    assert cores and set(matmuls) == {f"{c}.{op}" for c in cores for op in ("qk", "av")}
    for c in cores:
        signs = {op: [a.spec.signedness for a in matmuls[f"{c}.{op}"].a_quant] for op in ("qk", "av")}
        assert signs == {"qk": [Signedness.ASYMMETRIC] * 2, "av": [Signedness.UNSIGNED, Signedness.ASYMMETRIC]}
