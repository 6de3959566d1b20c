import pytest
import torch

from quant.quantizer import ActQuantizer, WeightQuantizer, fake_quant, range_to_params
from quant.range_search import init_range
from quant.settings import QuantConfig, QuantizerSpec, RangeInit, Signedness
from quant.slots import SlotIndex, UncalibratedTimestepError

SIGNS = list(Signedness)


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("sign", SIGNS)
def test_error_inside_range_is_at_most_half_a_step(bits, sign):
    spec = QuantizerSpec(bits, sign)
    lo = torch.tensor([0.0 if sign is Signedness.UNSIGNED else -1.3])
    hi = torch.tensor([2.1])
    delta, zero = range_to_params(lo, hi, spec)
    # the representable interval: [Δ(qmin - z), Δ(qmax - z)]
    x = torch.linspace(float(delta * (spec.qmin - zero)), float(delta * (spec.qmax - zero)), 5001)
    err = (fake_quant(x, delta, zero, spec.qmin, spec.qmax) - x).abs().max()
    assert err <= delta / 2 + 1e-6
    # the requested range is (nearly) representable: clipping only beyond it
    assert float(delta * (spec.qmax - zero)) >= float(hi) - float(delta) / 2 - 1e-6


def test_values_outside_range_are_clipped():
    delta, zero = torch.tensor(0.1), torch.tensor(5.0)
    out = fake_quant(torch.tensor([-100.0, 100.0]), delta, zero, 0, 15)
    torch.testing.assert_close(out, torch.tensor([-0.5, 1.0]))


def test_ste_gradients_reach_input_step_and_zero_point():
    x = torch.tensor([-0.7, 0.02, 0.33, 5.0], requires_grad=True)   # 5.0 is clipped
    delta = torch.tensor(0.1, requires_grad=True)
    zero = torch.tensor(8.0, requires_grad=True)
    fake_quant(x, delta, zero, 0, 15).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 0.0]                 # straight through inside, zero when clipped
    assert delta.grad is not None and float(delta.grad) != 0
    assert zero.grad is not None and float(zero.grad) != 0


@pytest.mark.parametrize("bits", [1, 9, 32])
def test_bit_width_out_of_range_is_rejected(bits):
    with pytest.raises(ValueError, match="out of range: use 2..8"):
        QuantConfig(weight_bit=bits)
    with pytest.raises(ValueError, match="act_bit"):
        QuantConfig(act_bit=bits)


def test_softmax_may_use_16_bits_but_layers_may_not():
    assert QuantConfig(act_bit=4, sm_abit=16).softmax_spec().bits == 16
    with pytest.raises(ValueError):
        QuantConfig(weight_bit=16)


def test_mse_init_clips_outliers_and_beats_minmax():
    torch.manual_seed(0)
    x = torch.randn(1, 20000)
    x[0, 0] = 40.0                                                   # one outlier
    spec_mse = QuantizerSpec(4, init=RangeInit.MSE)
    lo, hi = init_range(x, spec_mse)
    assert float(hi) < 40.0
    err = {}
    for name, (l, h) in {"mse": (lo, hi), "minmax": init_range(x, QuantizerSpec(4))}.items():
        d, z = range_to_params(l, h, spec_mse)
        err[name] = float((fake_quant(x, d, z, 0, 15) - x).pow(2).sum())
    assert err["mse"] < 0.5 * err["minmax"]


def test_weight_quantizer_is_per_out_channel():
    w = torch.randn(6, 3, 3, 3) * torch.arange(1, 7).view(-1, 1, 1, 1)
    q = WeightQuantizer(6, QuantizerSpec(4))
    q.set_range(w.flatten(1).min(1).values, w.flatten(1).max(1).values)
    err = (q(w) - w).abs().flatten(1).max(1).values
    assert (err <= q.delta.detach() / 2 + 1e-6).all()
    assert q.delta[5] > 4 * q.delta[0]


def test_uncalibrated_quantizer_is_a_clear_error():
    with pytest.raises(RuntimeError, match="not calibrated"):
        WeightQuantizer(2, QuantizerSpec(4))(torch.randn(2, 3))


