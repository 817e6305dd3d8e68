"""Samplers against diffusers step for step and on the closed-form denoiser of Gaussian data."""

import math

import pytest
import torch
from sampling_helpers import T, affine_statistics, alpha_at, fixed_model, gaussian_network, gens

from ldm.denoiser import Denoiser, NoiseLevels, make_sigmas, make_timesteps
from ldm.diffusion import Diffusion
from ldm.generation import sample_latents
from ldm.samplers import (
    SAMPLERS,
    adams_bashforth,
    default_spacing,
    get_sampler,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_heun,
    sample_plms,
)
from ldm.schedule import NoiseSchedule, make_betas

MU, S = 0.7, 0.4  # the data distribution N(MU, S^2) of the closed-form denoisers


def gaussian_model(schedule, parameterization, learn_sigma=False):
    """The exact network for data N(MU, S^2): E[x0 | x_t] is linear in x_t.

    With learn_sigma, the variance channel encodes the exact reverse-step variance
    beta~_t + coef1_t^2 Var(x0 | x_t), which makes full-length DDPM exact for Gaussian data.
    """

    def model_fn(x, t):
        a = alpha_at(schedule, t).to(x).view(-1, *[1] * (x.ndim - 1))
        var_t = a * S**2 + 1 - a
        x0 = MU + a.sqrt() * S**2 / var_t * (x - a.sqrt() * MU)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        out = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[parameterization]
        if not learn_sigma:
            return out
        ti = t.round().long()
        x0_variance = S**2 * (1 - a.flatten()) / var_t.flatten()
        var = schedule.posterior_variance[ti] + schedule.posterior_mean_coef1[ti] ** 2 * x0_variance
        lo, hi = schedule.posterior_log_variance_clipped[ti], schedule.log_betas[ti]
        v = 2 * (var.log() - lo) / (hi - lo) - 1
        return torch.cat([out, v.view(-1, 1, 1, 1).expand_as(out)], dim=1)

    return model_fn


def start_state(spec, levels, first_level, noise):
    """A draw from the exact marginal at the first level (so only the sampler's error remains)."""
    if spec.space == "timestep":
        a = float(levels.alphas_cumprod[first_level])
        return a**0.5 * MU + (a * S**2 + 1 - a) ** 0.5 * noise
    return MU + (S**2 + float(first_level) ** 2) ** 0.5 * noise


def expected_output(name, levels):
    """Mean and variance of the sampler's output under the exact denoiser.

    DDIM/PLMS end at the t = 0 noise level (alphas_prev[-1] = alphas_cumprod[0]); DDPM and the
    sigma samplers end by returning E[x0 | x] at the lowest noise level, which shrinks the variance.
    """
    a0 = float(levels.alphas_cumprod[0])
    if name in ("ddim", "plms"):
        return a0**0.5 * MU, a0 * S**2 + 1 - a0
    a = a0 if name == "ddpm" else 1 / (1 + levels.sigma_min**2)
    return MU, a * S**4 / (a * S**2 + 1 - a)


def test_unknown_sampler_is_a_clear_error():
    assert set(SAMPLERS) == {"ddpm", "ddim", "plms", "dpmpp-2m", "euler", "heun"}
    with pytest.raises(ValueError, match="unknown sampler 'k_lms'.*ddpm, ddim"):
        get_sampler("k_lms")


