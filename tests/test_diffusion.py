"""Gaussian diffusion core (ldm/diffusion.py, ldm/vlb.py): targets, posterior, p(x_{t-1} | x_t), losses,
learned variance, importance-sampled t in training; schedules and t samplers have their own files."""
import math

import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from ldm.diffusion import (
    Diffusion,
    DiffusionConfig,
    min_snr_weight,
    predict_eps,
    predict_v,
    predict_x0,
    q_posterior_mean_variance,
    q_sample,
    training_target,
)
from ldm.schedule import NoiseSchedule, make_betas, rescale_zero_terminal_snr
from ldm.vlb import discretized_gaussian_nll

from conftest import float64_tables

T = 1000


# ---------------------------------------------------------------- forward process and targets


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_target_conversions_round_trip(schedule, parameterization):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(8, 4, 8, 8, generator=g), torch.randn(8, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 10, 250, 500, 750, 998, 999])
    x_t = q_sample(schedule, x0, t, eps)
    out = training_target(schedule, x0, t, eps, parameterization)
    a = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    torch.testing.assert_close(predict_x0(schedule, x_t, t, out, parameterization), x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(predict_eps(schedule, x_t, t, out, parameterization), eps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(predict_v(schedule, x_t, t, out, parameterization), v, atol=1e-4, rtol=1e-4)


def test_q_sample_statistics(schedule):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 4, 4, 4, generator=g).expand(20000, -1, -1, -1)
    t = torch.full((20000,), 600)
    x_t = q_sample(schedule, x0, t, torch.randn(x0.shape, generator=g))
    a = schedule.alphas_cumprod[600].item()
    n = x_t.shape[0]
    assert (x_t.mean(0) - math.sqrt(a) * x0[0]).abs().max() < 5 * math.sqrt((1 - a) / n)
    assert (x_t.var(0) - (1 - a)).abs().max() < 5 * (1 - a) * math.sqrt(2 / n)


def test_posterior_matches_bayes(schedule):
    """q(x_{t-1}|x_t,x0) ∝ N(x_t; sqrt(alpha_t) x_{t-1}, beta_t) N(x_{t-1}; sqrt(ab_{t-1}) x0, 1-ab_{t-1})."""
    betas, ab, ab_prev = float64_tables(make_betas("ldm-linear"))
    g = torch.Generator().manual_seed(2)
    x0, x_t = torch.randn(5, 4, 2, 2, generator=g), torch.randn(5, 4, 2, 2, generator=g)
    t = torch.tensor([1, 2, 100, 500, 999])
    mean, var, log_var = q_posterior_mean_variance(schedule, x0, x_t, t)
    b, ap = betas[t].view(-1, 1, 1, 1), ab_prev[t].view(-1, 1, 1, 1)
    precision = (1 - b) / b + 1 / (1 - ap)
    direct_var = 1 / precision
    direct_mean = direct_var * ((1 - b).sqrt() * x_t.double() / b + ap.sqrt() * x0.double() / (1 - ap))
    torch.testing.assert_close(mean.double(), direct_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), direct_var, rtol=1e-5, atol=0)
    torch.testing.assert_close(log_var.double(), direct_var.log(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- p(x_{t-1} | x_t)


def test_p_mean_variance_fixed_and_learned(schedule):
    betas, ab, _ = float64_tables(make_betas("ldm-linear"))
    g = torch.Generator().manual_seed(3)
    x_t, eps = torch.randn(4, 4, 4, 4, generator=g), torch.randn(4, 4, 4, 4, generator=g)
    t = torch.tensor([0, 1, 400, 999])
    b, a = betas[t].view(-1, 1, 1, 1), ab[t].view(-1, 1, 1, 1)
    # DDPM eq. 11: mu = (x_t - beta / sqrt(1 - ab) eps) / sqrt(alpha)
    ddpm_mean = (x_t.double() - b / (1 - a).sqrt() * eps.double()) / (1 - b).sqrt()

    small = Diffusion(schedule).p_mean_variance(eps, x_t, t)
    torch.testing.assert_close(small["mean"].double(), ddpm_mean, rtol=1e-4, atol=1e-4)
    expected_small = schedule.posterior_variance[[1, 1, 400, 999]]  # beta~_1 stands in at t = 0
    torch.testing.assert_close(small["variance"].flatten(), expected_small, rtol=1e-5, atol=0)
    large = Diffusion(schedule, fixed_variance="large").p_mean_variance(eps, x_t, t)
    expected_large = torch.cat([schedule.posterior_variance[1:2], betas[[1, 400, 999]].float()])
    torch.testing.assert_close(large["variance"].flatten(), expected_large, rtol=1e-5, atol=0)

    learned = Diffusion(schedule, learn_sigma=True)
    for v, expected in ((1.0, betas[t].log()), (-1.0, schedule.posterior_log_variance_clipped[t].double())):
        out = torch.cat([eps, torch.full_like(eps, v)], dim=1)
        pred = learned.p_mean_variance(out, x_t, t)
        torch.testing.assert_close(pred["log_variance"][:, 0, 0, 0].double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pred["mean"], small["mean"])

    clipped = Diffusion(schedule, parameterization="x0").p_mean_variance(3 * eps, x_t, t, clip_denoised=True)
    assert clipped["pred_x0"].abs().max() <= 1.0


# ---------------------------------------------------------------- training losses


def constant_model(out):
    return lambda x_t, t, **kwargs: out


@pytest.mark.parametrize("decoder_nll", ["gaussian", "discretized"])
def test_vlb_terms_match_torch_distributions(schedule, decoder_nll):
    betas, ab, ab_prev = float64_tables(make_betas("ldm-linear"))
    g = torch.Generator().manual_seed(4)
    x0 = torch.randint(0, 256, (5, 4, 4, 4), generator=g).float() / 127.5 - 1  # on the 8-bit grid
    noise = torch.randn(x0.shape, generator=g)
    out = torch.cat([torch.randn(x0.shape, generator=g), torch.rand(x0.shape, generator=g) * 2 - 1], dim=1)
    t = torch.tensor([0, 1, 30, 500, 999])
    diffusion = Diffusion(schedule, learn_sigma=True, decoder_nll=decoder_nll)
    terms = diffusion.training_losses(constant_model(out), x0, t=t, noise=noise)

    # The same quantities from the textbook formulas, in float64.
    x0d, epsd, eps_hat = x0.double(), noise.double(), out[:, :4].double()
    b, a, ap = (v[t].view(-1, 1, 1, 1) for v in (betas, ab, ab_prev))
    x_t = a.sqrt() * x0d + (1 - a).sqrt() * epsd
    true_var = b * (1 - ap) / (1 - a)
    true_mean = true_var * ((1 - b).sqrt() * x_t / b + ap.sqrt() * x0d / (1 - ap))
    model_mean = (x_t - b / (1 - a).sqrt() * eps_hat) / (1 - b).sqrt()
    post1 = betas[1] * (1 - ab[0]) / (1 - ab[1])
    min_log = torch.where(t.view(-1, 1, 1, 1) == 0, post1.log(), true_var.clamp(min=1e-300).log())
    frac = (out[:, 4:].double() + 1) / 2
    model_std = (frac * b.log() + (1 - frac) * min_log).mul(0.5).exp()
    p = Normal(model_mean, model_std)
    kl = kl_divergence(Normal(true_mean[1:], true_var[1:].sqrt()), Normal(model_mean[1:], model_std[1:]))
    expected = torch.empty(5, dtype=torch.float64)
    expected[1:] = kl.flatten(1).mean(1) / math.log(2)
    if decoder_nll == "gaussian":
        nll0 = -p.log_prob(x0d)[0]
    else:
        lo = torch.where(x0d[0] < -0.999, torch.tensor(-math.inf, dtype=torch.float64), x0d[0] - 1 / 255)
        hi = torch.where(x0d[0] > 0.999, torch.tensor(math.inf, dtype=torch.float64), x0d[0] + 1 / 255)
        p0 = Normal(model_mean[0], model_std[0])
        nll0 = -(p0.cdf(hi) - p0.cdf(lo)).log()
    expected[0] = nll0.mean() / math.log(2)

    torch.testing.assert_close(terms["vlb"].double(), expected, rtol=2e-3, atol=2e-4)
    mse = ((out[:, :4] - noise) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(terms["mse"], mse)
    torch.testing.assert_close(terms["loss"], mse + terms["vlb"])  # lambda * T = 0.001 * 1000


def test_discretized_nll_is_a_distribution():
    """The bin masses of all 256 levels sum to one."""
    levels = torch.linspace(-1, 1, 256)
    nll = discretized_gaussian_nll(levels, torch.full_like(levels, 0.3), torch.full_like(levels, math.log(0.2)))
    assert torch.exp(-nll).sum().item() == pytest.approx(1.0, abs=1e-5)


def test_vlb_gradient_reaches_only_the_variance(schedule):
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(6, 4, 4, 4, generator=g)
    out = nn.Parameter(torch.randn(6, 8, 4, 4, generator=g) * 0.5)
    diffusion = Diffusion(schedule, learn_sigma=True)
    t = torch.tensor([0, 5, 50, 300, 700, 999])
    terms = diffusion.training_losses(constant_model(out), x0, t=t, generator=g)
    (vlb_grad,) = torch.autograd.grad(terms["vlb"].sum(), out, retain_graph=True)
    (mse_grad,) = torch.autograd.grad(terms["mse"].sum(), out, retain_graph=True)
    (loss_grad,) = torch.autograd.grad(terms["loss"].sum(), out)
    assert vlb_grad[:, :4].abs().max() == 0 and vlb_grad[:, 4:].abs().max() > 0
    assert mse_grad[:, 4:].abs().max() == 0 and mse_grad[:, :4].abs().max() > 0
    torch.testing.assert_close(loss_grad[:, :4], mse_grad[:, :4])


def test_min_snr_loss_is_the_papers_in_every_space(schedule):
    """The paper's loss is min(SNR, gamma) times the x0 error; each parameterization's weighted loss must
    equal it (the weights themselves: tests/test_hand_worked_weights.py)."""
    gamma = 5.0
    g = torch.Generator().manual_seed(6)
    x0, noise = torch.randn(6, 4, 4, 4, generator=g), torch.randn(6, 4, 4, 4, generator=g)
    t = torch.tensor([0, 50, 200, 400, 700, 999])
    x_t = q_sample(schedule, x0, t, noise)
    snr_t = schedule.snr[t]
    for parameterization in ("eps", "x0", "v"):
        out = training_target(schedule, x0, t, noise, parameterization)
        out = out + 0.1 * torch.randn(x0.shape, generator=g)
        diffusion = Diffusion(schedule, parameterization=parameterization, min_snr_gamma=gamma)
        terms = diffusion.training_losses(constant_model(out), x0, t=t, noise=noise)
        x0_error = ((predict_x0(schedule, x_t, t, out, parameterization) - x0) ** 2).flatten(1).mean(1)
        paper_loss = torch.minimum(snr_t, torch.tensor(gamma)) * x0_error
        torch.testing.assert_close(terms["loss"], paper_loss, rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(terms["loss"], min_snr_weight(snr_t, gamma, parameterization) * terms["mse"])


def test_l1_loss(schedule):
    g = torch.Generator().manual_seed(9)
    x0, noise, out = (torch.randn(3, 4, 4, 4, generator=g) for _ in range(3))
    diffusion = Diffusion(schedule, loss="l1")
    terms = diffusion.training_losses(constant_model(out), x0, t=torch.tensor([0, 5, 900]), noise=noise)
    torch.testing.assert_close(terms["loss"], (out - noise).abs().flatten(1).mean(1))


def test_training_losses_deterministic_with_generator(schedule):
    x0 = torch.randn(4, 4, 8, 8)
    diffusion = Diffusion(schedule, parameterization="v")
    model = constant_model(torch.zeros(4, 4, 8, 8))
    a = diffusion.training_losses(model, x0, generator=torch.Generator().manual_seed(7))
    b = diffusion.training_losses(model, x0, generator=torch.Generator().manual_seed(7))
    c = diffusion.training_losses(model, x0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a["t"], b["t"]) and torch.equal(a["loss"], b["loss"])
    assert not torch.equal(a["t"], c["t"])


def test_bad_inputs(schedule):
    with pytest.raises(ValueError, match="parameterization"):
        Diffusion(schedule, parameterization="score")
    with pytest.raises(ValueError, match="zero-terminal"):
        Diffusion(NoiseSchedule(rescale_zero_terminal_snr(make_betas("ldm-linear"))), parameterization="eps")
    x0 = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="learn_sigma"):
        Diffusion(schedule, learn_sigma=True).training_losses(constant_model(torch.zeros(2, 4, 8, 8)), x0)
    with pytest.raises(ValueError, match="timesteps"):
        Diffusion(schedule).training_losses(constant_model(torch.zeros_like(x0)), x0, t=torch.tensor([0, 1000]))


def test_config_builds_diffusion():
    from common.config import from_dict

    config = from_dict(
        DiffusionConfig,
        {"schedule": {"kind": "cosine", "num_timesteps": 500}, "parameterization": "v", "min_snr_gamma": 5},
    )
    diffusion = Diffusion.from_config(config)
    assert diffusion.num_timesteps == 500 and diffusion.parameterization.name == "v"
    assert diffusion.min_snr_gamma == 5.0
    torch.testing.assert_close(diffusion.schedule.betas, make_betas("cosine", 500).float())


# ---------------------------------------------------------------- importance sampling


def test_importance_sampling_in_training_losses():
    schedule = NoiseSchedule(make_betas("ldm-linear", 10))
    diffusion = Diffusion(schedule, timestep_sampling="importance")
    x0 = torch.randn(8, 4, 2, 2)
    g = torch.Generator().manual_seed(0)
    model = constant_model(torch.zeros(8, 4, 2, 2))
    with torch.no_grad():  # evaluation passes do not feed the sampler
        diffusion.training_losses(model, x0, generator=g)
    assert diffusion.timestep_sampler.counts.sum() == 0
    while not diffusion.timestep_sampler.warmed_up:
        diffusion.training_losses(model, x0, generator=g)
    p = diffusion.timestep_sampler.probabilities()  # the call below draws from p, then updates it
    counts = diffusion.timestep_sampler.counts.sum().item()
    terms = diffusion.training_losses(model, x0, generator=g)
    assert diffusion.timestep_sampler.counts.sum().item() == counts  # full histories roll over
    assert not torch.equal(diffusion.timestep_sampler.probabilities(), p)
    torch.testing.assert_close(terms["weight"], (1 / (10 * p[terms["t"]])).float())
    torch.testing.assert_close(terms["loss"], terms["mse"] * terms["weight"])
    state = diffusion.state_dict()
    fresh = Diffusion(schedule, timestep_sampling="importance")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.timestep_sampler.history, diffusion.timestep_sampler.history)


# ---------------------------------------------------------------- tiny overfit


class TinyDenoiser(nn.Module):
    """An MLP over flattened 4x8x8 latents with a sinusoidal timestep embedding and a linear skip."""

    def __init__(self, out_channels=4, hidden=256):
        super().__init__()
        self.out_channels = out_channels
        self.register_buffer("freqs", torch.exp(-math.log(1000.0) * torch.arange(16) / 16))
        self.net = nn.Sequential(
            nn.Linear(4 * 64 + 32, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, out_channels * 64),
        )
        self.skip = nn.Linear(4 * 64, out_channels * 64)  # eps ~ x_t at high noise is then easy

    def forward(self, x, t):
        angles = t.float()[:, None] * self.freqs
        h = torch.cat([x.flatten(1), angles.cos(), angles.sin()], dim=1)
        return (self.net(h) + self.skip(x.flatten(1))).view(x.shape[0], self.out_channels, 8, 8)


# Ratio of the loss after 300 steps to before. With 4 latents x0 cannot be told apart at high
# noise, which leaves an irreducible error on x0 and (most) on v targets; eps has none there.
@pytest.mark.parametrize(
    "parameterization, learn_sigma, min_snr_gamma, max_ratio",
    [("eps", False, None, 0.35), ("v", False, 5.0, 0.5), ("x0", False, None, 0.25), ("eps", True, None, 0.35)],
)
def test_tiny_model_overfits(schedule, parameterization, learn_sigma, min_snr_gamma, max_ratio):
    torch.manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(10))
    model = TinyDenoiser(out_channels=8 if learn_sigma else 4)
    diffusion = Diffusion(
        schedule, parameterization=parameterization, learn_sigma=learn_sigma, min_snr_gamma=min_snr_gamma
    )
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)

    eval_x0 = latents.repeat(16, 1, 1, 1)
    eval_t = torch.linspace(0, T - 1, 64).long()
    eval_noise = torch.randn(eval_x0.shape, generator=torch.Generator().manual_seed(11))

    def evaluate():
        with torch.no_grad():
            terms = diffusion.training_losses(model, eval_x0, t=eval_t, noise=eval_noise)
        return terms["mse"].mean().item(), terms.get("vlb", torch.zeros(1)).mean().item()

    mse_before, vlb_before = evaluate()
    g = torch.Generator().manual_seed(12)
    for _ in range(300):
        loss = diffusion.training_losses(model, latents.repeat(8, 1, 1, 1), generator=g)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    mse_after, vlb_after = evaluate()
    assert mse_after < max_ratio * mse_before, (mse_before, mse_after)
    if learn_sigma:
        assert vlb_after < vlb_before, (vlb_before, vlb_after)


def test_learned_variance_trains_towards_the_posterior_variance(schedule):
    """With an exact mean, KL(q || p) is smallest at the posterior variance, i.e. v = -1."""
    x0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(13))
    var_logits = nn.Parameter(torch.zeros(T))
    diffusion = Diffusion(schedule, learn_sigma=True)

    def oracle(x_t, t):
        a = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return torch.cat([eps, var_logits[t].view(-1, 1, 1, 1).expand_as(eps)], dim=1)

    t = torch.tensor([1, 3, 10, 100, 999])  # at t = 999 the two bounds (nearly) coincide
    opt = torch.optim.Adam([var_logits], lr=0.05)
    g = torch.Generator().manual_seed(14)
    first = None
    for _ in range(100):
        terms = diffusion.training_losses(oracle, x0.expand(5, -1, -1, -1), t=t, generator=g)
        first = terms["vlb"].detach() if first is None else first
        opt.zero_grad()
        terms["loss"].sum().backward()
        opt.step()
    assert bool((terms["vlb"][:4] < first[:4] / 100).all()), (first, terms["vlb"])
    assert bool((var_logits[t[:4]] < -0.8).all()), var_logits[t]
    assert terms["vlb"].abs().max() < 1e-5