def tpq(schedule, lo, hi, head_layout=None):
    steps = SlotIndex(schedule)
    q = ActQuantizer(QuantizerSpec(4), steps, head_layout=head_layout)
    q.set_range(torch.tensor(lo), torch.tensor(hi))
    return steps, q


def test_tpq_mixed_batch_equals_per_step_runs():
    steps, q = tpq([0, 10, 20], [-1.0, -2.0, -4.0], [1.0, 2.0, 4.0])
    x = torch.randn(6, 3, 5) * 3
    t = torch.tensor([20, 0, 10, 10, 0, 20])
    with steps.active(steps.lookup(t)):
        mixed = q(x)
    for i in range(6):
        with steps.active(steps.lookup(t[i:i + 1])):
            torch.testing.assert_close(mixed[i:i + 1], q(x[i:i + 1]), rtol=0, atol=0)
    with steps.active(steps.lookup(t[:1])):                         # slot 2 (t=20) has the widest range
        assert (q(x[:1]) - x[:1]).abs().max() > 0


@pytest.mark.parametrize("layout", ["(b h)", "(h b)"])
def test_tpq_repeats_parameters_over_attention_heads_in_the_declared_layout(layout):
    steps, q = tpq([0, 10], [-1.0, -8.0], [1.0, 8.0], head_layout=layout)
    x = torch.randn(2 * 3, 4, 4) * 4                                # 2 samples x 3 heads, tokens, dim
    rows_of_first = slice(0, 3) if layout == "(b h)" else slice(0, None, 2)
    with steps.active(steps.lookup(torch.tensor([0, 10]))):
        out = q(x)
    with steps.active(steps.lookup(torch.tensor([0]))):
        first = q(x[rows_of_first])
    torch.testing.assert_close(out[rows_of_first], first, rtol=0, atol=0)


def test_a_layer_input_with_more_rows_than_samples_is_an_error():
    steps, q = tpq([0, 10], [-1.0, -8.0], [1.0, 8.0])               # a layer's quantizer: no head layout
    with steps.active(steps.lookup(torch.tensor([0, 10]))), pytest.raises(RuntimeError, match="one row per sample"):
        q(torch.randn(6, 4))
    with pytest.raises(ValueError, match="head_layout"):
        ActQuantizer(QuantizerSpec(4), steps, head_layout="b h")


def test_uncalibrated_timestep_is_a_clear_error():
    steps = SlotIndex([0, 10, 20])
    with pytest.raises(UncalibratedTimestepError, match="timestep\\(s\\) \\[15\\] were not calibrated"):
        steps.lookup(torch.tensor([10, 15]))


def test_temporal_quantizer_outside_a_timestep_context_is_an_error():
    _, q = tpq([0, 10], [-1.0, -1.0], [1.0, 1.0])
    with pytest.raises(RuntimeError, match="outside a timestep context"):
        q(torch.randn(2, 3))


def test_step_context_restores_previous_state():
    steps = SlotIndex([0, 10])
    with steps.active(torch.tensor([1])):
        with steps.active(torch.tensor([0])):
            pass
        assert steps.current().tolist() == [1]
    with pytest.raises(RuntimeError):
        steps.current()


def test_inference_path_computes_the_same_values_as_the_training_path():
    torch.manual_seed(0)
    x, delta, zero = torch.randn(4, 3, 5, 5) * 3, torch.rand(4, 1, 1, 1) + 0.1, torch.rand(4, 1, 1, 1) * 15
    s = torch.rand(1, 3, 1, 1) + 1
    with torch.no_grad():
        fast = fake_quant(x, delta, zero, 0, 15, s)
    slow = fake_quant(x, delta.requires_grad_(), zero, 0, 15, s)
    assert torch.equal(fast, slow.detach())


def test_repeated_timesteps_of_the_quad_schedule_share_a_slot():
    from ddim import timestep_sequence
    seq = timestep_sequence(1000, 100, "quad")
    assert len(set(seq)) < len(seq)                                   # the public definition repeats small t
    steps = SlotIndex(seq)
    assert steps.num_slots == len(set(seq))
    idx = steps.lookup(torch.tensor(seq))
    assert torch.equal(steps.schedule[idx], torch.tensor(seq))