# -- DDIM against diffusers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spacing, theirs, parameterization, eta",
    [
        ("uniform", dict(timestep_spacing="leading", steps_offset=1), "eps", 0.0),
        ("uniform", dict(timestep_spacing="leading", steps_offset=1), "eps", 1.0),
        ("uniform", dict(timestep_spacing="leading", steps_offset=1), "v", 0.5),
        ("leading", dict(timestep_spacing="leading", steps_offset=0), "x0", 0.0),
        ("trailing", dict(timestep_spacing="trailing"), "v", 0.0),
    ],
)
def test_ddim_matches_diffusers_step_for_step(schedule, spacing, theirs, parameterization, eta):
    diffusers = pytest.importorskip("diffusers")
    prediction_type = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}[parameterization]
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        set_alpha_to_one=False, clip_sample=False, prediction_type=prediction_type,
                                        **theirs)
    scheduler.set_timesteps(25)
    ours_t = make_timesteps(T, 25, spacing)
    assert scheduler.timesteps.tolist() == ours_t

    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = []
    denoiser = Denoiser(fixed_model, Diffusion(schedule, parameterization=parameterization))
    sample_ddim(denoiser, x0.clone(), ours_t, eta=eta, generators=torch.Generator().manual_seed(7),
                callback=lambda i, x, pred: ours.append(x))
    x, g = x0.clone(), torch.Generator().manual_seed(7)
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(fixed_model(x, t.view(1)), t, x, eta=eta, generator=g).prev_sample
        torch.testing.assert_close(ours[i], x, rtol=1e-4, atol=1e-4, msg=f"step {i} (t = {t.item()})")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 copy= warning inside diffusers
