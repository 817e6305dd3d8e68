"""Sampler behaviour the mutation run (make mutation) found untested: hooks and the progress bar in every
sampler, network calls per step against the registry, one DDPM step against its closed form, DDPM's
dtype, batch layout and per-image noise, PLMS and Heun at one or two steps, RePaint's arguments, the
registry's state spaces and `SamplerSpec.run`'s eta."""
from __future__ import annotations

import pytest
import torch
from sampling_helpers import alpha_at, gens

from common.randomness import randn_like
from ldm.denoiser import Denoiser, NoiseLevels, make_sigmas, make_timesteps
from ldm.diffusion import Diffusion
from ldm.samplers import (SAMPLERS, SigmaSpace, TimestepSpace, repaint_path, sample_ddim, sample_ddpm, sample_heun,
                          sample_plms, samplers_with)
from ldm.schedule import NoiseSchedule, make_betas, rescale_zero_terminal_snr

C = 0.6  # variance of the Gaussian data the stand-in networks know exactly


def gaussian_network(schedule, kind="eps"):
    """The exact eps (or v) network for data N(0, C): E[x0 | x_t] = sqrt(a) C / (a C + 1 - a) x_t."""
    def network(x_t, t):
        a = alpha_at(schedule, t).view(-1, 1, 1, 1)
        x = x_t.double()
        x0 = a.sqrt() * C / (a * C + 1 - a) * x
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt() if kind == "eps" else None
        out = eps if kind == "eps" else a.sqrt() * (x - a.sqrt() * x0) / (1 - a).sqrt() - (1 - a).sqrt() * x0
        return out.to(x_t.dtype)
    return network


def levels_for(name, levels, steps):
    space = SAMPLERS[name].state_space
    return space.levels(levels, steps, SAMPLERS[name].default_spacing)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_calls_its_hooks_once_a_step_and_counts_its_network_calls(schedule, name):
    calls, before, after = [], [], []

    def network(x, t):
        calls.append(t)
        return gaussian_network(schedule)(x, t)

    denoiser = Denoiser(network, Diffusion(schedule))
    levels = levels_for(name, denoiser.levels, 4)
    x = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * SAMPLERS[name].state_space.pure_noise_scale(levels)
    SAMPLERS[name].run(denoiser, x, levels, generators=gens(0, 1),
                       before_step=lambda i, x: before.append(i) or x, callback=lambda i, x, x0: after.append((i, x0)))
    n = len(levels) - 1 if SAMPLERS[name].space == "sigma" else len(levels)
    assert before == list(range(n)) and [i for i, _ in after] == list(range(n))
    assert all(isinstance(x0, torch.Tensor) and x0.shape == x.shape for _, x0 in after)
    assert len(calls) == SAMPLERS[name].evaluations(n)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_plms_network_calls_at_few_steps(schedule, steps):
    calls = []
    denoiser = Denoiser(lambda x, t: calls.append(t) or gaussian_network(schedule)(x, t), Diffusion(schedule))
    out = sample_plms(denoiser, torch.randn(1, 1, 2, 2), make_timesteps(1000, steps))
    assert torch.isfinite(out).all() and len(calls) == SAMPLERS["plms"].evaluations(steps)


def test_callback_gets_the_x0_prediction_of_the_step(schedule):
    denoiser = Denoiser(gaussian_network(schedule), Diffusion(schedule))
    timesteps = make_timesteps(1000, 3)
    states, predictions = [], []
    sample_ddim(denoiser, torch.randn(2, 1, 2, 2), timesteps,
                before_step=lambda i, x: states.append(x) or x, callback=lambda i, x, x0: predictions.append(x0))
    for i, (x, x0) in enumerate(zip(states, predictions)):
        torch.testing.assert_close(x0, denoiser.predict(x, timesteps[i])[1])


def test_progress_bar_only_when_asked_and_gone_at_the_end(schedule, capsys):
    denoiser = Denoiser(gaussian_network(schedule), Diffusion(schedule))
    timesteps = make_timesteps(1000, 3)
    sample_ddim(denoiser, torch.randn(1, 1, 2, 2), timesteps)
    assert capsys.readouterr().err == ""
    sample_ddim(denoiser, torch.randn(1, 1, 2, 2), timesteps, progress=False)
    assert capsys.readouterr().err == ""
    sample_ddim(denoiser, torch.randn(1, 1, 2, 2), timesteps, progress=True)
    err = capsys.readouterr().err
    assert "/3 [" in err and not err.endswith("\n")  # leave=False: the finished bar is cleared, no line stays


def test_one_ddpm_step_is_the_posterior_mean_plus_its_deviation_times_the_noise():
    schedule = NoiseSchedule(make_betas("linear", 10, 1e-3, 0.2))
    denoiser = Denoiser(gaussian_network(schedule), Diffusion(schedule))
    x = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    first = []
    sample_ddpm(denoiser, x, list(range(9, -1, -1)), generators=gens(7, 2),
                callback=lambda i, x_next, x0: first.append(x_next) if i == 0 else None)
    a = float(schedule.alphas_cumprod[9])
    x0 = a**0.5 * C / (a * C + 1 - a) * x.double()
    mean = float(schedule.posterior_mean_coef1[9]) * x0 + float(schedule.posterior_mean_coef2[9]) * x.double()
    z = randn_like(x, gens(7, 2))  # the first draw of each image's generator
    expected = mean + float(schedule.posterior_variance[9]) ** 0.5 * z.double()
    torch.testing.assert_close(first[0].double(), expected, rtol=1e-4, atol=1e-5)


