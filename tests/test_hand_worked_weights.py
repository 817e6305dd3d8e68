"""Loss weights with hand-worked expected numbers (not re-derived with the implementation's formula):
min-SNR-gamma through `ldm.diffusion.min_snr_weight`, and the importance sampler's p(t) and weights."""
from __future__ import annotations

import pytest
import torch

from ldm.diffusion import min_snr_weight
from ldm.timestep_sampler import LossSecondMomentSampler

SNR = [0.0, 0.01, 1.0, 5.0, 20.0, 1000.0]


@pytest.mark.parametrize("parameterization, expected", [
    # gamma = 5. x0 space: min(SNR, 5).
    ("x0", [0.0, 0.01, 1.0, 5.0, 5.0, 5.0]),
    # eps space: min(SNR, 5) / SNR, 1 at SNR = 0 (zero terminal SNR) and below 5, then 5/20, 5/1000.
    ("eps", [1.0, 1.0, 1.0, 1.0, 0.25, 0.005]),
    # v space: min(SNR, 5) / (SNR + 1): 0, 0.01/1.01, 1/2, 5/6, 5/21, 5/1001.
    ("v", [0.0, 0.01 / 1.01, 0.5, 5 / 6, 5 / 21, 5 / 1001]),
])
def test_min_snr_weight_hand_worked(parameterization, expected):
    got = min_snr_weight(torch.tensor(SNR, dtype=torch.float64), 5.0, parameterization)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-15)


def test_min_snr_v_variants_hand_worked():
    snr = torch.tensor(SNR, dtype=torch.float64)
    # diffusers' v reading, min(SNR + 1, 5) / (SNR + 1): 1 up to SNR 4, then 5/6, 5/21, 5/1001.
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "v", "plus-one"),
                               torch.tensor([1.0, 1.0, 1.0, 5 / 6, 5 / 21, 5 / 1001], dtype=torch.float64))
    # A floor of 0.1 lifts the paper's 0, 0.0099 and 5/1001 only.
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "v", floor=0.1),
                               torch.tensor([0.1, 0.1, 0.5, 5 / 6, 5 / 21, 0.1], dtype=torch.float64))
    with pytest.raises(ValueError, match="^min_snr_variant 'plus-one' is for v prediction, not 'eps'$"):
        min_snr_weight(snr, 5.0, "eps", "plus-one")
    with pytest.raises(ValueError, match="^min_snr_floor must be in \\[0, 1\\], got 2"):
        min_snr_weight(snr, 5.0, "v", floor=2.0)


def test_diffusion_trains_with_the_configured_min_snr_form():
    from ldm.diffusion import Diffusion, DiffusionConfig
    from ldm.schedule import NoiseSchedule, ScheduleConfig

    schedule = NoiseSchedule.from_config(ScheduleConfig(num_timesteps=10, zero_terminal_snr=True))
    x0, t = torch.ones(2, 1, 2, 2), torch.tensor([9, 9])  # the zero-SNR step
    for variant, floor, expected in (("paper", 0.0, 0.0), ("plus-one", 0.0, 1.0), ("paper", 0.25, 0.25)):
        config = DiffusionConfig(parameterization="v", min_snr_gamma=5.0, min_snr_variant=variant, min_snr_floor=floor)
        diffusion = Diffusion(schedule, **{k: v for k, v in vars(config).items() if k != "schedule"})
        terms = diffusion.training_losses(lambda x, t: torch.zeros_like(x), x0, t=t, noise=torch.zeros_like(x0))
        torch.testing.assert_close(terms["loss"], expected * terms["mse"])  # mse = |v|^2 = 1 at t = T-1
        assert terms["mse"].min() > 0.5


def _sampler_with(histories: dict[int, list[float]]) -> LossSecondMomentSampler:
    sampler = LossSecondMomentSampler(4, history_per_term=3, uniform_prob=0.2)
    for t, losses in histories.items():
        for loss in losses:
            sampler.update(torch.tensor([t]), torch.tensor([loss]))
    return sampler


def test_importance_sampler_probabilities_hand_worked():
    # Loss histories per t (3 kept): rms(1, 1, 1) = 1, rms(1, 5, 7) = sqrt(75 / 3) = 5, rms(2, 2, 2) = 2,
    # rms(2, 10, 14) = sqrt(300 / 3) = 10; sum 18.
    # p(t) = 0.8 * rms / 18 + 0.2 / 4:  0.8/18 + 0.05, 4/18 + 0.05, 1.6/18 + 0.05, 8/18 + 0.05.
    sampler = _sampler_with({0: [1, 1, 1], 1: [1, 5, 7], 2: [2, 2, 2], 3: [2, 10, 14]})
    expected = torch.tensor([0.8 / 18 + 0.05, 4 / 18 + 0.05, 1.6 / 18 + 0.05, 8 / 18 + 0.05], dtype=torch.float64)
    torch.testing.assert_close(sampler.probabilities(), expected, rtol=1e-12, atol=0)
    # Each draw's weight is 1 / (4 p(t)): 1 / (4 * 0.09444...) = 2.647..., etc.
    t, w = sampler.sample(256, "cpu", torch.Generator().manual_seed(0))
    assert set(t.tolist()) == {0, 1, 2, 3}
    torch.testing.assert_close(w, (1 / (4 * expected))[t].float())
    # A new loss pushes the oldest out: t = 1 keeps (5, 7, 13), rms sqrt(243 / 3) = 9; the sum becomes 22.
    sampler.update(torch.tensor([1]), torch.tensor([13.0]))
    assert float(sampler.probabilities()[1]) == pytest.approx(0.8 * 9 / 22 + 0.05, rel=1e-12)
    assert float(sampler.probabilities()[3]) == pytest.approx(0.8 * 10 / 22 + 0.05, rel=1e-12)


def test_importance_sampler_is_uniform_until_every_t_has_a_full_history():
    sampler = _sampler_with({0: [1, 1, 1], 1: [1, 5, 7], 2: [2, 2, 2], 3: [2, 10]})
    torch.testing.assert_close(sampler.probabilities(), torch.full((4,), 0.25, dtype=torch.float64))
    _, w = sampler.sample(8, "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(w, torch.ones(8))
