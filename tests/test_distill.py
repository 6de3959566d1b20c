
import pytest
import torch

from conftest import TINY_SEQ

from quant import distill as distill_mod
from quant.calib_data import random_over_steps
from quant.calibrate import calibrate
from quant.distill import (BKDTraining, DistillConfig, DistillObjective, LRSchedule, bkd_objectives, cache_unit_io,
                          distill, train_stages, train_unit, unit_param_groups)
from quant.layers import QuantLayer, QuantMatMul
from quant.methods.dilatequant import DilateQuantConfig, quantize_dilatequant
from quant.model import QuantModel
from quant.settings import QuantConfig

SEQ = TINY_SEQ


@pytest.fixture
def calib(tiny_trajectories):
    return random_over_steps(tiny_trajectories, 32, torch.Generator().manual_seed(0))


def w4a4(tiny_unet, calib):
    q = QuantModel(tiny_unet, QuantConfig(weight_bit=4, act_bit=4, temporal=True), SEQ)
    return calibrate(q, calib, batch_size=16)


def test_unit_inputs_come_from_the_quantized_chain(tiny_unet, calib):
    q = w4a4(tiny_unet, calib)
    data = cache_unit_io(q, tiny_unet, "mid.block_1", calib, 16)
    fp_in = cache_unit_io(calibrate(QuantModel(tiny_unet, QuantConfig(weight_bit=8)), None), tiny_unet,
                          "mid.block_1", calib, 16)
    assert data.args[0].shape == (32, 16, 8, 8) and data.args[1].shape == (32, 32)   # (h, temb)
    assert not torch.allclose(data.args[0], fp_in.args[0])                             # quantized chain
    assert data.target.shape == (32, 16, 8, 8)


def test_distilling_one_block_lowers_its_loss(tiny_unet, calib):
    q = w4a4(tiny_unet, calib)
    data = cache_unit_io(q, tiny_unet, "mid.block_1", calib, 16)
    with torch.no_grad(), q.slots.active(q.slots.lookup(data.t)):
        before = float((q.model.mid.block_1(*data.args) - data.target).pow(2).mean())
    cfg = DistillConfig(iters=100, batch_size=16, lr_weight=1e-4, lr_quant=1e-4)
    log = train_unit(q, "mid.block_1", data, DistillObjective(cfg), cfg, seed=0)
    assert log["loss_before"] == pytest.approx(before, rel=1e-5)
    assert log["loss_after"] < 0.95 * before and not log["kept_initial"]


