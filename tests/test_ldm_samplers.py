"""DDIM / PLMS / DPM-Solver as plain functions of an eps callable: exactness against closed-form data
distributions, the integer timesteps they call the network at, guidance batching, hooks, determinism, and
sample -> decode on tiny random-weight versions of every public config."""
import math

import numpy as np
import pytest
import torch

from conftest import ROOT
from ldm.modules.diffusionmodules.util import make_beta_schedule, make_ddim_timesteps
from diffusion.samplers import (SAMPLERS, ddim_sample, ddim_timesteps, dpm_solver_grid, dpm_solver_sample,
                          dpm_solver_timesteps, make_sampler)
from tools.tiny_ldm import random_weights, tiny_config
from ldm.util import instantiate_from_config, load_config

ABAR = np.cumprod(1 - make_beta_schedule("linear", 1000, 0.0015, 0.0195))
X_T = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def gaussian_eps(mu: float, s: float):
    """The exact eps of data N(mu, s^2): eps(x, t) = sigma (x - alpha mu) / (alpha^2 s^2 + sigma^2)."""
    abar = torch.tensor(ABAR)

    def eps(x, t, cond):
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        a = abar[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s * s + 1 - a)
    return eps


def ode_solution(mu: float, s: float, t_start: int, t_end: int) -> torch.Tensor:
    """Probability-flow ODE from x_T at t_start to t_end for Gaussian data: x - alpha mu scales with
    sqrt(alpha^2 s^2 + sigma^2)."""
    a0, a1 = ABAR[t_start], ABAR[t_end]
    return (math.sqrt(a1) * mu + math.sqrt(a1 * s * s + 1 - a1) / math.sqrt(a0 * s * s + 1 - a0)
            * (X_T - math.sqrt(a0) * mu))


def run(name: str, steps: int, eps_fn, **kw):
    sampler = make_sampler(name, steps, ABAR)
    return sampler, sampler.sample(eps_fn, X_T, **kw)


@pytest.mark.parametrize("name", SAMPLERS)
def test_point_mass_data_is_sampled_exactly(name):
    """With data at one point every step of every sampler is exact: the result is that point's trajectory."""
    sampler, x = run(name, 10, gaussian_eps(0.7, 0.0))
    assert torch.allclose(x, ode_solution(0.7, 0.0, sampler.timesteps[0], 0), atol=1e-9)


def test_higher_order_samplers_beat_ddim_at_20_steps():
    eps = gaussian_eps(0.7, 0.3)
    err = {}
    for name in SAMPLERS:
        sampler, x = run(name, 20, eps)
        err[name] = float((x - ode_solution(0.7, 0.3, sampler.timesteps[0], 0)).abs().max())
    assert err["plms"] < err["ddim"] / 2 and err["dpm_solver"] < err["ddim"] / 1.5
    _, x100 = run("plms", 100, eps)
    assert float((x100 - ode_solution(0.7, 0.3, 991, 0)).abs().max()) < 1e-3


def test_timesteps_are_the_integers_compvis_uses():
    assert ddim_timesteps(20)[:3] == [951, 901, 851] and ddim_timesteps(20)[-1] == 1
    assert list(make_ddim_timesteps("uniform", 50, 1000)[:2]) == [1, 21]
    assert dpm_solver_grid(20)[:3] == [999, 949, 899] and dpm_solver_grid(20)[-1] == 0
    assert len(dpm_solver_timesteps(20)) == 20 and 0 not in dpm_solver_timesteps(20)
    with pytest.raises(ValueError, match="outside"):
        make_ddim_timesteps("uniform", 1000, 1000)


@pytest.mark.parametrize("name, calls", [("ddim", 20), ("plms", 21), ("dpm_solver", 20)])
def test_network_sees_only_announced_integer_timesteps(name, calls):
    seen = []
    sampler, _ = run(name, 20, gaussian_eps(0.1, 0.5), on_step=lambda x, t, c: seen.append(t))
    assert len(seen) == calls and all(t.dtype == torch.long for t in seen)
    assert {int(t[0]) for t in seen} == set(sampler.timesteps)


