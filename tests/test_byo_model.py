"""Bring your own model (docs/api.md): a UNet of another codebase (diffusers-like names, called as
model(x, t, encoder_hidden_states=ctx)) quantized through the library API with an adapter registered from outside:
wrap -> dilate -> calibrate -> distill -> save -> load (bit-identical) -> sample under frozen(). Plus the one-line
error for an unregistered class, a LayerNorm([C, H, W]) producer (X/s stays in the quantizer) and a
ConvTranspose2d that stays FP, listed."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ddim import ddim_sample, make_betas
from ddim.config import DiffusionConfig
from quant.adapters import register
from quant.calib_data import draw_over_steps, trajectories_for
from quant.calibrate import calibrate
from quant.checkpoint import load_quantized, save_quantized
from quant.dilation import dilate
from quant.distill import DistillConfig, distill
from quant.layers import QuantLayer, QuantMatMul
from quant.methods.dilatequant import DilateQuantConfig, quantize_dilatequant
from quant.model import QuantModel, frozen, quant_enabled
from quant.settings import QuantConfig, Signedness

SIZE, CROSS_DIM, TOKENS = 16, 16, 5
SEQ = list(range(0, 1000, 250))                                  # a 4-step DDIM schedule: the TPQ slots
BETAS = make_betas(DiffusionConfig())
W4A4 = QuantConfig(weight_bit=4, act_bit=4, temporal=True, split=True)


# ------------------------------------------------------------------------------------------------------------
# A network of "another codebase": its own names and call convention, nothing imported from this repo's models
# ------------------------------------------------------------------------------------------------------------

def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)                        # [B, dim]


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(dim, out), nn.Linear(out, out)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2, self.conv2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x))) + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class BatchMatMul(nn.Module):
    def forward(self, a, b):
        return torch.bmm(a, b)


class Attention(nn.Module):
    """Heads laid out (b h): row b * heads + h."""

    def __init__(self, dim: int, heads: int, cross_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(cross_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(cross_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.scores, self.mix = BatchMatMul(), BatchMatMul()

    def forward(self, x, encoder_hidden_states=None):
        ctx = x if encoder_hidden_states is None else encoder_hidden_states
        b, n, c = x.shape
        d = c // self.heads

        def split(v):                                                        # [b, m, c] -> [(b h), m, d]
            return v.reshape(b, -1, self.heads, d).transpose(1, 2).reshape(b * self.heads, -1, d)

        q, k, v = split(self.to_q(x)), split(self.to_k(ctx)), split(self.to_v(ctx))
        p = (self.scores(q, k.transpose(1, 2)) * d ** -0.5).softmax(-1)     # [(b h), n, m]
        return self.to_out[0](self.mix(p, v).reshape(b, self.heads, n, d).transpose(1, 2).reshape(b, n, c))


class Transformer2DModel(nn.Module):
    def __init__(self, ch: int, cross_dim: int):
        super().__init__()
        self.norm, self.proj_in = nn.GroupNorm(8, ch), nn.Linear(ch, ch)
        self.norm1, self.attn1 = nn.LayerNorm(ch), Attention(ch, 2)
        self.norm2, self.attn2 = nn.LayerNorm(ch), Attention(ch, 2, cross_dim)
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x, encoder_hidden_states=None):
        b, c, hgt, w = x.shape
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))           # [b, hw, c]
        h = h + self.attn1(self.norm1(h))
        h = h + self.attn2(self.norm2(h), encoder_hidden_states=encoder_hidden_states)
        return x + self.proj_out(h).transpose(1, 2).reshape(b, c, hgt, w)


class Resample(nn.Module):
    def __init__(self, ch: int, mode: str):
        super().__init__()
        self.mode = mode
        self.conv = {"down": lambda: nn.Conv2d(ch, ch, 3, stride=2, padding=1),      # up: nearest 2x, then conv
                     "up": lambda: nn.Conv2d(ch, ch, 3, padding=1),
                     "transpose": lambda: nn.ConvTranspose2d(ch, ch, 2, stride=2)}[mode]()

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0) if self.mode == "up" else x)


class Block(nn.Module):
    def __init__(self, ins: list[int], out: int, attn: bool, resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(c, out, 128) for c in ins])
        self.attentions = nn.ModuleList([Transformer2DModel(out, CROSS_DIM) for _ in ins] if attn else [])
        self.samplers = nn.ModuleList([Resample(out, resample)] if resample else [])


class MidBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, 128), ResnetBlock2D(ch, ch, 128)])
        self.attentions = nn.ModuleList([Transformer2DModel(ch, CROSS_DIM)])

    def forward(self, h, temb, encoder_hidden_states=None):
        h = self.attentions[0](self.resnets[0](h, temb), encoder_hidden_states=encoder_hidden_states)
        return self.resnets[1](h, temb)


class ForeignUNet(nn.Module):
    """eps = model(x, t, encoder_hidden_states=ctx): two levels (32, 64 channels), cross-attention at 16x16 and
    in the middle, up-path resnets reading cat([h, skip]), output conv reading a LayerNorm([32, 16, 16])."""

    def __init__(self, upsample: str = "up"):
        super().__init__()
        self.time_embedding = TimestepEmbedding(32, 128)
        self.conv_in = nn.Conv2d(3, 32, 3, padding=1)
        self.down_blocks = nn.ModuleList([Block([32], 32, True, "down"), Block([32], 64, False, None)])
        self.mid_block = MidBlock(64)
        self.up_blocks = nn.ModuleList([Block([128, 96], 64, False, upsample), Block([96, 64], 32, True, None)])
        self.conv_norm_out = nn.LayerNorm([32, SIZE, SIZE])
        self.conv_out = nn.Conv2d(32, 3, 3, padding=1)

    def forward(self, x, t, encoder_hidden_states=None):
        temb = self.time_embedding(timestep_features(t, 32))
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            for j, res in enumerate(block.resnets):
                h = res(h, temb)
                if len(block.attentions):
                    h = block.attentions[j](h, encoder_hidden_states=encoder_hidden_states)
                skips.append(h)
            for sampler in block.samplers:
                h = sampler(h)
                skips.append(h)
        h = self.mid_block(h, temb, encoder_hidden_states=encoder_hidden_states)
        for block in self.up_blocks:
            for j, res in enumerate(block.resnets):
                h = res(torch.cat([h, skips.pop()], dim=1), temb)
                if len(block.attentions):
                    h = block.attentions[j](h, encoder_hidden_states=encoder_hidden_states)
            for sampler in block.samplers:
                h = sampler(h)
        return self.conv_out(self.conv_norm_out(h))


# ------------------------------------------------------------------------------------------------------------
# Its adapter, registered from outside the quant package (the docs/api.md example)
# ------------------------------------------------------------------------------------------------------------

def _of_type(model: nn.Module, cls: type) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, cls)]


def _block_units(prefix: str, block: nn.Module) -> list[str]:
    names = []
    for j in range(len(block.resnets)):
        names += [f"{prefix}.resnets.{j}"] + ([f"{prefix}.attentions.{j}"] if len(block.attentions) else [])
    return names + ([f"{prefix}.samplers.0"] if len(block.samplers) else [])


@register(f"{__name__}.ForeignUNet")
class ForeignUNetAdapter:
    def units(self, model):                             # in forward order (called on the wrapped model)
        names = ["time_embedding", "conv_in"]
        for i, block in enumerate(model.down_blocks):
            names += _block_units(f"down_blocks.{i}", block)
        names.append("mid_block")
        for i, block in enumerate(model.up_blocks):
            names += _block_units(f"up_blocks.{i}", block)
        return names + ["conv_out"]

    def edge_layers(self, model):
        return "conv_in", "conv_out"

    def split_channels(self, model):                    # called on the FP model: layer attributes are readable
        skips = [model.conv_in.out_channels]            # the skip stack of forward
        for block in model.down_blocks:
            skips += [r.conv2.out_channels for r in block.resnets] + [s.conv.out_channels for s in block.samplers]
        out = {}
        for i, block in enumerate(model.up_blocks):
            for j, res in enumerate(block.resnets):     # cat([h, skip]): the first channels are h
                first = res.conv1.in_channels - skips.pop()
                out[f"up_blocks.{i}.resnets.{j}.conv1"] = out[f"up_blocks.{i}.resnets.{j}.conv_shortcut"] = first
        return out

    def softmax_operands(self, model):                  # mix(softmax, v): operand 0 is the softmax output
        return {f"{a}.{op}": (0 if op == "mix" else None) for a in _of_type(model, Attention)
                for op in ("scores", "mix")}

    def shared_inputs(self, model):
        return list(self.norm_producers(model)) + [(f"{t}.attn2.to_k", f"{t}.attn2.to_v")
                                                   for t in _of_type(model, Transformer2DModel)]

    def norm_producers(self, model):                    # layer groups reading an affine norm's output directly
        out = {("conv_out",): "conv_norm_out"}
        for t in _of_type(model, Transformer2DModel):
            out[(f"{t}.proj_in",)] = f"{t}.norm"
            out[tuple(f"{t}.attn1.to_{p}" for p in "qkv")] = f"{t}.norm1"
            out[(f"{t}.attn2.to_q",)] = f"{t}.norm2"
        return out

    def head_layout(self, model):                       # Attention.split: row b * heads + h
        return "(b h)"


# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fp():
    torch.manual_seed(0)
    return ForeignUNet().eval()


def context(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, TOKENS, CROSS_DIM, generator=torch.Generator().manual_seed(seed))


def draw_calibration(model: nn.Module, n: int = 8):
    """Calibration data from the FP model's own DDIM trajectories: a forward pre-hook records each call's
    (x, t, **kwargs); draw_over_steps keeps n of them at random steps."""
    x_T = torch.randn(trajectories_for(n, 2), 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    ctx = context(len(x_T), 2)

    def sample_fn(x, on_step, rows):
        hook = model.register_forward_pre_hook(lambda m, args, kwargs: on_step(args[0], args[1], kwargs),
                                               with_kwargs=True)
        try:
            ddim_sample(lambda x, t: model(x, t, encoder_hidden_states=ctx[rows]), x, SEQ, BETAS)
        finally:
            hook.remove()

    return draw_over_steps(sample_fn, x_T, n, len(SEQ), 2, torch.Generator().manual_seed(0), batch_size=4)


@pytest.fixture(scope="module")
def calib(fp):
    return draw_calibration(fp)


def test_foreign_unet_goes_through_the_whole_api(fp, calib, tmp_path):
    assert set(calib.cond) == {"encoder_hidden_states"} and calib.cond["encoder_hidden_states"].shape == (8, TOKENS,
                                                                                                          CROSS_DIM)
    q = QuantModel(fp, W4A4, schedule=SEQ)                                   # wrap
    assert sum(1 for _ in q.quant_layers()) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in fp.modules())
    up = q.model.up_blocks                                                   # cat([h, skip]): h first
    assert up[0].resnets[0].conv1.split == 64 and up[1].resnets[1].conv_shortcut.split == 32
    assert q.model.conv_in.w_quant.spec.bits == 8 and q.model.time_embedding.linear_1.w_quant.spec.bits == 4
    mix = q.model.get_submodule("mid_block.attentions.0.attn2.mix")
    assert isinstance(mix, QuantMatMul) and mix.a_quant[0].spec.signedness is Signedness.UNSIGNED
    dilate(q)                                                                # Weight Dilation
    calibrate(q, calib, batch_size=8)                                        # weights, then TPQ activation ranges
    cfg = DistillConfig(iters=3, batch_size=4, cache_batch_size=8)
    distill(q, fp, calib, cfg, tmp_path / "distill")                         # BKD, unit by unit
    assert len(list((tmp_path / "distill").glob("unit_*.pt"))) == len(q.adapter.units(q.model)) == 15
    save_quantized(tmp_path / "quantized.pt", q, "dilatequant")
    loaded, payload = load_quantized(tmp_path / "quantized.pt", fp)          # rebuilt from the FP model
    assert payload["schedule"] == SEQ
    x, t, ctx = torch.randn(3, 3, SIZE, SIZE), torch.tensor([SEQ[0], SEQ[3], SEQ[1]]), context(3, 5)
    with frozen(q), frozen(loaded):
        assert torch.equal(q(x, t, encoder_hidden_states=ctx), loaded(x, t, encoder_hidden_states=ctx))
        loaded.check_timesteps(SEQ)
        images = ddim_sample(lambda x, t: loaded(x, t, encoder_hidden_states=ctx), torch.randn(3, 3, SIZE, SIZE),
                             SEQ, BETAS)
    assert images.shape == (3, 3, SIZE, SIZE) and torch.isfinite(images).all()
    one_call = quantize_dilatequant(fp, W4A4, SEQ, calib, DilateQuantConfig(distill=cfg), tmp_path / "one_call",
                                    batch_size=8)                            # the same pipeline in one call
    a, b = q.state_dict(), one_call.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_unregistered_model_is_a_one_line_error_naming_register():
    with pytest.raises(KeyError, match=r"register\(.*NotRegistered.*docs/api.md") as err:
        QuantModel(type("NotRegistered", (nn.Module,), {})(), W4A4, schedule=SEQ)
    assert "\n" not in str(err.value)


def test_layer_norm_over_c_h_w_keeps_x_over_s_in_the_quantizer(fp, calib):
    """conv_out reads LayerNorm([32, 16, 16]): its affine is per element, not per channel, so 1/s cannot fold
    into it; X/s happens in conv_out's activation quantizer and the FP outputs stay the same."""
    q = QuantModel(fp, W4A4, schedule=SEQ)
    x, t, cond = calib.x, calib.t, calib.cond
    with torch.no_grad():
        ref = fp(x, t, **cond)
    scales = dilate(q)
    assert bool((scales["conv_out"] > 1).any())
    assert torch.equal(q.model.conv_out.in_scale, scales["conv_out"])
    assert torch.equal(q.model.conv_norm_out.weight, fp.conv_norm_out.weight)
    attn1 = "down_blocks.0.attentions.0"                                     # LayerNorm([C]) does fold
    assert torch.equal(q.model.get_submodule(f"{attn1}.attn1.to_q").in_scale, torch.ones(32))
    with torch.no_grad(), quant_enabled(q, weight=False, act=False):
        torch.testing.assert_close(q(x, t, **cond), ref, rtol=1e-4, atol=1e-5)          # float rounding of X/s and W·s


def test_norms_are_not_listed_as_unquantized_weight_layers(fp):
    assert QuantModel(fp, W4A4, schedule=SEQ).unquantized == []


def test_conv_transpose_stays_fp_and_is_listed_with_a_warning():
    with pytest.warns(UserWarning, match=r"stay in full precision.*up_blocks.0.samplers.0.conv \(ConvTranspose2d\)"):
        q = QuantModel(ForeignUNet(upsample="transpose"), W4A4, schedule=SEQ)
    assert "up_blocks.0.samplers.0.conv (ConvTranspose2d)" in q.unquantized
    assert isinstance(q.model.up_blocks[0].samplers[0].conv, nn.ConvTranspose2d)
    assert isinstance(q.model.up_blocks[0].resnets[0].conv1, QuantLayer)
