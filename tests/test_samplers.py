"""Samplers, classifier-free guidance, img2img and inpainting on closed-form denoisers."""
import math

import numpy as np
import pytest
import torch

from ldm.diffusion import Diffusion, predict_eps, predict_x0
from ldm.generation import sample_latents
from ldm.guidance import ClassifierFreeGuidance, guide, rescale_guided
from ldm.samplers import (
    SAMPLERS,
    Denoiser,
    NoiseLevels,
    adams_bashforth,
    default_spacing,
    eps_x0_from_output,
    get_sampler,
    karras_sigmas,
    make_sigmas,
    make_timesteps,
    output_from_eps_x0,
    repaint_path,
    sample_ddim,
    sample_dpmpp_2m,
    sample_ddpm,
    sample_heun,
    sample_plms,
)
from ldm.schedule import NoiseSchedule, make_betas

T = 1000
MU, S = 0.7, 0.4  # the data distribution N(MU, S^2) of the closed-form denoisers


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule(make_betas("ldm-linear"))


def alpha_at(schedule, t):
    """alpha_bar at fractional t by log-sigma interpolation, written independently with numpy."""
    ab = schedule.alphas_cumprod.double().numpy()
    t = t.double().cpu().numpy()
    with np.errstate(divide="ignore"):  # zero terminal SNR: the last log-sigma is inf
        log_sigma = np.interp(t, np.arange(len(ab)), 0.5 * np.log((1 - ab) / ab))
    exact = ab[np.clip(np.round(t).astype(int), 0, len(ab) - 1)]
    return torch.from_numpy(np.where(t == np.round(t), exact, 1 / (1 + np.exp(2 * log_sigma))))


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


