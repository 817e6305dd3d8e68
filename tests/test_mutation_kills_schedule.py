"""Noise-schedule behaviour the mutation run (make mutation) found untested: the posterior tables against
Gaussian conditioning, the reconstruction identities of the derived tables, float64 arithmetic for any
input dtype, input validation at its boundaries, `values_at`, `to` and the repr."""
import math

import pytest
import torch

from ldm.schedule import NoiseSchedule, ScheduleConfig, make_betas, rescale_zero_terminal_snr, values_at


def _posterior_by_conditioning(ab_prev: float, beta: float) -> tuple[float, float, float]:
    """q(x_{t-1} | x_t, x_0) from the joint Gaussian of (x_{t-1}, x_t) given x_0:
    x_{t-1} = sqrt(ab_prev) x_0 + sqrt(1 - ab_prev) e1,  x_t = sqrt(1 - beta) x_{t-1} + sqrt(beta) e2.
    Returns (coefficient of x_0, coefficient of x_t, variance) of the conditional mean / variance."""
    a = 1 - beta
    var_prev = 1 - ab_prev                      # Var(x_{t-1} | x_0)
    var_t = a * var_prev + beta                 # Var(x_t | x_0)
    cov = math.sqrt(a) * var_prev               # Cov(x_{t-1}, x_t | x_0)
    coef_xt = cov / var_t
    mean_prev, mean_t = math.sqrt(ab_prev), math.sqrt(ab_prev * a)  # E[. | x_0] per unit x_0
    return mean_prev - coef_xt * mean_t, coef_xt, var_prev - cov * cov / var_t


@pytest.mark.parametrize("kind", ["ldm-linear", "cosine"])
def test_posterior_tables_are_gaussian_conditioning(kind):
    betas = make_betas(kind, 50)
    s = NoiseSchedule(betas)
    ab_prev = 1.0
    for t, beta in enumerate(betas.tolist()):
        coef1, coef2, var = _posterior_by_conditioning(ab_prev, beta)
        assert s.posterior_mean_coef1[t].item() == pytest.approx(coef1, rel=1e-5, abs=1e-7), t
        assert s.posterior_mean_coef2[t].item() == pytest.approx(coef2, rel=1e-5, abs=1e-7), t
        assert s.posterior_variance[t].item() == pytest.approx(var, rel=1e-5, abs=1e-9), t
        if t > 0:
            assert s.posterior_log_variance_clipped[t].item() == pytest.approx(math.log(var), rel=1e-5), t
        ab_prev *= 1 - beta


def test_derived_tables_invert_the_forward_process():
    """x_t = sqrt(a) x0 + sqrt(1 - a) eps, and x0 = sqrt(1/a) x_t - sqrt(1/a - 1) eps back."""
    s = NoiseSchedule(make_betas("linear", 40, 1e-3, 0.2))
    x0, eps = torch.randn(40, generator=torch.Generator().manual_seed(0)), torch.randn(40)
    xt = s.sqrt_alphas_cumprod * x0 + s.sqrt_one_minus_alphas_cumprod * eps
    torch.testing.assert_close(s.sqrt_recip_alphas_cumprod * xt - s.sqrt_recipm1_alphas_cumprod * eps, x0,
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s.sqrt_alphas_cumprod**2 + s.sqrt_one_minus_alphas_cumprod**2, torch.ones(40))
    torch.testing.assert_close(s.log_one_minus_alphas_cumprod.exp(), 1 - s.alphas_cumprod)
    torch.testing.assert_close(s.log_betas.exp(), s.betas)
    # sqrt(1/a - 1) is k-diffusion's sigma
    torch.testing.assert_close(s.sqrt_recipm1_alphas_cumprod, s.sigmas)


