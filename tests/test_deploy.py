"""The integer path computes what the simulation computes (issue 30): every integer layer against its fake-quant
layer on the same input (max abs difference <= 1e-4 of the output's range), on oneDNN and on the generic
torch._int_mm path; whole tiny UNets; the packed file; what stays simulated and why."""
import pytest
import torch
import torch.nn as nn

from conftest import TINY_SEQ
from quant.calib_data import CalibSet
from quant.calibrate import calibrate
from quant.deploy import convert, load_int, read_header, save_int
from quant.deploy.codes import codes_function, pack_int4, quantize_codes, unpack_int4
from quant.deploy.kernels import exact_bmm, int_bmm, onednn_available
from quant.deploy.layers import IntLayer, IntMatMul
from quant.deploy.model import MixedTimestepsError
from quant.layers import QuantLayer, QuantMatMul
from quant.model import QuantModel, frozen
from quant.settings import QuantConfig, QuantizerSpec, Signedness
from quant.slots import SlotIndex

PATHS = [pytest.param(False, id="onednn"), pytest.param(True, id="generic")]
SLOTS = [10, 20, 30]


def _ranged(quantizers, gen, lo=-3.0, hi=3.0):
    """Give each quantizer a different range per slot (so a wrong slot shows)."""
    for q in quantizers:
        n = q.delta.numel()
        a = lo * (0.5 + torch.rand(n, generator=gen))
        b = hi * (0.5 + torch.rand(n, generator=gen))
        q.set_range(torch.minimum(a, torch.zeros(n)), b)


def _layer(module, w_bits, a_bits, slots, split=0, a_sign=Signedness.ASYMMETRIC, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.2)
    layer = QuantLayer(module, QuantizerSpec(w_bits), QuantizerSpec(a_bits, a_sign), slots, split)
    w = layer.weight.detach().flatten(1)
    layer.w_quant.set_range(w.amin(1), w.amax(1))
    with torch.no_grad():                                     # a dilation scale s per input channel
        layer.in_scale.copy_(1 + torch.rand(layer.in_scale.shape, generator=gen))
    _ranged(layer.a_quant, gen)
    return layer


def _close(out, ref):
    assert out.shape == ref.shape
    scale = float(ref.max() - ref.min())
    worst = float((out - ref).abs().max())
    assert worst <= 1e-4 * scale, f"max abs diff {worst:.3g} against a range of {scale:.3g}"


def _compare(fake, integer, slots, *inputs, t=20):
    idx = slots.lookup(torch.full((inputs[0].shape[0],), t))
    with torch.no_grad(), slots.active(idx), integer.slots.active(idx):
        if isinstance(fake, QuantLayer) and fake.frozen_weight is None:
            fake.frozen_weight = fake.op_weight().detach()
        _close(integer(*inputs), fake(*inputs))


LAYERS = {
    "conv 3x3": lambda: nn.Conv2d(6, 5, 3, padding=1),
    "conv 1x1": lambda: nn.Conv2d(6, 5, 1),
    "conv strided": lambda: nn.Conv2d(6, 5, 3, stride=2, padding=1),
    "conv no padding": lambda: nn.Conv2d(6, 5, 3, stride=2),
    "conv grouped, dilated": lambda: nn.Conv2d(6, 4, 3, padding=2, dilation=2, groups=2),
    "conv1d": lambda: nn.Conv1d(6, 5, 1),
    "linear": lambda: nn.Linear(6, 5),
}


def _input(kind, gen, n=3):
    shape = {"conv1d": (n, 6, 7), "linear": (n, 4, 6)}.get(kind, (n, 6, 9, 9))
    return torch.randn(shape, generator=gen) * 2


@pytest.mark.parametrize("generic", PATHS)
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("w_bits, a_bits", [(4, 4), (8, 8), (4, 8), (6, 6)])
def test_an_integer_layer_equals_its_fake_quant_layer(kind, w_bits, a_bits, generic):
    if generic and "grouped" in kind:
        pytest.skip("grouped convolutions run on oneDNN only (the generic im2col path refuses them)")
    slots = SlotIndex(SLOTS)
    fake = _layer(LAYERS[kind](), w_bits, a_bits, slots)
    integer = IntLayer.of(fake, slots)
    integer.prepare(compiled=False, generic=generic)
    gen = torch.Generator().manual_seed(1)
    for t in SLOTS:                                           # the TPQ slot of each call
        _compare(fake, integer, slots, _input(kind, gen), t=t)


