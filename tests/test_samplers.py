import numpy as np
import pytest
import torch

from ddim import DiffusionConfig, ddim_sample, ddpm_sample, make_betas, timestep_sequence
from ddim.schedule import alphas_cumprod

BETAS = make_betas(DiffusionConfig())


def test_uniform_sequence_definition():
    assert timestep_sequence(1000, 100, "uniform") == list(range(0, 1000, 10))
    assert timestep_sequence(1000, 3, "uniform") == [0, 333, 666, 999]


def test_quad_sequence_definition():
    seq = timestep_sequence(1000, 100, "quad")
    assert len(seq) == 100 and seq[0] == 0 and seq[-1] == 800
    assert seq == [int(s) for s in np.linspace(0, np.sqrt(800), 100) ** 2]
    assert all(b >= a for a, b in zip(seq, seq[1:]))


def test_bad_sequence_settings():
    with pytest.raises(ValueError, match="skip_type"):
        timestep_sequence(1000, 10, "cubic")
    with pytest.raises(ValueError, match="steps"):
        timestep_sequence(1000, 0, "uniform")


def test_linear_betas():
    assert BETAS.shape == (1000,) and float(BETAS[0]) == pytest.approx(1e-4) and float(BETAS[-1]) == pytest.approx(0.02)


def oracle(x0: torch.Tensor):
    """eps-model that knows the clean image: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
    abar = alphas_cumprod(BETAS)

    def model(x, t):
        a = abar[t].float().view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()
    return model


@pytest.mark.parametrize("skip_type", ["uniform", "quad"])
def test_ddim_with_exact_eps_returns_x0(skip_type):
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    seq = timestep_sequence(1000, 20, skip_type)
    out = ddim_sample(oracle(x0), torch.randn(4, 1, 8, 8), seq, BETAS, eta=0.0)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


def test_ddpm_with_exact_eps_returns_x0():
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    out = ddpm_sample(oracle(x0), torch.randn(4, 1, 8, 8), timestep_sequence(1000, 50, "uniform"), BETAS,
                      generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


def test_ddim_eta0_is_deterministic_and_eta_uses_generator(tiny_unet):
    seq = timestep_sequence(1000, 5, "uniform")
    x = torch.randn(2, 1, 16, 16)
    a = ddim_sample(tiny_unet, x, seq, BETAS, eta=0.0)
    b = ddim_sample(tiny_unet, x, seq, BETAS, eta=0.0)
    assert torch.equal(a, b)
    c = ddim_sample(tiny_unet, x, seq, BETAS, eta=1.0, generator=torch.Generator().manual_seed(1))
    d = ddim_sample(tiny_unet, x, seq, BETAS, eta=1.0, generator=torch.Generator().manual_seed(1))
    e = ddim_sample(tiny_unet, x, seq, BETAS, eta=1.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(c, d) and not torch.equal(c, e) and not torch.equal(a, c)


def test_on_step_sees_every_network_call(tiny_unet):
    seen = []
    seq = timestep_sequence(1000, 7, "quad")
    ddim_sample(tiny_unet, torch.randn(2, 1, 16, 16), seq, BETAS, on_step=lambda x, t: seen.append(int(t[0])))
    assert seen == list(reversed(seq))


def test_interrupted_generation_resumes_to_the_same_images(tiny_unet, tmp_path):
    from ddim.sampling import generate, make_sampler
    sample = make_sampler(BETAS, 3, "uniform", eta=0.5)          # eta > 0: sampler noise must resume too
    shape = (tiny_unet.cfg.in_channels, tiny_unet.cfg.resolution, tiny_unet.cfg.resolution)
    whole, _ = generate(tiny_unet, sample, 6, shape, 2, 0, torch.device("cpu"))
    calls = []

    def dies_in_second_batch(x, t):
        calls.append(len(x))
        if len(calls) == len(sample.seq) + 1:                        # first call of the second batch
            raise KeyboardInterrupt
        return tiny_unet(x, t)

    with pytest.raises(KeyboardInterrupt):
        generate(dies_in_second_batch, sample, 6, shape, 2, 0, torch.device("cpu"), cache=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["batch_0000.npz"]
    resumed_calls = []

    def counted(x, t):
        resumed_calls.append(len(x))
        return tiny_unet(x, t)

    resumed, seconds = generate(counted, sample, 6, shape, 2, 0, torch.device("cpu"), cache=tmp_path)
    assert np.array_equal(resumed, whole) and seconds > 0
    assert len(resumed_calls) == 2 * len(sample.seq)                 # batch 0 came from the cache
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"batch_{b:04d}.npz" for b in range(3)]


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (4, 8, 8)])
def test_an_images_noise_depends_only_on_the_seed_and_its_index(shape):
    """The first k images of an n-image draw are the k-image draw (torch fills normals 16 at a time, so this
    holds for images of a multiple of 16 values, which every model here has): shards and reruns of other
    sizes see the same noise per image."""
    from diffusion.sampling import initial_noise
    full = initial_noise(300, shape, seed=5)
    for k in (1, 7, 250):
        assert torch.equal(initial_noise(k, shape, seed=5), full[:k])


def test_any_subset_of_batches_gives_the_same_images(tiny_unet):
    from ddim.sampling import make_sampler, sample_batches
    sample = make_sampler(make_betas(DiffusionConfig()), 3, "quad", eta=1.0)
    every = sample_batches(tiny_unet, sample, 10, (1, 16, 16), 4, seed=2, device=torch.device("cpu"), progress=False)
    odd = sample_batches(tiny_unet, sample, 10, (1, 16, 16), 4, seed=2, device=torch.device("cpu"), batches=[1],
                         progress=False)
    assert list(every) == [0, 1, 2] and list(odd) == [1]
    assert np.array_equal(every[1][0], odd[1][0])


@pytest.mark.parametrize("sampler", ["plms", "dpm"])
def test_ddim_models_sample_with_plms_and_dpm_solver_quantized_at_their_timesteps(tiny_task, tmp_path, sampler):
    from conftest import run
    from ddim import load_config
    from ddim.sampling import make_sampler
    rec = run(tiny_task, tmp_path / sampler, "--sampler", sampler, "--ptq", "--quant_mode", "dilatequant",
              "--weight_bit", "8", "--quant_act", "--act_bit", "8", "--cali_n", "16", "--cali_iters", "1",
              "--distill_batch_size", "4", "--no_fid")
    assert rec["sampler"] == sampler and rec["method"] == "dilatequant"
    cfg = load_config(tiny_task / "tiny.yml")
    expected = make_sampler(make_betas(cfg.diffusion), 4, "quad", 0.0, sampler=sampler)
    saved = torch.load(tmp_path / sampler / "quantized.pt", weights_only=False)
    assert sorted(saved["schedule"]) == expected.seq                      # a TPQ slot per timestep it calls
    assert expected.calls == 4 + (sampler == "plms")                     # PLMS's first step calls twice
    images = np.load(tmp_path / sampler / "samples.npz")["arr_0"]
    assert images.shape == (12, 28, 28, 1) and images.std() > 0


def test_plms_and_dpm_on_a_ddim_model_refuse_eta(tiny_task, tmp_path):
    from common.errors import UsageError
    from conftest import run
    with pytest.raises(UsageError, match="--sampler plms is deterministic"):
        run(tiny_task, tmp_path / "x", "--sampler", "plms", "--eta", "0.5", "--no_fid")