def test_tables_are_computed_in_float64_whatever_the_input_dtype():
    # 1 - 1e-9 is 1.0 in float32: only float64 arithmetic keeps sigma_0 = sqrt(1e-9 / (1 - 1e-9)).
    s = NoiseSchedule(torch.tensor([1e-9, 0.5], dtype=torch.float32))
    assert s.sigmas[0].item() == pytest.approx(math.sqrt(1e-9), rel=1e-4)
    assert NoiseSchedule([1e-9, 0.5]).sigmas[0].item() == pytest.approx(math.sqrt(1e-9), rel=1e-4)
    rescaled = rescale_zero_terminal_snr(torch.tensor([1e-9, 0.1, 0.2], dtype=torch.float32))
    assert rescaled.dtype == torch.float64


def test_cosine_offset_reaches_the_schedule_from_a_config():
    s_ = 0.05
    f = lambda t: math.cos((t / 10 + s_) / (1 + s_) * math.pi / 2) ** 2  # noqa: E731
    s = NoiseSchedule.from_config(ScheduleConfig(kind="cosine", num_timesteps=10, cosine_s=s_))
    for t in (0, 4, 8):
        assert s.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5)


def test_validation_boundaries():
    assert make_betas("ldm-linear", 1).tolist() == pytest.approx([0.00085])  # one step is a schedule
    with pytest.raises(ValueError, match="^num_timesteps must be positive, got 0$"):
        make_betas("linear", 0)
    with pytest.raises(ValueError, match=r"\(expected one of ldm-linear, linear, cosine\)$"):
        make_betas("quadratic")
    NoiseSchedule(torch.tensor([0.1, 0.2]))  # two steps is enough
    NoiseSchedule(torch.tensor([0.1, 0.3, 1.0]))  # only the last beta may be 1
    with pytest.raises(ValueError, match=r"^betas must be a 1-D tensor of at least 2 steps, got shape \(1,\)$"):
        NoiseSchedule(torch.tensor([0.1]))
    with pytest.raises(ValueError, match=r"got shape \(2, 2\)$"):
        NoiseSchedule(torch.tensor([[0.1, 0.2], [0.1, 0.2]]))
    for betas in ([0.0, 0.1], [1.0, 0.5], [0.1, 1.0, 0.2], [0.1, 2.0, 0.2]):
        with pytest.raises(ValueError, match=r"^betas must lie in \(0, 1\), only the last one may equal 1$"):
            NoiseSchedule(torch.tensor(betas))


def test_values_at_picks_rows_broadcasts_and_follows_t():
    table = torch.arange(10, dtype=torch.float32) * 0.5
    like = torch.zeros(3, 2, 4, 4, dtype=torch.float64)
    out = values_at(table, torch.tensor([0, 9, 4]), like)
    assert out.shape == (3, 1, 1, 1) and out.dtype == torch.float64
    assert out.flatten().tolist() == [0.0, 4.5, 2.0]
    assert values_at(table, torch.tensor([7]), torch.zeros(1, 5)).shape == (1, 1)
    # the table moves to t's device (meta here: the only second device of a CPU-only machine)
    on_meta = values_at(table, torch.tensor([1, 2], device="meta"), torch.zeros(2, 3, device="meta"))
    assert on_meta.device.type == "meta" and on_meta.shape == (2, 1)


def test_to_moves_every_table_and_returns_the_schedule():
    s = NoiseSchedule(make_betas("linear", 8))
    assert s.to("meta") is s and s.device.type == "meta"
    for name in NoiseSchedule.CHECKPOINT_BUFFERS + NoiseSchedule.EXTRA_TABLES:
        assert getattr(s, name).device.type == "meta", name


def test_repr_names_length_first_and_last_beta_and_final_alpha_bar():
    betas = make_betas("linear", 100, 1e-4, 0.02)
    last_alpha_bar = math.prod(1 - b for b in betas.tolist())
    assert repr(NoiseSchedule(betas)) == f"NoiseSchedule(T=100, betas 0.0001..0.02, alpha_bar[-1]={last_alpha_bar:.3g})"
