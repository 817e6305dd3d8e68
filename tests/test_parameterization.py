"""The prediction parameterizations (ldm/parameterization.py) against closed forms worked out in float64."""
import math

import pytest
import torch

from ldm.parameterization import NoiseScales, parameterization

KINDS = ["eps", "x0", "v"]

# A hand-worked point: a = 0.64, so sqrt(a) = 0.8 and sqrt(1 - a) = 0.6. With x0 = 1.0 and eps = 0.5:
# x_t = 0.8 * 1.0 + 0.6 * 0.5 = 1.1 and v = 0.8 * 0.5 - 0.6 * 1.0 = -0.2.
A, X0, EPS, X_T = 0.64, 1.0, 0.5, 1.1
TARGETS = {"eps": 0.5, "x0": 1.0, "v": -0.2}


def scalar(value):
    return torch.tensor([value], dtype=torch.float64)


@pytest.mark.parametrize("kind", KINDS)
def test_target_at_a_hand_worked_point(kind):
    target = parameterization(kind).target(scalar(X0), scalar(EPS), A)
    assert target.item() == pytest.approx(TARGETS[kind], abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_to_eps_x0_at_a_hand_worked_point(kind):
    eps, x0 = parameterization(kind).to_eps_x0(scalar(TARGETS[kind]), scalar(X_T), A)
    assert eps.item() == pytest.approx(EPS, abs=1e-12) and x0.item() == pytest.approx(X0, abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_conversions_against_closed_forms_per_sample(kind):
    """Random states with a per-sample alpha_bar [B, 1, 1, 1], also between table entries."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 2, 3, 3, generator=g, dtype=torch.float64).unbind(0)
    a = torch.tensor([0.999, 0.5, 0.0471, 1e-3], dtype=torch.float64).view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    expected = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[kind]
    p = parameterization(kind)
    torch.testing.assert_close(p.target(x0, eps, a), expected, rtol=1e-12, atol=1e-12)
    got_eps, got_x0 = p.to_eps_x0(expected, x_t, a)
    torch.testing.assert_close(got_eps, eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got_x0, x0, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("alpha_bar", [0.9, 0.25, torch.tensor([[[[0.3]]], [[[0.97]]]], dtype=torch.float64)])
def test_round_trip(kind, alpha_bar):
    g = torch.Generator().manual_seed(1)
    out, x_t = torch.randn(2, 2, 3, 4, 4, generator=g, dtype=torch.float64).unbind(0)
    p = parameterization(kind)
    torch.testing.assert_close(p.from_eps_x0(*p.to_eps_x0(out, x_t, alpha_bar), alpha_bar), out,
                               rtol=1e-12, atol=1e-12)


def test_precomputed_scales_give_the_same_conversions():
    """`NoiseScales` from tables (with reciprocals for x0 from eps) against the plain alpha_bar path."""
    a = 0.3
    scales = NoiseScales(math.sqrt(a), math.sqrt(1 - a), 1 / math.sqrt(a), math.sqrt(1 / a - 1))
    g = torch.Generator().manual_seed(2)
    out, x_t = torch.randn(2, 5, generator=g, dtype=torch.float64).unbind(0)
    for kind in KINDS:
        for got, expected in zip(parameterization(kind).to_eps_x0(out, x_t, scales),
                                 parameterization(kind).to_eps_x0(out, x_t, a)):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("snr, gamma, weights", [
    # x0: min(SNR, gamma); eps: min(SNR, gamma) / SNR; v: min(SNR, gamma) / (SNR + 1).
    (4.0, 5.0, {"x0": 4.0, "eps": 1.0, "v": 4 / 5}),
    (10.0, 5.0, {"x0": 5.0, "eps": 0.5, "v": 5 / 11}),
    (1.0, 5.0, {"x0": 1.0, "eps": 1.0, "v": 1 / 2}),
    (0.0, 5.0, {"x0": 0.0, "eps": 1.0, "v": 0.0}),  # zero terminal SNR: eps stays finite
])
def test_min_snr_weights_hand_worked(snr, gamma, weights):
    for kind, expected in weights.items():
        got = parameterization(kind).min_snr_weight(torch.tensor([snr], dtype=torch.float64), gamma)
        assert got.item() == pytest.approx(expected, abs=1e-12), kind


def test_lookup():
    assert [parameterization(k).name for k in KINDS] == KINDS
    v = parameterization("v")
    assert parameterization(v) is v and parameterization("v") is v
    assert not parameterization("eps").defined_at_zero_snr and parameterization("v").defined_at_zero_snr
    with pytest.raises(ValueError, match=r"unknown parameterization 'score' \(expected one of eps, x0, v\)"):
        parameterization("score")