@pytest.mark.skipif(not onednn_available(torch.device("cpu")), reason="oneDNN's int8 ops are not in this torch")
@pytest.mark.parametrize("halves", [pytest.param(False, id="as-this-cpu"), pytest.param(True, id="two-halves")])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_8bit_products_are_exact_where_onednn_would_saturate_them(kind, halves, monkeypatch):
    """Codes 255 against weights -128..127: without VNNI oneDNN's int16 pair sums saturate (2 x 255 x 127 >
    32767); the layer then multiplies two 4-bit halves of its codes. two-halves forces that path on any CPU."""
    import quant.deploy.kernels as kernels
    if halves:
        monkeypatch.setattr(kernels, "onednn_pairs_saturate", lambda: True)
    layer = LAYERS[kind]()
    conv = None if isinstance(layer, nn.Linear) else {k: getattr(layer, k) for k in ("stride", "padding",
                                                                                     "dilation", "groups")}
    gen = torch.Generator().manual_seed(3)
    w = torch.randint(0, 256, layer.weight.shape, generator=gen, dtype=torch.int16)
    w.view(len(w), -1)[:, 0], w.view(len(w), -1)[:, 1] = 255, 0                     # the full 8-bit weight range
    zero = torch.randint(120, 136, (len(w),), generator=gen)
    x = torch.where(torch.rand(_input(kind, gen).shape, generator=gen) < 0.7, 255,
                    torch.randint(0, 256, _input(kind, gen).shape, generator=gen)).to(torch.uint8)
    x_zero = torch.tensor(17)
    gemm = kernels.IntGemm(w.to(torch.uint8), zero, torch.ones(len(w)), conv, x_bits=8)
    assert gemm.split_codes == kernels.onednn_pairs_saturate()
    if conv is not None and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    got = gemm(x, torch.ones(()), x_zero, 8, None).double()
    wz = (w - zero.view(-1, *[1] * (w.dim() - 1))).double()
    xz = x.double() - 17
    if conv is None:
        want = xz @ wz.t()
    else:
        want = (nn.functional.conv2d if x.dim() == 4 else nn.functional.conv1d)(xz, wz, None, **conv)
    assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())


@pytest.mark.parametrize("generic", PATHS)
@pytest.mark.parametrize("kind", ["conv 3x3", "linear"])
def test_a_split_layer_quantizes_its_two_halves_apart(kind, generic):
    slots = SlotIndex(SLOTS)
    fake = _layer(LAYERS[kind](), 4, 4, slots, split=2)
    integer = IntLayer.of(fake, slots)
    integer.prepare(compiled=False, generic=generic)
    assert len(integer.gemms) == 2
    gen = torch.Generator().manual_seed(2)
    x = _input(kind, gen) if kind != "linear" else torch.randn(3, 6, generator=gen)   # split: channels on dim 1
    x[:, :2] *= 10                                            # halves of very different ranges
    _compare(fake, integer, slots, x)


@pytest.mark.parametrize("generic", PATHS)
@pytest.mark.parametrize("zero_at", ["low", "high"])
def test_zero_points_at_the_ends_of_the_grid(zero_at, generic):
    """All-positive inputs put z at 0; all-negative ones at 2^b - 1 (and weights likewise)."""
    slots = SlotIndex(SLOTS)
    fake = _layer(nn.Conv2d(6, 5, 3, padding=1), 8, 8, slots)
    sign = 1.0 if zero_at == "low" else -1.0
    with torch.no_grad():
        fake.weight.abs_().mul_(sign)
        w = fake.weight.flatten(1)
        fake.w_quant.set_range(w.amin(1), w.amax(1))
        for q in fake.a_quant:
            q.set_range(torch.zeros(3), torch.full((3,), 4.0)) if sign > 0 else \
                q.set_range(torch.full((3,), -4.0), torch.zeros(3))
    zero = fake.a_quant[0].zero.round()
    assert bool((zero == (0 if sign > 0 else 255)).all())
    integer = IntLayer.of(fake, slots)
    integer.prepare(compiled=False, generic=generic)
    x = sign * torch.rand(2, 6, 8, 8, generator=torch.Generator().manual_seed(3)) * 5      # clips at the far end
    _compare(fake, integer, slots, x)