def test_dpm_solver_first_step_is_a_ddim_step_between_its_integer_timesteps():
    eps = gaussian_eps(0.2, 0.4)
    grid = dpm_solver_grid(1)                            # one step: 999 -> 0, order 1
    x_dpm = dpm_solver_sample(eps, X_T, ABAR, 1)
    e = eps(X_T, torch.full((3,), grid[0]), None)
    a, a_next = ABAR[grid[0]], ABAR[grid[1]]
    x_ddim = math.sqrt(a_next) * (X_T - math.sqrt(1 - a) * e) / math.sqrt(a) + math.sqrt(1 - a_next) * e
    assert torch.allclose(x_dpm, x_ddim, atol=1e-12)


def test_guidance_is_one_call_on_the_doubled_batch():
    calls = []

    def eps(x, t, c):
        calls.append((x.shape[0], t, c))
        return x * 0 + c.view(-1, 1, 1, 1)

    cond, uncond = torch.full((3,), 2.0, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    x = ddim_sample(eps, X_T, ABAR, 2, cond=cond, uncond=uncond, scale=3.0)
    assert [n for n, _, _ in calls] == [6, 6] and torch.equal(calls[0][2], torch.cat([uncond, cond]))
    assert torch.equal(calls[0][1][:3], calls[0][1][3:])
    ref = ddim_sample(lambda x, t, c: x * 0 + 6.0, X_T, ABAR, 2)       # eps_u + 3 (eps_c - eps_u) = 6
    assert torch.allclose(x, ref)
    calls.clear()
    ddim_sample(eps, X_T, ABAR, 2, cond=cond, uncond=uncond, scale=1.0)
    assert [n for n, _, _ in calls] == [3, 3]                           # scale 1: conditional pass only


def test_ddim_eta0_is_deterministic_and_eta_noise_follows_the_generator():
    eps = gaussian_eps(0.0, 1.0)
    assert torch.equal(ddim_sample(eps, X_T, ABAR, 10), ddim_sample(eps, X_T, ABAR, 10))
    noisy = [ddim_sample(eps, X_T, ABAR, 10, eta=1.0, generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(noisy[0], noisy[1]) and not torch.equal(noisy[0], noisy[2])
    with pytest.raises(ValueError, match="eta"):
        make_sampler("plms", 10, ABAR, eta=0.5)


CONFIGS = ["latent-diffusion/lsun_bedrooms-ldm-vq-4", "latent-diffusion/lsun_churches-ldm-kl-8",
           "latent-diffusion/cin256-v2", "stable-diffusion/v1-inference"]


def conditioning(model, cfg, n: int):
    """(cond, uncond) for n samples: class labels (null class n_classes - 1), token ids, or none."""
    target = cfg["model"]["params"]["cond_stage_config"]
    if model.conditioning_key is None:
        return None, None
    if target["target"].endswith("ClassEmbedder"):
        null = model.cond_stage_model.embedding.num_embeddings - 1
        labels = {"class_label": torch.arange(n)}
        return (model.get_learned_conditioning(labels),
                model.get_learned_conditioning({"class_label": torch.full((n,), null)}))
    tokens = torch.randint(0, 998, (n, 77), generator=torch.Generator().manual_seed(0))
    return model.get_learned_conditioning(tokens), model.get_learned_conditioning(torch.zeros_like(tokens))


@pytest.mark.parametrize("path", CONFIGS)
def test_tiny_public_configs_sample_and_decode_with_every_sampler(path):
    cfg = tiny_config(load_config(ROOT / "configs" / f"{path}.yaml"))
    torch.manual_seed(0)
    model = random_weights(instantiate_from_config(cfg["model"])).eval()
    size, f = model.image_size, 2 ** (len(cfg["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["ch_mult"]) - 1)
    x_T = torch.randn(2, model.channels, size, size, generator=torch.Generator().manual_seed(0))
    cond, uncond = conditioning(model, cfg, 2)
    for name in SAMPLERS:
        sampler = make_sampler(name, 4, model.alphas_cumprod)
        for scale in ((1.0, 3.0) if uncond is not None else (1.0,)):
            seen = []
            z = sampler.sample(model.apply_model, x_T, cond=cond, uncond=uncond, scale=scale,
                               on_step=lambda x, t, c: seen.append(x.shape[0]))
            image = model.decode_first_stage(z)
            assert image.shape == (2, 3, size * f, size * f) and torch.isfinite(image).all()
            assert set(seen) == {2 if scale == 1.0 else 4}
