"""Noise schedules (ldm/schedule.py): betas against closed forms and diffusers, zero terminal SNR,
derived buffers."""
import math

import pytest
import torch

from ldm.schedule import NoiseSchedule, ScheduleConfig, make_betas, rescale_zero_terminal_snr

from conftest import float64_tables

T = 1000

def test_ldm_linear_matches_closed_form():
    betas = make_betas("ldm-linear")
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    step = (math.sqrt(0.012) - math.sqrt(0.00085)) / (T - 1)
    for t in (0, 1, 500, 999):
        assert betas[t].item() == pytest.approx((math.sqrt(0.00085) + t * step) ** 2, rel=1e-12)
    assert betas[0].item() == pytest.approx(0.00085, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.012, rel=1e-12)
    s = NoiseSchedule(betas)
    expected_last = math.prod(1 - b for b in betas.tolist())
    assert s.alphas_cumprod[-1].item() == pytest.approx(expected_last, rel=1e-5)
    assert s.alphas_cumprod[0].item() == pytest.approx(1 - 0.00085, rel=1e-7)


def test_linear_and_cosine_match_closed_forms():
    lin = make_betas("linear", 100, 1e-4, 0.02)
    expected = torch.tensor([1e-4 + i * (0.02 - 1e-4) / 99 for i in range(100)], dtype=torch.float64)
    assert torch.allclose(lin, expected)

    s_ = 8e-3
    f = lambda t: math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2  # noqa: E731
    betas = make_betas("cosine")
    assert betas.max().item() == pytest.approx(0.999)  # the last step is clipped
    ab = NoiseSchedule(betas).alphas_cumprod
    for t in (0, 10, 500, 900, 990):
        assert ab[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5, abs=1e-9)
        assert betas[t].item() == pytest.approx(1 - f(t + 1) / f(t), rel=1e-9)


def test_zero_terminal_snr_rescale():
    betas = make_betas("ldm-linear")
    rescaled = rescale_zero_terminal_snr(betas)
    s_old, s_new = NoiseSchedule(betas), NoiseSchedule(rescaled)
    assert s_new.alphas_cumprod[-1].item() == 0.0 and s_new.snr[-1].item() == 0.0
    assert s_new.has_zero_terminal_snr and not s_old.has_zero_terminal_snr
    ab64_old = torch.cumprod(1 - betas, 0)
    ab64_new = torch.cumprod(1 - rescaled, 0)
    assert ab64_new[0].sqrt().item() == pytest.approx(ab64_old[0].sqrt().item(), rel=1e-12)
    assert ab64_new[-1].item() == 0.0
    # still a valid, monotone schedule with finite posterior tables; only 1/sqrt(a) blows up
    assert bool((s_new.alphas_cumprod[1:] < s_new.alphas_cumprod[:-1]).all())
    for name, table in s_new.buffers().items():
        if name.startswith("sqrt_recip"):
            assert torch.isinf(table[-1]) and torch.isfinite(table[:-1]).all(), name
        else:
            assert torch.isfinite(table).all(), name


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (dict(kind="ldm-linear"), dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
        (dict(kind="linear", linear_start=1e-4, linear_end=0.02), dict(beta_schedule="linear")),
        (dict(kind="cosine"), dict(beta_schedule="squaredcos_cap_v2")),
        (
            dict(kind="ldm-linear", zero_terminal_snr=True),
            dict(
                beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True
            ),
        ),
    ],
)
def test_alphas_cumprod_match_diffusers(ours, theirs):
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.DDPMScheduler(num_train_timesteps=T, **theirs)
    s = NoiseSchedule.from_config(ScheduleConfig(**ours))
    # diffusers works in float32 throughout, we in float64: equal up to float32 rounding.
    torch.testing.assert_close(s.alphas_cumprod, reference.alphas_cumprod.float(), rtol=1e-4, atol=1e-7)
    # betas are ratios of alpha-bars, so diffusers' float32 rounding shows more there
    torch.testing.assert_close(s.betas, reference.betas.float(), rtol=1e-4, atol=1e-6)


def test_snr_sigmas_and_buffers(schedule):
    betas, ab, ab_prev = float64_tables(make_betas("ldm-linear"))
    torch.testing.assert_close(schedule.snr, (ab / (1 - ab)).float())
    torch.testing.assert_close(schedule.sigmas, ((1 - ab) / ab).sqrt().float())
    assert bool((schedule.snr[1:] < schedule.snr[:-1]).all())
    torch.testing.assert_close(schedule.alphas_cumprod_prev, ab_prev.float())
    assert set(schedule.buffers()) == set(NoiseSchedule.CHECKPOINT_BUFFERS)
    assert all(v.dtype == torch.float32 and v.shape == (T,) for v in schedule.buffers().values())
    assert schedule.posterior_variance[0].item() == 0.0
    assert schedule.posterior_log_variance_clipped[0] == schedule.posterior_log_variance_clipped[1]


def test_schedule_bad_input():
    with pytest.raises(ValueError, match="quadratic"):
        make_betas("quadratic")
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule(torch.tensor([0.1, 1.5]))
