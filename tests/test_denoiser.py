"""The denoiser's view of a schedule: output conversions, noise levels, timestep and sigma spacings."""
import math

import pytest
import torch
from sampling_helpers import T, alpha_at

from ldm.denoiser import NoiseLevels, karras_sigmas, make_sigmas, make_timesteps
from ldm.diffusion import predict_eps, predict_x0
from ldm.parameterization import parameterization as kind
from ldm.schedule import NoiseSchedule, make_betas


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_conversions_match_diffusion(schedule, parameterization):
    g = torch.Generator().manual_seed(0)
    x_t, out = torch.randn(2, 4, 3, 3, 5, generator=g).unbind(0)
    t = torch.tensor([0, 17, 500, 999])
    a = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    eps, x0 = kind(parameterization).to_eps_x0(out, x_t, a)
    torch.testing.assert_close(eps, predict_eps(schedule, x_t, t, out, parameterization), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x0, predict_x0(schedule, x_t, t, out, parameterization), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kind(parameterization).from_eps_x0(eps, x0, a), out, rtol=1e-4, atol=1e-4)


def test_noise_levels(schedule):
    levels = NoiseLevels(schedule)
    t = torch.tensor([0.0, 0.25, 3.5, 500.0, 998.75, 999.0])
    torch.testing.assert_close(levels.sigma_to_t(levels.t_to_sigma(t)), t.double(), atol=1e-6, rtol=0)
    assert levels.t_to_sigma(torch.tensor(500.0)).item() == pytest.approx(schedule.sigmas[500].item(), rel=1e-6)
    assert levels.alpha_bar(981).item() == schedule.alphas_cumprod[981].item()
    mid = levels.t_to_sigma(torch.tensor(10.5)).item()
    assert mid == pytest.approx(math.sqrt(schedule.sigmas[10].item() * schedule.sigmas[11].item()), rel=1e-5)
    torch.testing.assert_close(levels.alpha_bar(torch.tensor(10.5)), alpha_at(schedule, torch.tensor(10.5)))
    assert levels.sigma_to_t(1e-9).item() == 0 and levels.sigma_to_t(1e9).item() == T - 1


def test_zero_terminal_snr_levels_are_finite():
    from ldm.schedule import rescale_zero_terminal_snr

    levels = NoiseLevels(NoiseSchedule(rescale_zero_terminal_snr(make_betas("ldm-linear"))))
    assert levels.sigma_max == 4096.0 and math.isfinite(levels.log_sigmas[-1].item())
    assert levels.alpha_bar(999).item() == 0.0


def test_timestep_spacings():
    assert make_timesteps(T, 50, "uniform") == list(range(981, 0, -20))  # LDM: 981 .. 1
    assert make_timesteps(T, 50, "leading") == list(range(980, -1, -20))
    assert make_timesteps(T, 50, "trailing") == list(range(999, 0, -20))  # 999 .. 19
    assert make_timesteps(T, 4, "linspace") == [999, 666, 333, 0]
    # As LDM's make_ddim_timesteps: every multiple of T // S below T, so 31 steps for 30 of 1000.
    assert make_timesteps(T, 30, "uniform") == list(range(991, 0, -33))
    assert make_timesteps(T, 7, "uniform") == [995, 853, 711, 569, 427, 285, 143, 1]
    assert len(make_timesteps(T, 30, "leading")) == 30
    assert make_timesteps(T, T, "linspace") == list(range(T - 1, -1, -1))
    assert make_timesteps(T, 3, "uniform") == [667, 334, 1]  # LDM's 1000 would index past the table
    assert make_timesteps(T, T, "uniform") == list(range(T - 1, 0, -1))
    with pytest.raises(ValueError, match="steps must lie"):
        make_timesteps(T, 0)
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        make_timesteps(T, 10, "cosine")


def test_karras_sigmas(schedule):
    sigmas = karras_sigmas(0.03, 14.6, 10)
    assert sigmas[0].item() == pytest.approx(14.6) and sigmas[-2].item() == pytest.approx(0.03) and sigmas[-1] == 0
    ramp = sigmas[:-1] ** (1 / 7)
    torch.testing.assert_close(ramp.diff(), torch.full((9,), ramp.diff()[0].item(), dtype=torch.float64))
    levels = NoiseLevels(schedule)
    assert make_sigmas(levels, 10)[0].item() == pytest.approx(levels.sigma_max)
    torch.testing.assert_close(make_sigmas(levels, 5, "trailing")[:-1], levels.sigmas[[999, 799, 599, 399, 199]])
    with pytest.raises(ValueError, match="unknown sigma spacing"):
        make_sigmas(levels, 10, "cosine")