def test_dpmpp_2m_matches_diffusers_step_for_step(schedule):
    """DPM-Solver++(2M) with Karras sigmas against diffusers' DPMSolverMultistepScheduler (VP state).

    The stand-in network ignores t: diffusers rounds the Karras timesteps, we keep them fractional."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                      use_karras_sigmas=True, final_sigmas_type="zero")
    scheduler.set_timesteps(8)
    sigmas = make_sigmas(NoiseLevels(schedule), 8, "karras")
    torch.testing.assert_close(scheduler.sigmas, sigmas.float())
    network = lambda x: torch.tanh(x) * 0.8 + 0.1 * torch.sin(3 * x)  # noqa: E731
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = []
    sample_dpmpp_2m(Denoiser(lambda x, t: network(x), Diffusion(schedule)), noise * sigmas[0].item(), sigmas,
                    callback=lambda i, x, x0: ours.append(x))
    x = noise * (1 + sigmas[0].item() ** -2) ** -0.5
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(network(x), t, x).prev_sample
        vp = ours[i] / (1 + sigmas[i + 1].item() ** 2) ** 0.5  # our state is x_t / sqrt(alpha_bar)
        torch.testing.assert_close(vp, x, rtol=1e-4, atol=1e-4, msg=f"step {i}")


# -- PLMS -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [2, 3, 4])
def test_adams_bashforth_integrates_polynomials_exactly(order):
    # Values f(n), f(n-1), ... of a degree order-1 polynomial: the combination equals its mean over [n, n+1].
    coefficients = [0.5, -1.25, 0.75, 2.0][:order]
    f = lambda s: sum(c * s**k for k, c in enumerate(coefficients))  # noqa: E731
    antiderivative = lambda s: sum(c * s ** (k + 1) / (k + 1) for k, c in enumerate(coefficients))  # noqa: E731
    n = 5.0
    history = [torch.tensor(f(n - k), dtype=torch.float64) for k in reversed(range(order))]  # oldest first
    assert adams_bashforth(history).item() == pytest.approx(antiderivative(n + 1) - antiderivative(n), rel=1e-12)
    # The published coefficients, and an order-(k) rule must fail on a degree-k polynomial.
    assert adams_bashforth([torch.tensor(0.0), torch.tensor(1.0)]).item() == 1.5
    quadratic = [torch.tensor((n - k) ** 2, dtype=torch.float64) for k in reversed(range(2))]
    assert adams_bashforth(quadratic).item() != pytest.approx(((n + 1) ** 3 - n**3) / 3)


def test_plms_first_step_is_improved_euler_then_multistep(schedule):
    calls = []

    def model(x, t):
        calls.append(t[0].item())
        return fixed_model(x, t)

    denoiser = Denoiser(model, Diffusion(schedule))
    ts = make_timesteps(T, 5)
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = sample_plms(denoiser, x, ts)
    assert calls == [ts[0], ts[1], *ts[1:]]  # two evaluations at the first step, then one per step
    # The first step by hand: DDIM with the mean of eps at both ends.
    a, a_prev = schedule.alphas_cumprod[ts[0]].item(), schedule.alphas_cumprod[ts[1]].item()
    eps = fixed_model(x, torch.tensor([float(ts[0])]))
    ddim = lambda e: a_prev**0.5 * (x - (1 - a) ** 0.5 * e) / a**0.5 + (1 - a_prev) ** 0.5 * e  # noqa: E731
    eps_prime = (eps + fixed_model(ddim(eps), torch.tensor([float(ts[1])]))) / 2
    first = []
    sample_plms(denoiser, x, ts, callback=lambda i, x, x0: first.append(x))
    torch.testing.assert_close(first[0], ddim(eps_prime))
    assert torch.isfinite(out).all()


# -- every sampler on the exact denoiser of a Gaussian ---------------------------------------------

STEPS = {"ddpm": 1000, "ddim": 500, "plms": 100, "dpmpp-2m": 100, "euler": 200, "heun": 100}


@pytest.mark.parametrize("parameterization", ["eps", "v", "x0"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_samplers_reproduce_gaussian_data(schedule, name, parameterization):
    learn_sigma = name == "ddpm"  # DDPM is exact for Gaussian data with the exact reverse variance
    diffusion = Diffusion(schedule, parameterization=parameterization, learn_sigma=learn_sigma)
    denoiser = Denoiser(gaussian_model(schedule, parameterization, learn_sigma), diffusion)
    spec = SAMPLERS[name]
    levels = denoiser.levels
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(20000, 1, 1, 1, generator=g)
    if spec.space == "timestep":
        run_levels = make_timesteps(T, STEPS[name], spec.default_spacing)
    else:
        run_levels = make_sigmas(levels, STEPS[name], "karras")
    x = spec.sample(denoiser, start_state(spec, levels, run_levels[0], noise), run_levels, generators=g)
    mean, var = expected_output(name, levels)
    assert x.mean().item() == pytest.approx(mean, abs=0.01)
    assert x.var().item() == pytest.approx(var, rel=0.03)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp-2m", "euler", "heun"])
def test_zero_terminal_snr_v_model_starts_from_pure_noise(name):
    """With zero terminal SNR the first level is pure noise, so starting from noise loses no mean
    (an SD-like schedule starts with sqrt(a_T) MU missing and ends about 0.02 low here)."""
    from ldm.schedule import rescale_zero_terminal_snr

    schedule = NoiseSchedule(rescale_zero_terminal_snr(make_betas("ldm-linear")))
    denoiser = Denoiser(gaussian_model(schedule, "v"), Diffusion(schedule, parameterization="v"))
    spec = SAMPLERS[name]
    levels = (make_timesteps(T, 50, "trailing") if spec.space == "timestep"
              else make_sigmas(denoiser.levels, 50, "trailing"))
    noise = torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    x = spec.sample(denoiser, noise * (1.0 if spec.space == "timestep" else float(levels[0])), levels,
                    generators=torch.Generator().manual_seed(1))
    assert torch.isfinite(x).all()
    assert x.mean().item() == pytest.approx(expected_output(name, denoiser.levels)[0], abs=0.01)
    with pytest.raises(ValueError, match="plms"):
        sample_plms(denoiser, noise, make_timesteps(T, 10, "trailing"))


@pytest.mark.parametrize("steps", [3, 5])
def test_heun_from_zero_terminal_snr_keeps_the_variance_at_few_steps(steps):
    """Heun's trapezoid in sigma over its first step, 4096 down to a few, blew the variance up (x84 at
    3 steps, x3.6 at 5); the trapezoid in 1 / sigma from infinity keeps it within 20% of the exact value."""
    from ldm.schedule import rescale_zero_terminal_snr

    schedule = NoiseSchedule(rescale_zero_terminal_snr(make_betas("ldm-linear")))
    denoiser = Denoiser(gaussian_model(schedule, "v"), Diffusion(schedule, parameterization="v"))
    sigmas = make_sigmas(denoiser.levels, steps, "trailing")
    noise = torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    x = sample_heun(denoiser, noise * float(sigmas[0]), sigmas)
    a = 1 / (1 + float(sigmas[-2]) ** 2)  # the output is E[x0 | x] at the last nonzero level
    assert x.mean().item() == pytest.approx(MU, abs=0.01)
    assert x.var().item() == pytest.approx(a * S**4 / (a * S**2 + 1 - a), rel=0.2)


@pytest.mark.parametrize("steps", [10, 25])
def test_heun_first_step_from_infinity_is_second_order(steps):
    """From the zero-terminal-SNR stand-in (sigma = inf) to the first finite level, exact statistics on
    unit-variance Gaussian data N(MU, 1) (the output is affine in the start noise: no Monte Carlo).

    The state after the first step has the exact marginal's std sqrt(1 + sigma_1^2) (the Euler/DDIM step
    used before gave sigma_1: 0.027 short at 10 steps, 0.009 at 25), and the final samples are as close
    to the data as Heun started from that exact marginal at sigma_1 (before: std error 0.0333 against
    0.0318 at 10 steps, 0.01589 against 0.01571 at 25)."""
    from ldm.schedule import rescale_zero_terminal_snr

    schedule = NoiseSchedule(rescale_zero_terminal_snr(make_betas("ldm-linear")))
    denoiser = Denoiser(gaussian_network(schedule, "v", [MU], [[1.0]]), Diffusion(schedule, parameterization="v"))
    sigmas = make_sigmas(denoiser.levels, steps, "trailing")
    start, first = float(sigmas[0]), float(sigmas[1])
    assert start == 4096.0 and math.isfinite(first)

    mean, cov = affine_statistics(lambda z: sample_heun(denoiser, z * start, sigmas[:2]), 1)
    assert mean.item() == pytest.approx(MU, abs=1e-6)
    assert cov.sqrt().item() == pytest.approx(math.sqrt(1 + first**2), abs=1e-3)

    def errors(sample):
        mean, cov = affine_statistics(sample, 1)
        return abs(mean.item() - MU), abs(cov.sqrt().item() - 1.0)

    ours = errors(lambda z: sample_heun(denoiser, z * start, sigmas))
    exact_start = errors(lambda z: sample_heun(denoiser, MU + math.sqrt(1 + first**2) * z, sigmas[1:]))
    assert ours[0] <= exact_start[0] + 1e-6
    assert ours[1] <= exact_start[1] + 1e-5


@pytest.mark.parametrize("spacing", ["trailing", "karras"])
def test_heun_treats_the_stand_in_sigma_as_infinity(spacing):
    """The first step from the stand-in is sigma_1 x / sigma + (D + D') / 2 (D' at the DDIM point), also
    when Karras' rho-spacing returns 4096 only to rounding (4095.9999999999973), and Heun then makes the
    2 * steps - 1 network calls the registry plans."""
    from ldm.schedule import rescale_zero_terminal_snr

    schedule = NoiseSchedule(rescale_zero_terminal_snr(make_betas("ldm-linear")))
    calls = []

    def model(x, t):
        calls.append(t[0].item())
        return fixed_model(x, t)

    denoiser = Denoiser(model, Diffusion(schedule, parameterization="v"))
    sigmas = make_sigmas(denoiser.levels, 6, spacing)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * float(sigmas[0])
    states = []
    sample_heun(denoiser, x, sigmas, callback=lambda i, x, x0: states.append(x))
    assert len(calls) == SAMPLERS["heun"].evaluations(6) and calls[0] == T - 1
    s0, s1 = float(sigmas[0]), float(sigmas[1])
    d0 = denoiser.denoise(x, s0)
    d1 = denoiser.denoise(s1 / s0 * x + d0, s1)
    torch.testing.assert_close(states[0], s1 / s0 * x + (d0 + d1) / 2)


def test_zero_terminal_snr_schedules_default_to_trailing_spacing():
    from ldm.schedule import rescale_zero_terminal_snr

    zero_snr = NoiseSchedule(rescale_zero_terminal_snr(make_betas("ldm-linear")))
    assert [default_spacing(n, zero_snr) for n in ("ddim", "ddpm", "euler", "plms")] == [
        "trailing", "trailing", "trailing", "uniform"]  # PLMS cannot start at T - 1
    assert default_spacing("ddim", NoiseSchedule(make_betas("ldm-linear"))) == "uniform"
    calls = []
    denoiser = Denoiser(lambda x, t: calls.append(t[0].item()) or torch.zeros_like(x),
                        Diffusion(zero_snr, parameterization="v"))
    sample_latents(denoiser, (1, 1, 2, 2), generators=gens(0, 1), sampler="ddim", steps=10)
    assert calls[0] == T - 1 and len(calls) == 10  # starts from pure noise


def test_ddpm_fixed_variances(schedule):
    """Learned variance at its bounds equals the fixed small / large variance; both are close to the
    data distribution (small a little under, large a little over)."""
    noise = torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    levels = NoiseLevels(schedule)
    ts = make_timesteps(T, 200, "linspace")
    x_start = start_state(SAMPLERS["ddpm"], levels, ts[0], noise)
    results = {}
    for variance in ("small", "large"):
        model = gaussian_model(schedule, "eps")
        fixed = Denoiser(model, Diffusion(schedule, fixed_variance=variance))
        bound = 1.0 if variance == "large" else -1.0
        learned = Denoiser(lambda x, t: torch.cat([model(x, t), torch.full_like(x, bound)], 1),
                           Diffusion(schedule, learn_sigma=True))
        a = sample_ddpm(fixed, x_start, ts, generators=torch.Generator().manual_seed(1))
        b = sample_ddpm(learned, x_start, ts, generators=torch.Generator().manual_seed(1))
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        results[variance] = a.var().item()
    target = expected_output("ddpm", levels)[1]
    assert results["small"] < target < results["large"]
    assert results["small"] == pytest.approx(target, rel=0.15) and results["large"] == pytest.approx(target, rel=0.15)


# -- RePaint: going back up the path re-noises with q(x_j | x_i) ------------------------------------

TIMESTEPS = [900, 600, 300, 100]  # levels 0..3; level 4 is done


def _alpha_bar_closed_form() -> torch.Tensor:
    """LDM's scaled-linear schedule in float64 by hand: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def _around_the_jump(sampler, schedule, path, x, generators, jump_from):
    """Run `sampler` along `path`; return the state reached at level `jump_from` (just before the path
    goes back up) and the state the next step starts from (after the re-noising)."""
    seen = {}

    def callback(i, x_next, x0):
        seen.setdefault("reached", {}).setdefault(i + 1, x_next.clone())  # the first visit of level i + 1

    def before_step(i, x_now):
        seen.setdefault("inputs", []).append((i, x_now.clone()))
        return x_now

    sampler(Denoiser(fixed_model, Diffusion(schedule)), x, TIMESTEPS, generators=generators, path=path,
            callback=callback, before_step=before_step)
    k = path.index(jump_from)  # the path's first k steps lead down to it; the jump follows
    up_to = path[k + 1]
    assert path[:k + 1] == list(range(k + 1)) and up_to < jump_from, path
    level, renoised = seen["inputs"][k]  # the input of the first step after the jump
    assert level == up_to
    return seen["reached"][jump_from], renoised, up_to