@pytest.mark.parametrize("generic", PATHS)
@pytest.mark.parametrize("sm_bits", [4, 8])
def test_both_attention_matmuls_equal_their_fake_quant_form(sm_bits, generic):
    slots = SlotIndex(SLOTS)
    gen = torch.Generator().manual_seed(4)
    for softmax in (False, True):                             # q @ kᵀ, then softmax @ v
        spec_a = QuantizerSpec(sm_bits, Signedness.UNSIGNED) if softmax else QuantizerSpec(sm_bits)
        fake = QuantMatMul(spec_a, QuantizerSpec(sm_bits), slots)
        _ranged(fake.a_quant[:1], gen, lo=0.0 if softmax else -3.0, hi=1.0 if softmax else 3.0)
        _ranged(fake.a_quant[1:], gen)
        integer = IntMatMul.of(fake, slots)
        integer.prepare(compiled=False, generic=generic)
        a = torch.rand(6, 5, 7, generator=gen) if softmax else torch.randn(6, 5, 7, generator=gen) * 2
        b = torch.randn(6, 7, 4, generator=gen) * 2
        _compare(fake, integer, slots, a, b)


@pytest.mark.parametrize("precision", ["highest", "high"])      # float32 bmm in exact chunks; per-row _int_mm
def test_batched_integer_product_is_the_int32_sum_bit_for_bit(precision):
    gen = torch.Generator().manual_seed(7)
    extreme_a = torch.full((2, 3, 2100), -128, dtype=torch.int8)      # every partial sum at its largest magnitude
    extreme_b = torch.full((2, 2100, 24), -128, dtype=torch.int8)
    rand_a = torch.randint(-128, 128, (3, 32, 1500), generator=gen, dtype=torch.int8)
    rand_b = torch.randint(-128, 128, (3, 1500, 40), generator=gen, dtype=torch.int8)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        for a, b in ((extreme_a, extreme_b), (rand_a, rand_b)):
            assert torch.equal(int_bmm(a, b), torch.bmm(a.long(), b.long()).int())
    finally:
        torch.set_float32_matmul_precision(previous)


def test_exact_float_product_of_wide_codes_is_the_integer_sum():
    """exact_bmm chunks K by the operands' product bound: 8-bit centred codes (|q| <= 255) over K = 700 take three
    chunks of <= 258, each partial sum within 2^24."""
    extreme = torch.full((2, 3, 700), 255.0), torch.full((2, 700, 5), -255.0)
    gen = torch.Generator().manual_seed(8)
    rand = (torch.randint(-255, 256, (3, 4, 700), generator=gen).float(),
            torch.randint(-255, 256, (3, 700, 6), generator=gen).float())
    for a, b in (extreme, rand):
        assert torch.equal(exact_bmm(a, b, 255 * 255), torch.bmm(a.long(), b.long()).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("zero_at", ["low", "high"])
def test_attention_product_on_float_units_equals_the_int8_product(zero_at, dtype):
    """The CPU's float path (centred codes in exact float32 sums) and the int8 path (int_bmm plus zero-point terms,
    taken under a reduced float32 matmul precision) give the same bits, with 8-bit zero points at a grid end and K
    long enough to be chunked."""
    slots = SlotIndex(SLOTS)
    sign = 1.0 if zero_at == "low" else -1.0
    fake = QuantMatMul(QuantizerSpec(8), QuantizerSpec(8), slots)
    for q in fake.a_quant:
        q.set_range(torch.zeros(3), torch.full((3,), 4.0)) if sign > 0 else \
            q.set_range(torch.full((3,), -4.0), torch.zeros(3))
    gen = torch.Generator().manual_seed(9)
    a, b = sign * torch.rand(2, 5, 600, generator=gen) * 5, sign * torch.rand(2, 600, 3, generator=gen) * 5
    fake.to(dtype)
    a, b = a.to(dtype), b.to(dtype)                           # codes are computed in the operands' dtype on both paths
    step = fake.a_quant[0].delta[1].detach().clamp_min(1e-8)  # just below rounding boundaries: float32 would round up
    a[0] = sign * step * (torch.randint(0, 200, (5, 600), generator=gen).to(dtype) + 0.5) - sign * 1e-9
    outs = {}
    previous = torch.get_float32_matmul_precision()
    try:
        for precision in ("highest", "high"):
            torch.set_float32_matmul_precision(precision)
            integer = IntMatMul.of(fake, slots)
            integer.prepare(compiled=False)
            assert (integer.bound is not None) == (precision == "highest")
            with slots.active(torch.full((2,), 1)):
                outs[precision] = integer(a, b)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert torch.equal(outs["highest"], outs["high"])


def test_compiled_codes_are_the_eager_codes_bit_for_bit():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 8, 9, 9, generator=gen) * 3
    step = torch.rand(1, 8, 1, 1, generator=gen) * 0.3 + 0.05
    args = (step, torch.tensor(-7.0), torch.tensor(8.0), torch.tensor(7.0))
    assert torch.equal(codes_function(True)(x, *args), quantize_codes(x, *args))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(codes_function(True)(x_cl, *args), quantize_codes(x, *args))


