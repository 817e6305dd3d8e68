"""Variational-bound terms for a learned reverse-process variance (improved DDPM).

The U-Net predicts, besides the mean, a value v in [-1, 1] per element that interpolates the
log-variance of p(x_{t-1} | x_t) between the two natural bounds: the posterior variance
beta~_t (lower) and beta_t (upper). Only the vlb term trains v; the paper's L_hybrid adds it
with a small weight to L_simple.

All log-likelihoods here are elementwise in nats; `vlb_term` averages them per sample and
converts to bits per dimension.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from .schedule import NoiseSchedule, values_at

DecoderNLL = Literal["gaussian", "discretized"]


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch: [B, ...] -> [B]."""
    return x.flatten(1).mean(dim=1)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    variance_ratio = torch.exp(logvar1 - logvar2)
    return 0.5 * (logvar2 - logvar1 + variance_ratio + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def gaussian_nll(x: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """-log N(x; mean, exp(logvar)), elementwise, in nats (a density: can be negative)."""
    return 0.5 * (math.log(2 * math.pi) + logvar + (x - mean) ** 2 * torch.exp(-logvar))


def discretized_gaussian_nll(x: Tensor, mean: Tensor, logvar: Tensor, num_bins: int = 256) -> Tensor:
    """-log P(x) for data quantised to `num_bins` levels spread over [-1, 1], elementwise, nats.

    P is the Gaussian mass of the bin around x; the outermost bins extend to -inf / +inf
    (DDPM's decoder for 8-bit images).
    """
    half_bin = 1.0 / (num_bins - 1)
    inv_std = torch.exp(-0.5 * logvar)
    upper = (x - mean + half_bin) * inv_std
    lower = (x - mean - half_bin) * inv_std
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_one_minus_cdf_lower = torch.special.log_ndtr(-lower)
    mass = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12)
    edge = 1.0 - half_bin / 2
    log_prob = torch.where(
        x < -edge, log_cdf_upper, torch.where(x > edge, log_one_minus_cdf_lower, torch.log(mass))
    )
    return -log_prob


def learned_log_variance(schedule: NoiseSchedule, var_values: Tensor, t: Tensor) -> Tensor:
    """Log-variance of p(x_{t-1} | x_t) from the model's variance output.

    var_values [B, C, ...] in roughly [-1, 1]: frac = (v + 1) / 2 mixes
    log beta_t (frac = 1) and the clipped log posterior variance (frac = 0).
    """
    min_log = values_at(schedule.posterior_log_variance_clipped, t, var_values)
    max_log = values_at(schedule.log_betas, t, var_values)
    frac = (var_values + 1) / 2
    return frac * max_log + (1 - frac) * min_log


def vlb_term(
    x0: Tensor,
    t: Tensor,
    true_mean: Tensor,
    true_log_variance: Tensor,
    model_mean: Tensor,
    model_log_variance: Tensor,
    decoder_nll: DecoderNLL = "gaussian",
) -> Tensor:
    """One term L_t of the variational bound per sample, in bits per dimension [B].

    For t > 0: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) between the true posterior
    (true_mean, true_log_variance) and the model's Gaussian.
    For t = 0: the decoder NLL -log p(x0 | x_1). "discretized" is DDPM's 8-bit image decoder
    and is only meaningful for data on the 256-level grid in [-1, 1]. Latents are continuous,
    so "gaussian" uses the plain Gaussian density instead; it is a density (not a probability),
    so this term can be negative, yet its optimum is still the true mean and variance.
    """
    kl = mean_flat(normal_kl(true_mean, true_log_variance, model_mean, model_log_variance)) / math.log(2.0)
    if decoder_nll == "gaussian":
        nll = gaussian_nll(x0, model_mean, model_log_variance)
    elif decoder_nll == "discretized":
        nll = discretized_gaussian_nll(x0, model_mean, model_log_variance)
    else:
        raise ValueError(f"unknown decoder_nll {decoder_nll!r} (expected 'gaussian' or 'discretized')")
    nll = mean_flat(nll) / math.log(2.0)
    return torch.where(t == 0, nll, kl)
