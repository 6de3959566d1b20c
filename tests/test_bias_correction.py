"""Per-timestep eps corrections (quant/bias_correction.py): the mean (--eps_correction) and the scale
(--eps_rescale)."""
import pytest
import torch

from conftest import BETAS, TINY_SEQ
from ddim import ddim_sample
from quant.bias_correction import correct_eps_bias, correct_eps_gain, estimate_eps_bias, estimate_eps_gain
from quant.calib_data import CalibSet
from quant.calibrate import calibrate
from quant.checkpoint import load_quantized, save_quantized
from quant.model import QuantModel
from quant.settings import QuantConfig
from quant.slots import UncalibratedTimestepError


def sampler(model, x_T, generator=None):
    return ddim_sample(model, x_T, TINY_SEQ, BETAS, generator=generator)


def w8_with_offset(tiny_unet, offset: float) -> QuantModel:
    """W8 weights, FP activations, conv_out's bias moved by `offset`: eps_q ≈ eps_fp + offset."""
    q = calibrate(QuantModel(tiny_unet, QuantConfig(weight_bit=8)), None)
    with torch.no_grad():
        q.model.conv_out.bias += offset
    return q


def test_estimated_bias_recovers_a_constant_offset_at_every_step(tiny_unet):
    q = w8_with_offset(tiny_unet, 0.05)
    x_T = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    steps, bias = estimate_eps_bias(q, tiny_unet, sampler, x_T, batch_size=4)
    assert steps.tolist() == sorted(set(TINY_SEQ)) and bias.shape == (len(steps), 1)
    assert torch.allclose(bias, torch.full_like(bias, 0.05), atol=5e-3)       # W8 weight noise aside


def test_corrected_model_is_unbiased_and_its_trajectories_follow_fp(tiny_unet):
    q = w8_with_offset(tiny_unet, 0.05)
    x_T = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    fp_x0 = sampler(tiny_unet, x_T)
    before = (sampler(q, x_T) - fp_x0).abs().mean()
    stats = correct_eps_bias(q, tiny_unet, sampler, torch.randn(6, 1, 16, 16), batch_size=6)
    after = (sampler(q, x_T) - fp_x0).abs().mean()                          # other noise than the estimate's
    assert stats["eps_correction_trajectories"] == 6
    assert after < 0.2 * before
    x, t = torch.randn(4, 1, 16, 16), torch.full((4,), TINY_SEQ[2])
    with torch.no_grad():
        assert torch.allclose(q.raw_eps(x, t) - q(x, t), q.eps_bias[q._bias_index.lookup(t)].view(4, 1, 1, 1))
        assert abs(float((q(x, t) - tiny_unet(x, t)).mean())) < 5e-3


def test_corrected_model_refuses_a_timestep_it_was_not_estimated_for(tiny_unet):
    q = w8_with_offset(tiny_unet, 0.0)
    q.set_eps_bias(torch.tensor([999, 0]), torch.zeros(2, 1))
    with pytest.raises(UncalibratedTimestepError, match="not calibrated"):
        q(torch.zeros(1, 1, 16, 16), torch.tensor([500]))


def test_correction_survives_save_and_load(tiny_unet, tmp_path):
    q = w8_with_offset(tiny_unet, 0.05)
    correct_eps_bias(q, tiny_unet, sampler, torch.randn(3, 1, 16, 16), batch_size=3)
    save_quantized(tmp_path / "q.pt", q, "baseline")
    back, _ = load_quantized(tmp_path / "q.pt", tiny_unet)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([TINY_SEQ[0], TINY_SEQ[-1]])
    with torch.no_grad():
        assert torch.equal(back(x, t), q(x, t)) and torch.equal(back.eps_bias, q.eps_bias)


def test_bad_bias_shapes_are_refused(tiny_unet):
    q = w8_with_offset(tiny_unet, 0.0)
    with pytest.raises(ValueError, match="distinct timesteps"):
        q.set_eps_bias(torch.tensor([1, 1]), torch.zeros(2, 1))


def w8_scaled(tiny_unet, factor: float) -> QuantModel:
    """W8 weights, FP activations, conv_out's weight and bias times `factor`: eps_q ≈ factor * eps_fp."""
    q = calibrate(QuantModel(tiny_unet, QuantConfig(weight_bit=8)), None)
    with torch.no_grad():
        q.model.conv_out.weight *= factor
        q.model.conv_out.bias *= factor
        q.model.conv_out.w_quant.delta *= factor
    return q


def calib_over(timesteps, per_step: int = 3) -> CalibSet:
    t = torch.tensor(timesteps).repeat_interleave(per_step)
    return CalibSet(torch.randn(len(t), 1, 16, 16, generator=torch.Generator().manual_seed(2)), t)


def test_estimated_gain_undoes_a_shrunk_output_at_every_step(tiny_unet):
    q = w8_scaled(tiny_unet, 0.8)
    steps, gain = estimate_eps_gain(q, tiny_unet, calib_over(sorted(set(TINY_SEQ))), TINY_SEQ, batch_size=5)
    assert steps.tolist() == sorted(set(TINY_SEQ)) and gain.shape == steps.shape
    assert torch.allclose(gain, torch.full_like(gain, 1 / 0.8), rtol=1e-2)     # W8 weight noise aside
    stats = correct_eps_gain(q, tiny_unet, calib_over(sorted(set(TINY_SEQ))), TINY_SEQ, batch_size=5)
    assert abs(stats["eps_gain_median"] - 1 / 0.8) < 1e-2
    x, t = torch.randn(4, 1, 16, 16), torch.full((4,), TINY_SEQ[1])
    with torch.no_grad():
        before = (q.raw_eps(x, t) - tiny_unet(x, t)).abs().mean()
        after = (q(x, t) - tiny_unet(x, t)).abs().mean()
    assert after < 0.1 * before


def test_gain_needs_every_step_and_survives_save_and_load(tiny_unet, tmp_path):
    q = w8_scaled(tiny_unet, 0.9)
    with pytest.raises(ValueError, match="no sample at timesteps"):
        estimate_eps_gain(q, tiny_unet, calib_over(sorted(set(TINY_SEQ))[1:]), TINY_SEQ, batch_size=5)
    correct_eps_gain(q, tiny_unet, calib_over(sorted(set(TINY_SEQ))), TINY_SEQ, batch_size=5)
    with pytest.raises(UncalibratedTimestepError, match="not calibrated"):
        q.check_timesteps([TINY_SEQ[0], 500])
    save_quantized(tmp_path / "q.pt", q, "baseline+rescale")
    back, _ = load_quantized(tmp_path / "q.pt", tiny_unet)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([TINY_SEQ[0], TINY_SEQ[-1]])
    with torch.no_grad():
        assert torch.equal(back(x, t), q(x, t)) and torch.equal(back.eps_gain, q.eps_gain)
