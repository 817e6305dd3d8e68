"""Gaussian diffusion: forward process, prediction targets and the training loss.

The forward process is q(x_t | x0) = N(sqrt(a_t) x0, (1 - a_t) I) with a_t = alphas_cumprod[t].
A network can predict one of three equivalent targets ("parameterization"):
    eps  the noise,            x_t = sqrt(a) x0 + sqrt(1 - a) eps
    x0   the clean sample,
    v    sqrt(a) eps - sqrt(1 - a) x0   (Salimans & Ho 2022; SD 2.x 768-v).
The pure functions below convert between them given (schedule, x_t, t); `Diffusion` combines
them into the training loss (L_simple, optional min-SNR weighting, optional learned variance
with improved DDPM's L_hybrid, optional importance sampling of t) and the reverse-step
Gaussian p(x_{t-1} | x_t) that the DDPM sampler needs.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from .schedule import NoiseSchedule, ScheduleConfig, values_at
from .timestep_sampler import LossSecondMomentSampler, UniformTimestepSampler
from .vlb import DecoderNLL, learned_log_variance, mean_flat, vlb_term

Parameterization = Literal["eps", "x0", "v"]
PARAMETERIZATIONS = ("eps", "x0", "v")


def _check_parameterization(parameterization: str) -> None:
    if parameterization not in PARAMETERIZATIONS:
        known = ", ".join(PARAMETERIZATIONS)
        raise ValueError(f"unknown parameterization {parameterization!r} (expected one of {known})")


def _signal_and_noise_scales(schedule: NoiseSchedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """sqrt(a_t) and sqrt(1 - a_t), each [B, 1, ..., 1]."""
    signal = values_at(schedule.sqrt_alphas_cumprod, t, like)
    return signal, values_at(schedule.sqrt_one_minus_alphas_cumprod, t, like)


def q_sample(schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """Draw x_t ~ q(x_t | x0) with the given noise: sqrt(a) x0 + sqrt(1 - a) noise. All [B, ...]."""
    signal, sigma = _signal_and_noise_scales(schedule, t, x0)
    return signal * x0 + sigma * noise


def training_target(
    schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor, parameterization: Parameterization
) -> Tensor:
    """What the network should output for x_t = q_sample(x0, t, noise) [B, ...]."""
    _check_parameterization(parameterization)
    if parameterization == "eps":
        return noise
    if parameterization == "x0":
        return x0
    signal, sigma = _signal_and_noise_scales(schedule, t, x0)
    return signal * noise - sigma * x0


def predict_x0(
    schedule: NoiseSchedule, x_t: Tensor, t: Tensor, out: Tensor, parameterization: Parameterization
) -> Tensor:
    """The clean sample implied by the network output `out` at (x_t, t). All [B, ...]."""
    _check_parameterization(parameterization)
    if parameterization == "x0":
        return out
    if parameterization == "eps":
        # (x_t - sqrt(1 - a) eps) / sqrt(a), written with the precomputed reciprocals.
        recip = values_at(schedule.sqrt_recip_alphas_cumprod, t, x_t)
        recipm1 = values_at(schedule.sqrt_recipm1_alphas_cumprod, t, x_t)
        return recip * x_t - recipm1 * out
    signal, sigma = _signal_and_noise_scales(schedule, t, x_t)
    return signal * x_t - sigma * out


def predict_eps(
    schedule: NoiseSchedule, x_t: Tensor, t: Tensor, out: Tensor, parameterization: Parameterization
) -> Tensor:
    """The noise implied by the network output `out` at (x_t, t). All [B, ...]."""
    _check_parameterization(parameterization)
    if parameterization == "eps":
        return out
    signal, sigma = _signal_and_noise_scales(schedule, t, x_t)
    if parameterization == "x0":
        return (x_t - signal * out) / sigma
    return signal * out + sigma * x_t


def predict_v(
    schedule: NoiseSchedule, x_t: Tensor, t: Tensor, out: Tensor, parameterization: Parameterization
) -> Tensor:
    """The velocity sqrt(a) eps - sqrt(1 - a) x0 implied by `out` at (x_t, t). All [B, ...]."""
    if parameterization == "v":
        return out
    eps = predict_eps(schedule, x_t, t, out, parameterization)
    x0 = predict_x0(schedule, x_t, t, out, parameterization)
    signal, sigma = _signal_and_noise_scales(schedule, t, x_t)
    return signal * eps - sigma * x0


def q_posterior_mean_variance(
    schedule: NoiseSchedule, x0: Tensor, x_t: Tensor, t: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean [B, ...], variance [B, 1, ...] and clipped log-variance [B, 1, ...] of q(x_{t-1} | x_t, x0)."""
    coef_x0 = values_at(schedule.posterior_mean_coef1, t, x_t)
    coef_xt = values_at(schedule.posterior_mean_coef2, t, x_t)
    mean = coef_x0 * x0 + coef_xt * x_t
    variance = values_at(schedule.posterior_variance, t, x_t)
    log_variance = values_at(schedule.posterior_log_variance_clipped, t, x_t)
    return mean, variance, log_variance