@pytest.mark.parametrize("path, jump_from", [
    ([0, 1, 2, 3, 1, 2, 3, 4], 3),  # up two levels: t = 100 -> t = 600
    ([0, 1, 2, 1, 2, 3, 4], 2),  # up one level: t = 300 -> t = 600
])
def test_ddim_repaint_renoises_with_the_forward_process_between_the_two_levels(schedule, path, jump_from):
    # DDIM with eta = 0 draws no noise, so the generator's first draw is the re-noising's eps and
    # x_j = sqrt(a_j / a_i) x_i + sqrt(1 - a_j / a_i) eps exactly (a = alpha_bar of the levels' timesteps).
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    reached, renoised, up_to = _around_the_jump(sample_ddim, schedule, path, x, torch.Generator().manual_seed(11),
                                                jump_from)
    ab = _alpha_bar_closed_form()
    ratio = ab[TIMESTEPS[up_to]] / ab[TIMESTEPS[jump_from]]
    assert 0.1 < ratio < 0.9  # neither square root is close to 1
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(11)).double()
    expected = ratio.sqrt() * reached.double() + (1 - ratio).sqrt() * eps
    torch.testing.assert_close(renoised.double(), expected, rtol=0, atol=2e-6)


def test_ddpm_repaint_renoising_has_the_forward_process_mean_scale_and_variance(schedule):
    # DDPM draws noise at every step as well, so check the re-noising statistically over 65,536 values:
    # regressing the re-noised state on the state reached gives slope sqrt(a_j / a_i) and residual
    # variance 1 - a_j / a_i (standard errors about 0.3% and 0.6%).
    path, jump_from = [0, 1, 2, 3, 1, 2, 3, 4], 3
    x = torch.randn(1, 4, 128, 128, generator=torch.Generator().manual_seed(0))
    reached, renoised, up_to = _around_the_jump(sample_ddpm, schedule, path, x, torch.Generator().manual_seed(5),
                                                jump_from)
    ab = _alpha_bar_closed_form()
    ratio = float(ab[TIMESTEPS[up_to]] / ab[TIMESTEPS[jump_from]])
    a, b = reached.double().flatten(), renoised.double().flatten()
    slope = float((a * b).sum() / (a * a).sum())
    residual = b - slope * a
    assert slope == pytest.approx(ratio**0.5, rel=0.02)
    assert float(residual.mean()) == pytest.approx(0.0, abs=0.02)
    assert float(residual.var()) == pytest.approx(1 - ratio, rel=0.03)