def test_int4_codes_pack_two_per_byte():
    codes = torch.randint(0, 16, (5, 3, 3, 3), generator=torch.Generator().manual_seed(6)).to(torch.uint8)
    packed = pack_int4(codes)
    assert packed.numel() == (codes.numel() + 1) // 2
    assert torch.equal(unpack_int4(packed, tuple(codes.shape)), codes)


# ---------------------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------------------

def _calibrated(fp, config, schedule, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * len(schedule), *fp_shape(fp), generator=gen)
    return calibrate(QuantModel(fp, config, schedule), CalibSet(x, torch.tensor(list(schedule) * 2)), batch_size=8)


def fp_shape(fp):
    return fp.cfg.in_channels, fp.cfg.resolution, fp.cfg.resolution


@pytest.mark.parametrize("generic", PATHS)
@pytest.mark.parametrize("bits", [4, 8])
def test_every_layer_of_a_converted_unet_follows_the_simulation(tiny_unet, bits, generic):
    """Each integer layer of the converted UNet (8-bit edge layers next to b-bit inner ones, split layers, both
    attention matmuls) against its fake-quant twin on the input the simulation gives it, at every timestep.
    Whole outputs are compared only loosely: a float-rounding difference upstream can flip one code downstream,
    and a random-weight network amplifies it."""
    q = _calibrated(tiny_unet, QuantConfig(weight_bit=bits, act_bit=bits, temporal=True, split=True), TINY_SEQ)
    ints = convert(q, compiled=False, generic=generic)
    edges = [m for n, m in ints.int_modules() if isinstance(m, IntLayer) and m.spec["w_bits"] == 8]
    assert ints.simulated == [] and len(edges) == (2 if bits == 4 else len(list(q.quant_layers())))
    x = torch.randn(3, *fp_shape(tiny_unet), generator=torch.Generator().manual_seed(7))
    names = [n for n, m in q.model.named_modules() if isinstance(m, (QuantLayer, QuantMatMul))]
    for t in sorted(set(TINY_SEQ)):
        inputs = {}
        hooks = [q.model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a))
                 for n in names]
        with torch.no_grad(), frozen(q):
            ref = q(x, torch.full((3,), t))
        for h in hooks:
            h.remove()
        assert sorted(inputs) == sorted(names)
        for name in names:
            _compare(q.model.get_submodule(name), ints.model.get_submodule(name), q.slots, *inputs[name], t=t)
        assert float((ints(x, t) - ref).norm() / ref.norm()) < 0.1


def test_a_mixed_timestep_batch_is_one_line(tiny_unet):
    q = _calibrated(tiny_unet, QuantConfig(weight_bit=8, act_bit=8, temporal=True), TINY_SEQ)
    ints = convert(q, compiled=False)
    with pytest.raises(MixedTimestepsError, match="one timestep per call"):
        ints(torch.randn(2, *fp_shape(tiny_unet)), torch.tensor(TINY_SEQ[:2]))


def test_what_cannot_run_as_integers_is_listed_with_the_reason(tiny_unet):
    weight_only = convert(_calibrated(tiny_unet, QuantConfig(weight_bit=4), TINY_SEQ), compiled=False)
    assert weight_only.simulated and all(s["kind"] == "weight-only" for s in weight_only.simulated)
    sm16 = convert(_calibrated(tiny_unet, QuantConfig(weight_bit=8, act_bit=8, sm_abit=16), TINY_SEQ), compiled=False)
    assert [s["name"] for s in sm16.simulated] == [n for n, m in sm16.model.named_modules() if isinstance(m, QuantMatMul)]
    assert all("16-bit" in s["reason"] for s in sm16.simulated)
    x = torch.randn(2, *fp_shape(tiny_unet))
    q = _calibrated(tiny_unet, QuantConfig(weight_bit=8, act_bit=8, sm_abit=16), TINY_SEQ)
    with torch.no_grad(), frozen(q):
        ref = q(x, 30)
    assert float((sm16(x, 30) - ref).norm() / ref.norm()) < 0.01


