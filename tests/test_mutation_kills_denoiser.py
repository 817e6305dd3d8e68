"""Denoiser behaviour the mutation run (make mutation) found untested: `Denoiser` against a network that
knows x0 (closed-form eps / x0 / v outputs), `make_sigmas` against EDM's formula and at one step,
`make_timesteps` at one step and for long schedules, `final_alphas`, and the spacing errors' messages."""
import math

import pytest
import torch
from sampling_helpers import alpha_at

from ldm.denoiser import Denoiser, NoiseLevels, final_alphas, make_sigmas, make_timesteps
from ldm.diffusion import Diffusion

T = 1000


def oracle(schedule, x0, kind, calls, extra_channels=False):
    """A network that outputs the exact eps / x0 / v of x_t for the known x0 at integer timesteps t."""
    table = schedule.alphas_cumprod.double()

    def model_fn(x_t, t):
        calls.append(t.clone())
        a = table[t.round().long()].view(-1, 1, 1, 1)
        eps = (x_t.double() - a.sqrt() * x0) / (1 - a).sqrt()
        out = {"eps": eps, "x0": x0.expand_as(eps), "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[kind].float()
        return torch.cat([out, torch.full_like(out, 1e3)], dim=1) if extra_channels else out

    return model_fn


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_denoiser_recovers_eps_and_x0_from_an_exact_network(schedule, kind, learn_sigma):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g).double(), torch.randn(2, 3, 4, 4, generator=g).double()
    calls = []
    denoiser = Denoiser(oracle(schedule, x0, kind, calls, learn_sigma),
                        Diffusion(schedule, parameterization=kind, learn_sigma=learn_sigma))
    a = schedule.alphas_cumprod.double()[500]
    x_t = (a.sqrt() * x0 + (1 - a).sqrt() * eps).float()
    eps_hat, x0_hat = denoiser.predict(x_t, 500)
    torch.testing.assert_close(eps_hat.double(), eps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x0_hat.double(), x0, rtol=1e-4, atol=1e-4)
    assert calls[-1].tolist() == [500.0, 500.0] and calls[-1].dtype == torch.float32
    # the variance-exploding view: x = x_t / sqrt(a) at sigma = sqrt((1 - a) / a) gives the same x0
    sigma = float(((1 - a) / a).sqrt())
    x0_ve = denoiser.denoise(x_t / a.sqrt().float(), sigma)
    torch.testing.assert_close(x0_ve.double(), x0, rtol=1e-3, atol=1e-3)
    assert calls[-1].tolist() == pytest.approx([500.0, 500.0], abs=1e-3)


def test_output_is_the_raw_network_output_at_a_shared_timestep(schedule):
    seen = []
    denoiser = Denoiser(lambda x, t: seen.append(t) or x * 2, Diffusion(schedule))
    x = torch.ones(3, 2, 2, 2)
    assert torch.equal(denoiser.output(x, 7), x * 2)
    assert seen[0].shape == (3,) and seen[0].tolist() == [7.0, 7.0, 7.0]