def test_inpainting_with_repaint_renoises_the_unknown_region_to_the_forward_marginal(schedule):
    # End to end through sample_latents. With a network predicting eps = 0, a DDIM step from level i to
    # the next multiplies the state by sqrt(a_next / a_i), so the unknown region (pure noise at
    # a_0 = alpha_bar(first level)) reaches level i with variance a_i / a_0; the jump back up to level j
    # then gives variance (a_j / a_i)(a_i / a_0) + 1 - a_j / a_i. The network records its inputs.
    inputs = []

    def zero_eps(x, t):
        inputs.append((float(t[0]), x.clone()))
        return torch.zeros_like(x)

    init = torch.zeros(1, 4, 128, 128)
    mask = torch.ones(1, 1, 128, 128)
    mask[..., :8] = 0  # a strip of known content; the rest (124 of 128 columns) is repainted
    sample_latents(Denoiser(zero_eps, Diffusion(schedule)), init.shape, generators=gens(0, 1), sampler="ddim",
                   steps=4, spacing="leading", eta=0.0, init_latents=init, mask=mask, strength=1.0,
                   repaint_jump=2, repaint_resamples=2)
    # Leading 4 of 1000: levels t = 750, 500, 250, 0; path 0 1 2 3 1 2 3 4 jumps from the state at
    # level 3 (t = 0, reached but not yet denoised) back up to level 1 (t = 500).
    assert [t for t, _ in inputs] == [750.0, 500.0, 250.0, 500.0, 250.0, 0.0]
    ab = _alpha_bar_closed_form()
    a0, a_i, a_j = float(ab[750]), float(ab[0]), float(ab[500])
    before = inputs[2][1][..., 8:].double()  # at t = 250, on the way down: variance a(250) / a0
    assert float(before.var()) == pytest.approx(float(ab[250]) / a0, rel=0.03)
    after = inputs[3][1][..., 8:].double()  # at t = 500 again, after the jump
    assert float(after.var()) == pytest.approx(a_j / a0 + 1 - a_j / a_i, rel=0.03)
    assert abs(float(after.mean())) < 0.02