def test_the_packed_file_round_trips_and_is_small(tiny_unet, tmp_path):
    from quant.checkpoint import save_quantized
    from ddim.model import UNet
    q = _calibrated(tiny_unet, QuantConfig(weight_bit=4, act_bit=4, temporal=True), TINY_SEQ)
    ints = convert(q, compiled=False)
    path = save_int(tmp_path / "unet.int", ints, {"method": "test", "network": {"config": tiny_unet.cfg.__dict__}})
    again = save_int(tmp_path / "again.int", ints, {"method": "test", "network": {"config": tiny_unet.cfg.__dict__}})
    assert path.read_bytes() == again.read_bytes()                          # same contents, same bytes
    save_quantized(tmp_path / "quantized.pt", q, "test")
    assert path.stat().st_size < 0.5 * (tmp_path / "quantized.pt").stat().st_size
    header = read_header(path)
    assert header["bits"]["weight"] == 4 and header["schedule"] == sorted(set(TINY_SEQ))

    def build(network):
        from ddim.config import UNetConfig
        cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in network["config"].items()}
        return UNet(UNetConfig(**cfg))
    loaded, _ = load_int(path, build, compiled=False)
    x = torch.randn(2, *fp_shape(tiny_unet))
    assert torch.equal(loaded(x, TINY_SEQ[2]), ints(x, TINY_SEQ[2]))


def test_conversion_on_the_meta_device_follows_it(tiny_unet):
    q = QuantModel(tiny_unet.to("meta"), QuantConfig(weight_bit=4, act_bit=4, temporal=True), TINY_SEQ)
    for _, m in q.act_quant_modules():
        for a in m.a_quant:
            a.is_calibrated = True
    for _, layer in q.quant_layers():
        layer.w_quant.is_calibrated = True
    ints = convert(q, compiled=False)
    assert {b.device.type for b in ints.buffers()} == {"meta"}


# ---------------------------------------------------------------------------------------------------
# Through the sampling scripts
# ---------------------------------------------------------------------------------------------------

DQ = ["--ptq", "--quant_mode", "dilatequant", "--weight_bit", "4", "--quant_act", "--act_bit", "4", "--cali_n", "16",
      "--cali_iters", "2", "--distill_batch_size", "4", "--no_fid"]


def test_backend_int_samples_the_calibrated_model_and_says_so(tiny_task, tmp_path):
    import numpy as np
    from conftest import run
    from evaluation.fidelity import paired_psnr_db
    from tools.export_int import export
    fake = run(tiny_task, tmp_path / "fake", *DQ)
    ckpt = str(tmp_path / "fake" / "quantized.pt")
    ints = run(tiny_task, tmp_path / "int", *DQ, "--backend", "int", "--cali_ckpt", ckpt)
    assert fake["backend"] == "fake" and ints["backend"] == "int" and ints["simulated_layers"] == []
    assert "oneDNN" in ints["int_kernels"] and "4-bit range" in ints["int_note"]
    images = {d: np.load(tmp_path / d / "samples.npz")["arr_0"] for d in ("fake", "int")}
    assert np.median(paired_psnr_db(images["fake"], images["int"])) > 25          # the same function
    sizes = export(tmp_path / "fake" / "quantized.pt", tmp_path / "unet.int")
    assert sizes["packed_bytes"] < 0.6 * sizes["quantized_pt_bytes"]
    again = run(tiny_task, tmp_path / "file", *DQ, "--backend", "int", "--cali_ckpt", str(tmp_path / "unet.int"))
    assert again["quantized_from"]["sha256"] != ints["quantized_from"]["sha256"]
    assert np.array_equal(np.load(tmp_path / "file" / "samples.npz")["arr_0"], images["int"])


def test_backend_flags_are_checked_before_any_work(tiny_task, tmp_path):
    from common.errors import UsageError
    from conftest import run
    with pytest.raises(UsageError, match="--backend is a quantization flag, but --ptq is not given"):
        run(tiny_task, tmp_path / "a", "--backend", "int", "--no_fid")
    with pytest.raises(UsageError, match="--compile compiles the simulated model"):
        run(tiny_task, tmp_path / "b", *DQ, "--backend", "int", "--compile")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_backend_int_runs_the_embedded_ldm_with_guidance(tmp_path):
    from conftest import ROOT
    from experiments.ldm_task import main
    common = ["--config", str(ROOT / "configs" / "latent-diffusion" / "mnist-ldm-kl-4.yaml"), "-n", "4", "--batch_size",
              "4", "-c", "4", "--ptq", "--quant_mode", "dilatequant", "--weight_bit", "8", "--quant_act", "--act_bit",
              "8", "--split", "--cali_n", "16", "--cali_iters", "1", "--distill_batch_size", "4", "--no_fid"]
    main([*common, "-l", str(tmp_path / "fake")])
    rec = main([*common, "--backend", "int", "--cali_ckpt", str(tmp_path / "fake" / "quantized.pt"),
                "-l", str(tmp_path / "int")])
    assert rec["backend"] == "int" and rec["guided"] and rec["simulated_layers"] == []