def min_snr_weight(snr: Tensor, gamma: float, parameterization: Parameterization) -> Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023) for a per-sample SNR [B].

    The paper weights the x0-space error by min(SNR, gamma). Since
    |eps - eps^|^2 = SNR |x0 - x0^|^2 and |v - v^|^2 = (SNR + 1) |x0 - x0^|^2, the same
    weighting in eps- and v-space is min(SNR, gamma) / SNR and min(SNR, gamma) / (SNR + 1).
    """
    _check_parameterization(parameterization)
    if gamma <= 0:
        raise ValueError(f"min_snr_gamma must be positive, got {gamma}")
    clipped = snr.clamp(max=gamma)
    if parameterization == "x0":
        return clipped
    if parameterization == "eps":
        # == min(SNR, gamma) / SNR, but also finite (1) where SNR is 0 (zero terminal SNR).
        return (gamma / snr).clamp(max=1.0)
    return clipped / (snr + 1)


@dataclass
class DiffusionConfig:
    """Config section for the diffusion process and its training loss."""

    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parameterization: Parameterization = "eps"
    loss: Literal["l2", "l1"] = "l2"
    min_snr_gamma: float | None = None  # 5.0 is the paper's choice
    learn_sigma: bool = False
    vlb_weight: float = 0.001
    decoder_nll: DecoderNLL = "gaussian"  # "discretized" only for 8-bit pixel data in [-1, 1]
    timestep_sampling: Literal["uniform", "importance"] = "uniform"
    fixed_variance: Literal["small", "large"] = "small"  # when learn_sigma is False


class Diffusion:
    """Training loss and reverse-step Gaussian of a discrete Gaussian diffusion.

    Args:
        schedule: the noise schedule.
        parameterization: what the network predicts, "eps", "x0" or "v".
        loss: "l2" (L_simple, mean squared error) or "l1" (mean absolute error).
        min_snr_gamma: if set, weight the simple loss with min-SNR-gamma.
        learn_sigma: the network outputs 2 C channels; the second half sets the variance
            of p(x_{t-1} | x_t) (see `vlb.learned_log_variance`) and is trained by L_vlb.
        vlb_weight: lambda of L_hybrid = L_simple + lambda L_vlb (improved DDPM: 0.001).
            L_vlb = sum over t of L_t, estimated per sample as T * L_t, so with T = 1000 the
            per-sample vlb contribution is exactly L_t.
        decoder_nll: the t = 0 term of L_vlb; "gaussian" (continuous latents) or
            "discretized" (8-bit data in [-1, 1]). See `vlb.vlb_term`.
        timestep_sampling: "uniform" or "importance" (improved DDPM's loss-second-moment
            resampler; losses are then weighted by 1 / (T p(t))).
        fixed_variance: variance of p(x_{t-1} | x_t) when not learned: "small" is the posterior
            variance beta~_t, "large" is beta_t (with beta~_1 at t = 0).
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        parameterization: Parameterization = "eps",
        loss: Literal["l2", "l1"] = "l2",
        min_snr_gamma: float | None = None,
        learn_sigma: bool = False,
        vlb_weight: float = 0.001,
        decoder_nll: DecoderNLL = "gaussian",
        timestep_sampling: Literal["uniform", "importance"] = "uniform",
        fixed_variance: Literal["small", "large"] = "small",
    ):
        _check_parameterization(parameterization)
        if loss not in ("l2", "l1"):
            raise ValueError(f"unknown loss {loss!r} (expected 'l2' or 'l1')")
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be positive or None, got {min_snr_gamma}")
        if decoder_nll not in ("gaussian", "discretized"):
            raise ValueError(f"unknown decoder_nll {decoder_nll!r} (expected 'gaussian' or 'discretized')")
        if fixed_variance not in ("small", "large"):
            raise ValueError(f"unknown fixed_variance {fixed_variance!r} (expected 'small' or 'large')")
        if schedule.has_zero_terminal_snr and parameterization == "eps":
            raise ValueError(
                "a zero-terminal-SNR schedule needs parameterization 'v' or 'x0' (eps gives no x0 at t = T-1)"
            )
        self.schedule = schedule
        self.parameterization = parameterization
        self.loss = loss
        self.min_snr_gamma = min_snr_gamma
        self.learn_sigma = learn_sigma
        self.vlb_weight = vlb_weight
        self.decoder_nll = decoder_nll
        self.fixed_variance = fixed_variance
        if timestep_sampling == "uniform":
            self.timestep_sampler = UniformTimestepSampler(schedule.num_timesteps)
        elif timestep_sampling == "importance":
            self.timestep_sampler = LossSecondMomentSampler(schedule.num_timesteps)
        else:
            raise ValueError(
                f"unknown timestep_sampling {timestep_sampling!r} (expected 'uniform' or 'importance')"
            )

    @classmethod
    def from_config(cls, config: DiffusionConfig) -> Diffusion:
        """Build the schedule and the diffusion a `DiffusionConfig` describes."""
        return cls(
            NoiseSchedule.from_config(config.schedule),
            parameterization=config.parameterization,
            loss=config.loss,
            min_snr_gamma=config.min_snr_gamma,
            learn_sigma=config.learn_sigma,
            vlb_weight=config.vlb_weight,
            decoder_nll=config.decoder_nll,
            timestep_sampling=config.timestep_sampling,
            fixed_variance=config.fixed_variance,
        )

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def to(self, device: torch.device | str) -> Diffusion:
        """Move the schedule tables to `device` (the sampler state stays on the CPU); returns self."""
        self.schedule.to(device)
        return self

    def training_losses(
        self,
        model_fn: Callable[..., Tensor],
        x0: Tensor,
        model_kwargs: dict | None = None,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample training losses for a batch of clean latents x0 [B, C, ...].

        `model_fn(x_t, t, **model_kwargs)` returns [B, C, ...] ([B, 2C, ...] with learn_sigma).
        t [B] and noise [B, C, ...] are drawn (with `generator`, if given) when not passed; only
        then does importance sampling apply, and it learns from the losses when grad is enabled.

        Returns a dict of [B] tensors:
            "loss"   what to average and backpropagate (weighted simple loss + vlb part,
                     times the importance weight)
            "mse"    the unweighted simple loss (mean absolute error when loss="l1")
            "vlb"    L_t in bits per dim (only with learn_sigma; gradient reaches the
                     variance output only)
            "t"      the timesteps, "weight" the importance weights 1 / (T p(t)).
        """
        batch, channels = x0.shape[:2]
        sampled_t = t is None
        if sampled_t:
            t, weight = self.timestep_sampler.sample(batch, x0.device, generator)
        else:
            t = torch.as_tensor(t, device=x0.device).long()
            if t.shape != (batch,):
                raise ValueError(f"t must have shape [{batch}], got {tuple(t.shape)}")
            if bool((t < 0).any()) or bool((t >= self.num_timesteps).any()):
                raise ValueError(f"timesteps must lie in [0, {self.num_timesteps - 1}]")
            weight = torch.ones(batch, device=x0.device)
        if noise is None:
            device = generator.device if generator is not None else x0.device
            noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype).to(x0.device)
        elif noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} does not match x0 shape {tuple(x0.shape)}")

        x_t = q_sample(self.schedule, x0, t, noise)
        out = model_fn(x_t, t, **(model_kwargs or {}))
        expected = (batch, 2 * channels if self.learn_sigma else channels, *x0.shape[2:])
        if tuple(out.shape) != expected:
            hint = " (learn_sigma needs twice the input channels)" if self.learn_sigma else ""
            raise ValueError(f"model output has shape {tuple(out.shape)}, expected {expected}{hint}")
        model_out, var_values = out.split(channels, dim=1) if self.learn_sigma else (out, None)

        target = training_target(self.schedule, x0, t, noise, self.parameterization)
        error = model_out.float() - target.float()
        simple = mean_flat(error**2 if self.loss == "l2" else error.abs())
        loss = simple
        if self.min_snr_gamma is not None:
            snr = self.schedule.snr.to(t.device)[t]
            loss = loss * min_snr_weight(snr, self.min_snr_gamma, self.parameterization)
        terms = {"mse": simple, "t": t}

        if self.learn_sigma:
            # Stop-gradient on the mean: L_vlb only trains the variance, L_simple the mean.
            frozen = torch.cat([model_out.detach(), var_values], dim=1)
            vlb = self._vlb(frozen, x0, x_t, t)
            terms["vlb"] = vlb
            loss = loss + self.vlb_weight * self.num_timesteps * vlb

        if sampled_t and torch.is_grad_enabled():
            # Only training steps feed the importance sampler: an evaluation pass under no_grad
            # (perhaps on one rank only, where a collective would hang) leaves its history alone.
            self.timestep_sampler.update(t, loss.detach())
        terms["weight"] = weight
        terms["loss"] = loss * weight
        return terms

    def _vlb(self, model_out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """L_t in bits per dim [B] for a [B, 2C, ...] model output."""
        pred = self.p_mean_variance(model_out, x_t, t)
        true_mean, _, true_log_variance = q_posterior_mean_variance(self.schedule, x0.float(), x_t.float(), t)
        return vlb_term(
            x0.float(), t, true_mean, true_log_variance, pred["mean"], pred["log_variance"], self.decoder_nll
        )

    def p_mean_variance(
        self, model_out: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool = False
    ) -> dict[str, Tensor]:
        """The Gaussian p(x_{t-1} | x_t) given the network output at (x_t, t).

        model_out [B, C, ...] ([B, 2C, ...] with learn_sigma), x_t [B, C, ...], t [B].
        clip_denoised clamps the predicted x0 to [-1, 1] (pixel data; not for latents).
        Returns "mean" [B, C, ...], "variance" and "log_variance" (broadcastable to x_t),
        "pred_x0" and "pred_eps" [B, C, ...]. All computed in float32.
        """
        x_t = x_t.float()
        model_out = model_out.float()
        channels = x_t.shape[1]
        if self.learn_sigma:
            if model_out.shape[1] != 2 * channels:
                raise ValueError(
                    f"learn_sigma: model output has {model_out.shape[1]} channels, expected {2 * channels}"
                )
            model_out, var_values = model_out.split(channels, dim=1)
            log_variance = learned_log_variance(self.schedule, var_values, t)
        elif self.fixed_variance == "small":
            log_variance = values_at(self.schedule.posterior_log_variance_clipped, t, x_t)
        else:
            # beta_t, except at t = 0 where beta~_1 keeps the last step's variance sensible.
            large = torch.cat([self.schedule.posterior_variance[1:2], self.schedule.betas[1:]])
            log_variance = values_at(large.log(), t, x_t)
        pred_x0 = predict_x0(self.schedule, x_t, t, model_out, self.parameterization)
        pred_eps = predict_eps(self.schedule, x_t, t, model_out, self.parameterization)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _, _ = q_posterior_mean_variance(self.schedule, pred_x0, x_t, t)
        return {
            "mean": mean,
            "variance": log_variance.exp(),
            "log_variance": log_variance,
            "pred_x0": pred_x0,
            "pred_eps": pred_eps,
        }

    def state_dict(self) -> dict:
        """Timestep-sampler state (importance-sampling history) for the training checkpoint."""
        return {"timestep_sampler": self.timestep_sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "timestep_sampler" not in state:
            raise ValueError(f"diffusion state needs key 'timestep_sampler', got {sorted(state)}")
        self.timestep_sampler.load_state_dict(state["timestep_sampler"])