def test_ddpm_keeps_the_dtype_and_adds_noise_before_the_last_step(schedule):
    denoiser = Denoiser(gaussian_network(schedule), Diffusion(schedule))
    x = torch.randn(2, 3, 2, 2)  # batch and channels differ
    out = sample_ddpm(denoiser, x.bfloat16(), make_timesteps(1000, 3, "linspace"), generators=gens(0, 2))
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    two = [sample_ddpm(denoiser, x, make_timesteps(1000, 2, "linspace"), generators=gens(s, 2)) for s in (0, 5)]
    assert not torch.allclose(two[0], two[1])  # the first of two steps draws noise


def test_ddpm_repaint_noise_comes_from_the_images_generators(schedule):
    denoiser = Denoiser(gaussian_network(schedule), Diffusion(schedule))
    timesteps = make_timesteps(1000, 4, "linspace")
    path = repaint_path(4, 2, 2)
    x = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        runs.append(sample_ddpm(denoiser, x, timesteps, generators=gens(3, 1), path=path))
    assert torch.equal(runs[0], runs[1])


def test_plms_on_a_zero_terminal_snr_schedule_is_a_one_line_error():
    schedule = NoiseSchedule(rescale_zero_terminal_snr(make_betas("ldm-linear")))
    denoiser = Denoiser(gaussian_network(schedule, "v"), Diffusion(schedule, parameterization="v"))
    with pytest.raises(ValueError, match="^plms needs x0 from eps at every step; a zero-terminal-SNR schedule has "
                                         "none at t = T - 1$"):
        sample_plms(denoiser, torch.randn(1, 1, 2, 2), make_timesteps(1000, 4, "trailing"))


def test_heun_from_the_zero_snr_start(schedule):
    """One step from the stand-in sigma to 0 is Euler: one network call, the x0 prediction (up to float32
    cancellation at x ~ 4096); two steps take the trapezoid in 1 / sigma down to any positive sigma, which
    keeps the data's scale."""
    zero_snr = NoiseSchedule(rescale_zero_terminal_snr(make_betas("ldm-linear")))
    calls = []
    network = gaussian_network(zero_snr, "v")
    denoiser = Denoiser(lambda x, t: calls.append(t) or network(x, t), Diffusion(zero_snr, parameterization="v"))
    levels = NoiseLevels(zero_snr)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * levels.sigma_max
    one = make_sigmas(levels, 1)
    expected = denoiser.denoise(x, float(one[0]))
    calls.clear()
    torch.testing.assert_close(sample_heun(denoiser, x, one), expected, rtol=0, atol=2e-3)
    assert len(calls) == 1
    two = make_sigmas(levels, 2)
    assert 0 < float(two[1]) < 1
    assert sample_heun(denoiser, x, two).std().item() < 1.0  # the data's std is C ** 0.5 = 0.77


def test_repaint_arguments():
    assert repaint_path(3, 1, 2) == [0, 1, 0, 1, 2, 1, 2, 3]  # jump length 1: every level but the last, twice
    assert repaint_path(3, 1, 3) == [0, 1, 0, 1, 0, 1, 2, 1, 2, 1, 2, 3]  # and three times
    assert repaint_path(3, 1, 1) == [0, 1, 2, 3]
    for jump_length, resamples in ((0, 2), (2, 0), (0, 0)):
        with pytest.raises(ValueError, match=f"^RePaint needs jump_length >= 1 and resamples >= 1, "
                                             f"got {jump_length}, {resamples}$"):
            repaint_path(4, jump_length, resamples)


def test_registry_state_spaces_and_capabilities(schedule):
    levels = NoiseLevels(schedule)
    table = schedule.alphas_cumprod.double()
    sigma_levels = SigmaSpace().levels(levels, 5, "karras")
    torch.testing.assert_close(sigma_levels, make_sigmas(levels, 5, "karras"))
    torch.testing.assert_close(SigmaSpace().levels(levels, 5, "trailing"), make_sigmas(levels, 5, "trailing"))
    assert SigmaSpace().pure_noise_scale(sigma_levels) == float(sigma_levels[0])
    assert SigmaSpace().state_scales(levels, sigma_levels) == [(1.0, float(s)) for s in sigma_levels[:-1]]
    ts = TimestepSpace().levels(levels, 3, "trailing")
    assert ts == [999, 666, 332]
    for (signal, noise), t in zip(TimestepSpace().state_scales(levels, ts), ts):
        assert (signal, noise) == pytest.approx((float(table[t]) ** 0.5, float(1 - table[t]) ** 0.5), rel=1e-12)
    assert samplers_with("eta") == ["ddim"] and samplers_with("resampling") == ["ddpm", "ddim"]


def test_sampler_spec_passes_eta_only_when_given(schedule):
    denoiser = Denoiser(gaussian_network(schedule), Diffusion(schedule))
    timesteps = make_timesteps(1000, 3)
    x = torch.randn(1, 1, 2, 2)
    deterministic = sample_ddim(denoiser, x, timesteps)
    assert torch.equal(SAMPLERS["ddim"].run(denoiser, x, timesteps, generators=gens(0, 1)), deterministic)
    stochastic = SAMPLERS["ddim"].run(denoiser, x, timesteps, eta=1.0, generators=gens(0, 1))
    assert torch.equal(stochastic, sample_ddim(denoiser, x, timesteps, eta=1.0, generators=gens(0, 1)))
    assert not torch.allclose(stochastic, deterministic)