# -- conversions and levels -------------------------------------------------------------------------


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_conversions_match_diffusion(schedule, parameterization):
    g = torch.Generator().manual_seed(0)
    x_t, out = torch.randn(2, 4, 3, 3, 5, generator=g).unbind(0)
    t = torch.tensor([0, 17, 500, 999])
    a = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    eps, x0 = eps_x0_from_output(out, x_t, a, parameterization)
    torch.testing.assert_close(eps, predict_eps(schedule, x_t, t, out, parameterization), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x0, predict_x0(schedule, x_t, t, out, parameterization), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(output_from_eps_x0(eps, x0, a, parameterization), out, rtol=1e-4, atol=1e-4)


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


def test_unknown_sampler_is_a_clear_error():
    assert set(SAMPLERS) == {"ddpm", "ddim", "plms", "dpmpp-2m", "euler", "heun"}
    with pytest.raises(ValueError, match="unknown sampler 'k_lms'.*ddpm, ddim"):
        get_sampler("k_lms")


# -- DDIM against diffusers -------------------------------------------------------------------------


def fixed_model(x, t):
    """A deterministic, nonlinear stand-in network depending on x and t."""
    t = t.float().view(-1, 1, 1, 1)
    return torch.tanh(x) * (0.3 + t / 2000) + 0.1 * torch.sin(3 * x + t / 100)


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
    """Heun's trapezoid over its first step, sigma 4096 down to a few, blew the variance up (x84 at
    3 steps, x3.6 at 5); an Euler first step keeps it within 20% of the exact value (Euler: -10%)."""
    from ldm.schedule import rescale_zero_terminal_snr

    schedule = NoiseSchedule(rescale_zero_terminal_snr(make_betas("ldm-linear")))
    denoiser = Denoiser(gaussian_model(schedule, "v"), Diffusion(schedule, parameterization="v"))
    sigmas = make_sigmas(denoiser.levels, steps, "trailing")
    noise = torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    x = sample_heun(denoiser, noise * float(sigmas[0]), sigmas)
    a = 1 / (1 + float(sigmas[-2]) ** 2)  # the output is E[x0 | x] at the last nonzero level
    assert x.mean().item() == pytest.approx(MU, abs=0.01)
    assert x.var().item() == pytest.approx(a * S**4 / (a * S**2 + 1 - a), rel=0.2)


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


# -- guidance ---------------------------------------------------------------------------------------


class CountingModel:
    """(x, t, context) -> output depending nonlinearly on all three; records batch sizes."""

    def __init__(self, channels_out=None):
        self.batches, self.channels_out = [], channels_out

    def __call__(self, x, t, context):
        self.batches.append(x.shape[0])
        out = torch.tanh(x * context.mean(dim=(1, 2)).view(-1, 1, 1, 1)) + t.view(-1, 1, 1, 1) / 1000
        if self.channels_out:
            out = torch.cat([out, -out], dim=1)
        return out


def contexts(batch=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 5, 8, generator=g), torch.randn(batch, 5, 8, generator=g)


def test_guidance_scale_one_is_the_conditional_model(schedule):
    cond, uncond = contexts()
    model = CountingModel()
    cfg = ClassifierFreeGuidance(model, Diffusion(schedule), cond, uncond, scale=1.0, rescale=0.7)
    x, t = torch.randn(3, 4, 6, 6), torch.full((3,), 500.0)
    assert torch.equal(cfg(x, t), model(x, t, cond))
    assert model.batches == [3, 3]  # one call each: no unconditional half


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_guidance_formula_in_one_batched_call(schedule, parameterization):
    cond, uncond = contexts()
    model = CountingModel()
    cfg = ClassifierFreeGuidance(model, Diffusion(schedule, parameterization=parameterization), cond, uncond, 7.5)
    x, t = torch.randn(3, 4, 6, 6), torch.full((3,), 321.0)
    out = cfg(x, t)
    assert model.batches == [6]
    u, c = model(x, t, uncond), model(x, t, cond)
    torch.testing.assert_close(out, u + 7.5 * (c - u))
    assert torch.equal(guide(u, c, 0.0), u)
    torch.testing.assert_close(guide(u, c, 1.0), c)


def test_guidance_keeps_the_conditional_variance_channels(schedule):
    cond, uncond = contexts()
    model = CountingModel(channels_out=8)
    cfg = ClassifierFreeGuidance(model, Diffusion(schedule, learn_sigma=True), cond, uncond, 3.0)
    x, t = torch.randn(3, 4, 6, 6), torch.full((3,), 100.0)
    out = cfg(x, t)
    u, c = model(x, t, uncond), model(x, t, cond)
    torch.testing.assert_close(out[:, :4], u[:, :4] + 3 * (c[:, :4] - u[:, :4]))
    torch.testing.assert_close(out[:, 4:], c[:, 4:])


@pytest.mark.parametrize("parameterization", ["eps", "v", "x0"])
def test_guidance_rescale_on_x0(schedule, parameterization):
    cond, uncond = contexts()
    model = CountingModel()
    diffusion = Diffusion(schedule, parameterization=parameterization)
    x, t = torch.randn(3, 4, 6, 6), torch.tensor([50.0, 400.0, 900.0])
    a = schedule.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
    to_x0 = lambda out: eps_x0_from_output(out, x, a, parameterization)[1]  # noqa: E731
    plain = ClassifierFreeGuidance(model, diffusion, cond, uncond, 9.0)(x, t)
    full = ClassifierFreeGuidance(model, diffusion, cond, uncond, 9.0, rescale=1.0)(x, t)
    half = ClassifierFreeGuidance(model, diffusion, cond, uncond, 9.0, rescale=0.5)(x, t)
    x0_cond, x0_plain, x0_full = to_x0(model(x, t, cond)), to_x0(plain), to_x0(full)
    # phi = 1: the guided x0 gets the conditional x0's per-sample std, keeping its direction.
    torch.testing.assert_close(x0_full.std(dim=(1, 2, 3)), x0_cond.std(dim=(1, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x0_full / x0_full.std(dim=(1, 2, 3), keepdim=True),
                               x0_plain / x0_plain.std(dim=(1, 2, 3), keepdim=True), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(to_x0(half), (x0_full + x0_plain) / 2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rescale_guided(x0_plain, x0_cond, 0.0), x0_plain)
    with pytest.raises(ValueError, match="rescale"):
        ClassifierFreeGuidance(model, diffusion, cond, uncond, 9.0, rescale=1.5)


# -- img2img, inpainting, determinism ---------------------------------------------------------------


def image_denoiser(schedule, calls=None):
    """A per-sample denoiser (no cross-talk between batch items) that records its timesteps."""

    def model(x, t):
        if calls is not None:
            calls.append(t[0].item())
        return fixed_model(x, t)

    return Denoiser(model, Diffusion(schedule))


def gens(seed, n):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_img2img_strength(schedule, name):
    init = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    calls = []
    out = sample_latents(image_denoiser(schedule, calls), init.shape, generators=gens(0, 2), sampler=name,
                         steps=10, init_latents=init, strength=0.0)
    assert torch.equal(out, init) and calls == []
    sample_latents(image_denoiser(schedule, calls), init.shape, generators=gens(0, 2), sampler=name,
                   steps=10, init_latents=init, strength=0.5)
    per_step = {"heun": 2, "plms": 1}.get(name, 1)
    assert 5 <= len(calls) <= 5 * per_step + 1  # int(10 * 0.5) steps
    if SAMPLERS[name].space == "timestep":
        spacing = SAMPLERS[name].default_spacing
        assert calls[0] == make_timesteps(T, 10, spacing)[5]  # SD: start at index steps - int(steps * strength)


@pytest.mark.parametrize("name, resamples", [(n, 1) for n in SAMPLERS] + [("ddim", 3), ("ddpm", 2)])
def test_inpainting_keeps_the_known_region(schedule, name, resamples):
    init = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 3:7] = 1
    calls = []
    out = sample_latents(image_denoiser(schedule, calls), init.shape, generators=gens(0, 2), sampler=name, steps=8,
                         init_latents=init, mask=mask, repaint_jump=2, repaint_resamples=resamples)
    keep = (mask == 0).expand_as(init)
    assert torch.equal(out[keep], init[keep])
    assert (out[~keep] - init[~keep]).abs().mean() > 0.1
    if resamples > 1:
        assert len(calls) == 8 + (resamples - 1) * 2 * 3  # jumps after steps 2, 4, 6


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_inpainting_reimposes_the_noised_known_region_before_every_step(schedule, name):
    # The model pulls everything away from the image (eps = 3 everywhere): only re-imposition keeps
    # the known region of every step's input at sqrt(a) * init + sqrt(1 - a) * noise.
    init = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 3:7] = 1
    inputs = {}

    def model(x, t):
        inputs[t[0].item()] = x.clone()  # the last call at a level is its step's (Heun and PLMS predict first)
        return torch.full_like(x, 3.0)

    denoiser = Denoiser(model, Diffusion(schedule))
    sample_latents(denoiser, init.shape, generators=gens(0, 2), sampler=name, steps=8, init_latents=init, mask=mask)
    keep = (mask == 0).expand_as(init)
    assert len(inputs) >= 7
    for t, x in inputs.items():
        a = float(denoiser.levels.alpha_bar(t))
        z = (x - a**0.5 * init)[keep] / (1 - a) ** 0.5
        assert abs(z.mean()) < 0.3 and 0.7 < z.std() < 1.3, (t, z.mean().item(), z.std().item())


def test_repaint_path():
    assert repaint_path(4, 2, 1) == [0, 1, 2, 3, 4]
    assert repaint_path(4, 2, 2) == [0, 1, 2, 0, 1, 2, 3, 4]
    assert repaint_path(6, 2, 3) == [0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 4, 2, 3, 4, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("name, eta", [("ddpm", 0.0), ("ddim", 1.0), ("dpmpp-2m", 0.0), ("heun", 0.0)])
def test_deterministic_and_batch_invariant(schedule, name, eta):
    shape = (3, 4, 8, 8)
    init = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    mask = (torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(4)) > 0.5).float()
    for extra in ({}, {"init_latents": init, "mask": mask}):
        run = lambda seed, n, sl: sample_latents(  # noqa: E731
            image_denoiser(schedule), (n, *shape[1:]), generators=gens(seed, n), sampler=name, steps=6, eta=eta,
            **{k: v[sl] for k, v in extra.items()})
        batch = run(0, 3, slice(0, 3))
        torch.testing.assert_close(batch, run(0, 3, slice(0, 3)), rtol=0, atol=0)
        torch.testing.assert_close(batch[1:2], run(1, 1, slice(1, 2)), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(batch[0], batch[1])


def test_sample_latents_bad_input(schedule):
    d = image_denoiser(schedule)
    with pytest.raises(ValueError, match="eta applies to the ddim sampler only"):
        sample_latents(d, (1, 4, 8, 8), generators=gens(0, 1), sampler="euler", eta=0.5)
    with pytest.raises(ValueError, match="needs the image"):
        sample_latents(d, (1, 4, 8, 8), generators=gens(0, 1), mask=torch.ones(1, 1, 8, 8))
    with pytest.raises(ValueError, match="RePaint"):
        sample_latents(d, (1, 4, 8, 8), generators=gens(0, 1), sampler="euler", init_latents=torch.zeros(1, 4, 8, 8),
                       mask=torch.ones(1, 1, 8, 8), repaint_resamples=2)
    with pytest.raises(ValueError, match="strength"):
        sample_latents(d, (1, 4, 8, 8), generators=gens(0, 1), init_latents=torch.zeros(1, 4, 8, 8), strength=1.5)
    with pytest.raises(ValueError, match="generators"):
        sample_latents(d, (2, 4, 8, 8), generators=gens(0, 1))