@pytest.mark.parametrize("schedule", list(LRSchedule))
def test_learning_rates_follow_the_schedule(tiny_unet, calib, schedule, monkeypatch):
    """Cosine anneals every group from its lr to 0 over the unit's iterations; constant keeps it."""
    q = w4a4(tiny_unet, calib)
    data = cache_unit_io(q, tiny_unet, "mid.block_1", calib, 16)
    seen, real_step = [], torch.optim.Adam.step

    def spy(opt, *args, **kwargs):
        seen.append([g["lr"] for g in opt.param_groups])
        return real_step(opt, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    cfg = DistillConfig(iters=10, batch_size=8, lr_weight=1e-3, lr_quant=1e-4, lr_act=3e-4, lr_schedule=schedule)
    train_unit(q, "mid.block_1", data, DistillObjective(cfg), cfg, seed=0)
    lrs = torch.tensor(seen, dtype=torch.float64)                        # [iters, groups]
    assert lrs.shape[0] == 10 and lrs[0].tolist() == pytest.approx([1e-3, 1e-4, 3e-4])  # weights, Δ_w, Δ_x
    if schedule is LRSchedule.CONSTANT:
        assert torch.all(lrs == lrs[0])
    else:
        want = 0.5 * (1 + torch.cos(torch.pi * torch.arange(10) / 10))
        assert torch.allclose(lrs / lrs[0], want[:, None].double().expand_as(lrs), atol=1e-6)
        assert lrs[-1, 0] < 0.03 * lrs[0, 0]


def test_activation_steps_get_lr_act_and_fall_back_to_lr_quant(tiny_unet, calib):
    unit = w4a4(tiny_unet, calib).model.mid.block_1
    a_params = {id(p) for n, p in unit.named_parameters() if ".a_quant." in n}
    w_params = {id(p) for n, p in unit.named_parameters() if ".w_quant." in n}

    def lr_of(groups, ids):
        return {g["lr"] for g in groups for p in g["params"] if id(p) in ids}

    groups = unit_param_groups(unit, DistillConfig(lr_quant=1e-4, lr_act=1e-3))
    assert a_params and lr_of(groups, a_params) == {1e-3} and lr_of(groups, w_params) == {1e-4}
    assert lr_of(unit_param_groups(unit, DistillConfig(lr_quant=1e-4)), a_params) == {1e-4}
    with pytest.raises(ValueError):
        DistillConfig(lr_act=-1.0)


def test_a_unit_made_worse_by_training_keeps_its_initial_state(tiny_unet, calib):
    q = w4a4(tiny_unet, calib)
    data = cache_unit_io(q, tiny_unet, "conv_out", calib, 16)
    initial = {k: v.clone() for k, v in q.model.conv_out.state_dict().items()}
    cfg = DistillConfig(iters=30, batch_size=16, lr_weight=1.0, lr_quant=1.0)
    log = train_unit(q, "conv_out", data, DistillObjective(cfg), cfg, seed=0)
    assert log["kept_initial"] and log["loss_after"] == log["loss_before"]
    assert all(torch.equal(v, q.model.conv_out.state_dict()[k]) for k, v in initial.items())


def test_resume_after_interruption_equals_uninterrupted(tiny_unet, calib, tmp_path, monkeypatch):
    cfg = DistillConfig(iters=5, batch_size=8, lr_weight=1e-4, lr_quant=1e-4)
    full = w4a4(tiny_unet, calib)
    distill(full, tiny_unet, calib, cfg, tmp_path / "a")

    real_train, calls = distill_mod.train_unit, {"n": 0}

    def crash_on_fourth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(distill_mod, "train_unit", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        distill(w4a4(tiny_unet, calib), tiny_unet, calib, cfg, tmp_path / "b")
    assert len(list((tmp_path / "b").glob("unit_*.pt"))) == 3
    monkeypatch.setattr(distill_mod, "train_unit", real_train)
    resumed = w4a4(tiny_unet, calib)
    distill(resumed, tiny_unet, calib, cfg, tmp_path / "b")
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stale_unit_cache_is_a_clear_error(tiny_unet, calib, tmp_path):
    cfg = DistillConfig(iters=1, batch_size=8)
    distill(w4a4(tiny_unet, calib), tiny_unet, calib, cfg, tmp_path)
    other = QuantModel(tiny_unet, QuantConfig(weight_bit=4, act_bit=4, split=True))
    calibrate(other, calib, batch_size=16)
    with pytest.raises(ValueError, match="delete"):
        distill(other, tiny_unet, calib, cfg, tmp_path)


def test_dilatequant_pipeline_improves_on_w4a4_baseline(tiny_unet, calib, tmp_path):
    held = calib  # the tiny model has no held-out trajectories worth the time; same-set comparison
    off = DilateQuantConfig(scaling=None, temporal=False, distillation=False)
    on = DilateQuantConfig(distill=DistillConfig(iters=40, batch_size=16, lr_weight=1e-4, lr_quant=1e-4))
    errs = {}
    for name, dq in {"baseline": off, "dilatequant": on}.items():
        q = quantize_dilatequant(tiny_unet, QuantConfig(weight_bit=4, act_bit=4), SEQ, calib, dq, tmp_path / name,
                                 batch_size=16)
        with torch.no_grad():
            errs[name] = float((q(held.x, held.t) - tiny_unet(held.x, held.t)).pow(2).mean())
    assert errs["dilatequant"] < errs["baseline"]


def test_timestep_weights_favour_small_noise_levels_with_mean_one():
    from quant.distill import timestep_weights
    sigmas = torch.linspace(0.01, 1.0, 100)
    t = torch.tensor([0, 0, 10, 50, 99])
    w = timestep_weights(t, sigmas, 0.2)
    assert float(w.mean()) == pytest.approx(1.0) and w[0] == w[1]
    assert bool((w[1:].diff() < 0).all())                                      # larger sigma_t, less weight
    ratio = float(w[0] / w[-1])
    assert ratio == pytest.approx((1.0 + 0.04) / (0.01 ** 2 + 0.04), rel=1e-4)   # 1/(sigma^2 + sigma0^2)
    with pytest.raises(ValueError, match="t_weight_sigma = 0.0"):
        DistillConfig(t_weight_sigma=0.0)


def test_weighted_distillation_loss_is_the_weighted_mean_of_sample_errors(tiny_unet, calib, tmp_path):
    q = w4a4(tiny_unet, calib)
    data = cache_unit_io(q, tiny_unet, "mid.block_1", calib, 16)
    data.weight = torch.linspace(0.5, 1.5, len(data.t))
    idx = torch.arange(len(data.t))
    out = data.target + torch.randn_like(data.target)
    per_sample = (out - data.target).pow(2).flatten(1).mean(1)
    weighted = torch.nn.functional.mse_loss(*data.weighted(idx, out, data.target))
    assert float(weighted) == pytest.approx(float((data.weight * per_sample).mean()), rel=1e-5)
    cfg = DistillConfig(iters=2, batch_size=8, t_weight_sigma=0.2)
    with pytest.raises(ValueError, match="sigmas"):
        distill(w4a4(tiny_unet, calib), tiny_unet, calib, cfg, tmp_path / "d")
    sigmas = torch.linspace(0.01, 1.0, 1000)
    log = distill(w4a4(tiny_unet, calib), tiny_unet, calib, cfg, tmp_path / "w", sigmas)
    plain = distill(w4a4(tiny_unet, calib), tiny_unet, calib, DistillConfig(iters=2, batch_size=8), tmp_path / "p")
    assert [e["loss_before"] for e in log] != [e["loss_before"] for e in plain]    # the weighted MSE is reported


def test_unit_caches_on_disk_or_in_float16_are_bounded_and_faithful(tiny_unet, calib, tmp_path, caplog):
    """A unit cache over the RAM budget goes to a memory-mapped file (same values, file removed when done);
    a float16 cache halves the bytes and trains to nearly the same unit; the plan is logged first."""
    from quant.unit_cache import CachePolicy
    caplog.set_level("INFO", logger="quant.distill")
    q = w4a4(tiny_unet, calib)
    ram = cache_unit_io(q, tiny_unet, "mid.block_1", calib, 16)
    disk = cache_unit_io(q, tiny_unet, "mid.block_1", calib, 16, CachePolicy(ram_gb=1e-6), tmp_path / "spill")
    files = list((tmp_path / "spill").glob("*.bin"))
    assert files and torch.equal(disk.target, ram.target) and torch.equal(disk.args[0], ram.args[0])
    disk.release()
    assert not any(f.exists() for f in files)
    half = cache_unit_io(q, tiny_unet, "mid.block_1", calib, 16, CachePolicy(dtype=torch.float16))
    assert half.target.dtype == torch.float16 and half.target.element_size() * 2 == ram.target.element_size()
    torch.testing.assert_close(half.target.float(), ram.target, rtol=1e-3, atol=1e-3)
    cfg = DistillConfig(iters=2, batch_size=8, cache_ram_gb=1e-6)
    distill(w4a4(tiny_unet, calib), tiny_unet, calib, cfg, tmp_path / "run")
    assert "[distill] plan:" in caplog.text and not list((tmp_path / "run" / "cache").glob("*.bin"))


def test_fp_inputs_are_the_fp_models_and_mix_per_sample(tiny_unet, calib):
    """--distill_fp_input: the cache also holds the FP chain's unit inputs; a batch takes them row by row."""
    q = w4a4(tiny_unet, calib)
    data = cache_unit_io(q, tiny_unet, "mid.block_1", calib, 16, fp_inputs=True)
    fp_in = cache_unit_io(calibrate(QuantModel(tiny_unet, QuantConfig(weight_bit=8)), None), tiny_unet,
                          "mid.block_1", calib, 16)
    assert torch.equal(data.target, fp_in.target)
    assert [a.shape for a in data.fp_args] == [a.shape for a in data.args]
    fp_h = torch.stack([_fp_block_input(tiny_unet, calib, i) for i in range(4)])
    torch.testing.assert_close(data.fp_args[0][:4], fp_h)
    assert not torch.allclose(data.args[0], data.fp_args[0])
    idx, rows = torch.arange(4), torch.tensor([True, False, True, False])
    args, _, _, _ = data.batch(idx, torch.device("cpu"), fp_rows=rows)
    for i, from_fp in enumerate(rows.tolist()):
        for a, qa, fa in zip(args, data.args, data.fp_args):
            assert torch.equal(a[i], (fa if from_fp else qa)[i])
    with pytest.raises(ValueError, match="fp_inputs=True"):
        cache_unit_io(q, tiny_unet, "mid.block_1", calib, 16).batch(idx, torch.device("cpu"), fp_rows=rows)


def _fp_block_input(unet, calib, i):
    box = []
    h = unet.mid.block_1.register_forward_pre_hook(lambda m, a: box.append(a[0]))
    with torch.no_grad():
        unet(calib.x[i:i + 1], calib.t[i:i + 1])
    h.remove()
    return box[0][0]


def test_fp_input_distillation_trains_on_fp_inputs_and_stays_off_by_default(tiny_unet, calib, monkeypatch):
    q = w4a4(tiny_unet, calib)
    data = cache_unit_io(q, tiny_unet, "mid.block_1", calib, 16, fp_inputs=True)
    seen, real_batch = [], type(data).batch

    def spy(self, idx, device, dtype=None, fp_rows=None):
        seen.append(fp_rows)
        return real_batch(self, idx, device, dtype, fp_rows)
    monkeypatch.setattr(type(data), "batch", spy)
    for p, expect in ((0.0, None), (1.0, True), (0.5, "mixed")):
        seen.clear()
        cfg = DistillConfig(iters=20, batch_size=16, fp_input=p)
        train_unit(w4a4(tiny_unet, calib), "mid.block_1", data, DistillObjective(cfg), cfg, seed=0)
        training = [r for r in seen if r is not None]
        if expect is None:
            assert not training
        elif expect is True:
            assert len(training) == 20 and all(bool(r.all()) for r in training)
        else:
            share = float(torch.cat(training).float().mean())
            assert len(training) == 20 and 0.3 < share < 0.7
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="fp_input"):
            DistillConfig(fp_input=bad)


def test_staged_bkd_trains_weights_on_fp_activations_then_only_the_activation_quantizers(tiny_unet, calib,
                                                                                         monkeypatch):
    q = w4a4(tiny_unet, calib)
    unit = q.model.mid.block_1
    data = cache_unit_io(q, tiny_unet, "mid.block_1", calib, 16)
    names = {id(p): n for n, p in unit.named_parameters()}
    start = {n: p.detach().clone() for n, p in unit.named_parameters()}
    layers = [m for m in unit.modules() if isinstance(m, (QuantLayer, QuantMatMul))]
    seen, real_step = [], torch.optim.Adam.step

    def spy(opt, *args, **kwargs):     # per step: activation quantizers on?, the parameter names it trains
        seen.append((any(m.quant_act for m in layers), {names[id(p)] for g in opt.param_groups for p in g["params"]}))
        return real_step(opt, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    cfg = DistillConfig(iters=20, batch_size=16, lr_act=1e-3, training=BKDTraining.STAGED)
    log = train_stages(q, "mid.block_1", data, bkd_objectives(cfg), cfg, seed=0)
    assert len(seen) == 40 and len(log["stages"]) == 2 and log["loss_after"] == log["stages"][1]["loss_after"]
    first, second = seen[0][1], seen[-1][1]
    assert not any(on for on, _ in seen[:20]) and all(on for on, _ in seen[20:])      # FP activations, then quantized
    assert first and all(".a_quant." not in n for n in first)                        # weights, Δ_w
    assert second and all(".a_quant." in n for n in second)                          # Δ_x, z_x only
    assert all(m.quant_act for m in layers)                                          # restored
    moved = {n for n, p in unit.named_parameters() if not torch.equal(p, start[n])}
    assert moved & first and moved & second and not any(s["kept_initial"] for s in log["stages"])
    assert [len(o.prepare(unit)) > 0 for o in bkd_objectives(DistillConfig())] == [True]   # joint: one objective
