"""Training of the embedded LDM: resumable stages (same result whether interrupted or not), and one step of
each stage on the real config with a handful of digits."""
import torch
import torch.nn as nn

from conftest import ROOT
from ldm.train import StageConfig, autoencoder_loss, diffusion_loss, run_stage, train_first_stage
from ldm.util import instantiate_from_config, load_config


def test_interrupted_stage_resumes_to_the_same_weights(tmp_path):
    def stage(state: str, stop_at: int | None = None) -> tuple[nn.Module, int]:
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        x = torch.randn(16, 3)
        loss = lambda gen: model(x[torch.randint(0, 16, (4,), generator=gen)]).pow(2).mean()
        cfg = StageConfig(steps=8, batch_size=4, warmup=2, save_every=1, stop_at=stop_at)
        return run_stage(model, loss, cfg, tmp_path / state, "t")
    straight, n = stage("a.pt")
    assert stage("b.pt", stop_at=5)[1] == 5                      # stopped early on the 8-step schedule
    resumed, m = stage("b.pt")
    assert n == m == 8 and torch.equal(straight.weight, resumed.weight)


def test_one_step_of_each_stage_on_the_embedded_config(tmp_path):
    config = load_config(ROOT / "configs" / "latent-diffusion" / "mnist-ldm-kl-4.yaml")
    images = torch.rand(8, 1, 32, 32) * 2 - 1
    ae, info = train_first_stage(config, images, StageConfig(steps=1, batch_size=2, warmup=1), tmp_path)
    assert info["steps"] == 1 and (tmp_path / "ae_done.json").exists()
    assert train_first_stage(config, images, StageConfig(steps=5, batch_size=2), tmp_path)[1] == info  # reused
    ldm = instantiate_from_config(config["model"])
    loss = diffusion_loss(ldm, torch.randn(8, 4, 8, 8), torch.zeros(8, 4, 8, 8), torch.arange(8), 2,
                          null_class=10, p_uncond=0.5)
    value = loss(torch.Generator().manual_seed(0))
    value.backward()
    assert torch.isfinite(value) and ldm.cond_stage_model.embedding.weight.grad is not None
    assert all(p.grad is None for p in ldm.first_stage_model.parameters())
    assert torch.isfinite(autoencoder_loss(ae, images, 2, 1e-6)(torch.Generator().manual_seed(0)))