def test_make_sigmas_karras_is_edm_eq5_with_its_rho(schedule):
    levels = NoiseLevels(schedule)
    lo, hi = levels.sigma_min, levels.sigma_max
    for rho, sigmas in ((7.0, make_sigmas(levels, 6)), (3.0, make_sigmas(levels, 6, rho=3.0))):
        expected = [(hi ** (1 / rho) + i / 5 * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for i in range(6)] + [0.0]
        assert sigmas.tolist() == pytest.approx(expected, rel=1e-9), rho


def test_make_sigmas_one_step_and_errors(schedule):
    levels = NoiseLevels(schedule)
    one = make_sigmas(levels, 1)
    assert one.dtype == torch.float64 and one.tolist() == [levels.sigma_max, 0.0]
    assert make_sigmas(levels, 2).tolist() == pytest.approx([levels.sigma_max, levels.sigma_min, 0.0])
    with pytest.raises(ValueError, match="^steps must be positive, got 0$"):
        make_sigmas(levels, 0)
    with pytest.raises(ValueError, match=r"\(expected one of karras, uniform, leading, trailing, linspace\)$"):
        make_sigmas(levels, 10, "cosine")


def test_make_timesteps_defaults_single_steps_and_messages():
    assert make_timesteps(T, 50) == list(range(981, 0, -20))  # "uniform" is the default
    # one step: every spacing's own rule (linspace must start from noise, not from t = 0)
    assert [make_timesteps(T, 1, s) for s in ("uniform", "leading", "trailing", "linspace")] == [[1], [0], [999], [999]]
    assert make_timesteps(T, 2, "linspace") == [999, 0]
    with pytest.raises(ValueError, match=r"^steps must lie in \[1, 1000\], got 1001$"):
        make_timesteps(T, T + 1)
    with pytest.raises(ValueError, match=r"\(expected one of uniform, leading, trailing, linspace\)$"):
        make_timesteps(T, 10, "cosine")


def test_linspace_keeps_both_ends_of_a_long_schedule():
    """Past 2^24 steps float32 cannot hold T - 1: the spacing must be computed in float64."""
    assert make_timesteps(10**8, 3, "linspace") == [10**8 - 1, 50_000_000, 0]


def test_final_alphas_end_at_the_first_level_not_one(schedule):
    table = schedule.alphas_cumprod.double()
    got = final_alphas(NoiseLevels(schedule), [999, 500, 1])
    assert got == pytest.approx([float(table[999]), float(table[500]), float(table[1]), float(table[0])], rel=1e-12)
    assert got[-1] < 1.0


def test_denoise_is_the_gaussian_posterior_mean_in_the_variance_exploding_state(schedule):
    """Data N(0, c): the exact eps network gives D(x, sigma) = c / (c + sigma^2) x for x = x0 + sigma eps."""
    c = 0.6

    def eps_network(x_t, t):
        a = alpha_at(schedule, t).view(-1, 1, 1, 1)
        x0 = a.sqrt() * c / (a * c + 1 - a) * x_t.double()
        return ((x_t.double() - a.sqrt() * x0) / (1 - a).sqrt()).float()

    denoiser = Denoiser(eps_network, Diffusion(schedule))
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    for t in (50, 300, 800):
        sigma = float(schedule.sigmas[t])
        torch.testing.assert_close(denoiser.denoise(x, sigma), c / (c + sigma**2) * x, rtol=1e-4, atol=1e-5)


def test_output_gives_the_network_timesteps_on_the_state_device(schedule):
    seen = []
    denoiser = Denoiser(lambda x, t: seen.append(t) or x, Diffusion(schedule))
    denoiser.output(torch.zeros(2, 1, device="meta"), 5)  # meta stands in for an accelerator
    assert seen[0].device.type == "meta"


def test_levels_clamp_timesteps_to_the_table_and_work_in_float64(schedule):
    levels = NoiseLevels(schedule)
    table = schedule.alphas_cumprod.double()
    sigmas = ((1 - table) / table).sqrt()
    assert levels.sigma_min == pytest.approx(float(sigmas[0]), rel=1e-6)
    assert float(levels.alpha_bar(0)) == pytest.approx(float(table[0]), rel=1e-7)
    assert float(levels.alpha_bar(-1)) == float(levels.alpha_bar(0))
    assert float(levels.alpha_bar(T)) == float(levels.alpha_bar(T - 1))
    assert float(levels.t_to_sigma(-2.5)) == pytest.approx(levels.sigma_min, rel=1e-12)
    assert float(levels.t_to_sigma(T + 3.5)) == pytest.approx(levels.sigma_max, rel=1e-12)
    # Python-float levels are not rounded to float32 on the way in
    expected = float(alpha_at(schedule, torch.tensor(998.7, dtype=torch.float64)))
    assert float(levels.alpha_bar(998.7)) == pytest.approx(expected, rel=1e-12)
    sigma = float(levels.t_to_sigma(500.3))
    assert float(levels.sigma_to_t(sigma)) == pytest.approx(500.3, abs=1e-9)
