"""Timestep samplers for training (ldm/timestep_sampler.py): uniform and loss-second-moment importance."""
import pytest
import torch

from ldm.timestep_sampler import LossSecondMomentSampler, UniformTimestepSampler


def test_uniform_sampler():
    sampler = UniformTimestepSampler(50)
    t, w = sampler.sample(4000, "cpu", torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 49 and torch.equal(w, torch.ones(4000))
    assert torch.bincount(t, minlength=50).min() > 40


def warm_sampler(num_timesteps=20, seed=0):
    sampler = LossSecondMomentSampler(num_timesteps)
    g = torch.Generator().manual_seed(seed)
    while not sampler.warmed_up:
        t, _ = sampler.sample(16, "cpu", g)
        # loss grows with t: the last quarter of the steps is 10x as lossy
        sampler.update(t, torch.where(t >= 15, 10.0, 1.0) * (1 + 0.1 * torch.rand(16, generator=g)))
    return sampler


def test_importance_sampler_prefers_high_loss_t():
    cold = LossSecondMomentSampler(20)
    torch.testing.assert_close(cold.probabilities(), torch.full((20,), 1 / 20, dtype=torch.float64))

    # p(t) and the weights in numbers: tests/test_hand_worked_weights.py.
    t, w = warm_sampler().sample(5000, "cpu", torch.Generator().manual_seed(1))
    assert (t >= 15).float().mean() > 0.6  # 5 of 20 steps, about 2/3 of the mass
    assert w[t >= 15].max() < 1 < w[t < 15].min()  # the over-drawn steps weigh less: the loss stays unbiased
    assert abs(w.mean().item() - 1) < 0.05  # E[1 / (N p(t))] = 1 under p


def test_importance_sampler_state_round_trip(tmp_path):
    sampler = warm_sampler()
    torch.save(sampler.state_dict(), tmp_path / "sampler.pt")
    restored = LossSecondMomentSampler(20)
    restored.load_state_dict(torch.load(tmp_path / "sampler.pt", weights_only=True))
    sampler.update(torch.tensor([0]), torch.tensor([1000.0]))  # the saved copy must not change
    restored_again = LossSecondMomentSampler(20)
    restored_again.load_state_dict(torch.load(tmp_path / "sampler.pt", weights_only=True))
    a = restored.sample(64, "cpu", torch.Generator().manual_seed(3))
    b = restored_again.sample(64, "cpu", torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(sampler.history, restored.history)
    with pytest.raises(ValueError, match="history"):
        LossSecondMomentSampler(30).load_state_dict(restored.state_dict())
