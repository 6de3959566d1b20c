import torch

from quant.calibrate import SlotObserver


def test_observer_keeps_a_bounded_equal_share_of_every_sample():
    """Each slot keeps about max_values values however many samples it sees, equally from each sample."""
    gen = torch.Generator().manual_seed(0)
    per_slot = torch.tensor([40, 4, 0])
    obs = SlotObserver(per_slot, max_values=100, generator=gen)
    for b in range(10):                                                  # 4 samples of slot 0 per batch
        slots = torch.tensor([0, 0, 0, 0] + ([1] if b < 4 else []))
        x = torch.arange(len(slots))[:, None, None].float() + 10 * b + torch.rand(len(slots), 8, 50, generator=gen)
        obs.update(x, slots)
    kept0, kept1 = torch.cat(obs.values[0]), torch.cat(obs.values[1])
    assert len(kept0) == 40 * 3 and len(kept1) == 4 * 25                 # ceil(100/40) and ceil(100/4) per sample
    assert not obs.values[2]
    sample_of = (kept0 - kept0.frac()).long()                            # the integer part names the sample
    ids, counts = torch.unique(sample_of, return_counts=True)
    assert len(ids) == 40 and torch.all(counts == 3)


def test_observer_keeps_every_value_of_small_tensors_and_exact_extremes():
    obs = SlotObserver(torch.tensor([2]), max_values=1000, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2 * 3, 4)                                            # 2 samples x 3 heads, [B*h, n] layout
    obs.update(x, torch.tensor([0, 0]))
    assert torch.equal(torch.sort(obs.values[0][0]).values, torch.sort(x.flatten()).values)
    assert obs.lo[0] == x.min() and obs.hi[0] == x.max()
