"""Gaussian diffusion: forward process, prediction targets and the training loss.

The forward process is q(x_t | x0) = N(sqrt(a_t) x0, (1 - a_t) I) with a_t = alphas_cumprod[t].
What the network predicts (eps, x0 or v) is a `ldm.parameterization.Parameterization`; the pure
functions below apply it at integer timesteps with the schedule's precomputed tables. `Diffusion`
combines them into the training loss (L_simple, optional min-SNR weighting, optional learned variance
with improved DDPM's L_hybrid, optional importance sampling of t) and the reverse-step
Gaussian p(x_{t-1} | x_t) that the DDPM sampler needs.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Literal

import torch
from torch import Tensor

from common.randomness import Generators, randn_like

from .parameterization import NoiseScales, Parameterization, ParameterizationName
from .parameterization import parameterization as as_parameterization
from .schedule import NoiseSchedule, ScheduleConfig, values_at
from .timestep_sampler import LossSecondMomentSampler, UniformTimestepSampler
from .vlb import DecoderNLL, learned_log_variance, mean_flat, vlb_term

MinSnrVariant = Literal["paper", "plus-one"]


def table_scales(schedule: NoiseSchedule, t: Tensor, like: Tensor) -> NoiseScales:
    """The schedule's sqrt(a_t), sqrt(1 - a_t) and reciprocals at timesteps t [B], each [B, 1, ..., 1]."""
    return NoiseScales(*(values_at(table, t, like) for table in (
        schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod,
        schedule.sqrt_recip_alphas_cumprod, schedule.sqrt_recipm1_alphas_cumprod)))


def q_sample(schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """Draw x_t ~ q(x_t | x0) with the given noise: sqrt(a) x0 + sqrt(1 - a) noise. All [B, ...]."""
    signal = values_at(schedule.sqrt_alphas_cumprod, t, x0)
    return signal * x0 + values_at(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise


def training_target(schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor,
                    parameterization: str | Parameterization) -> Tensor:
    """What the network should output for x_t = q_sample(x0, t, noise) [B, ...]."""
    return as_parameterization(parameterization).target(x0, noise, table_scales(schedule, t, x0))


def predict_x0(schedule: NoiseSchedule, x_t: Tensor, t: Tensor, out: Tensor,
               parameterization: str | Parameterization) -> Tensor:
    """The clean sample implied by the network output `out` at (x_t, t). All [B, ...]."""
    return as_parameterization(parameterization).to_eps_x0(out, x_t, table_scales(schedule, t, x_t))[1]


def predict_eps(schedule: NoiseSchedule, x_t: Tensor, t: Tensor, out: Tensor,
                parameterization: str | Parameterization) -> Tensor:
    """The noise implied by the network output `out` at (x_t, t). All [B, ...]."""
    return as_parameterization(parameterization).to_eps_x0(out, x_t, table_scales(schedule, t, x_t))[0]


def predict_v(schedule: NoiseSchedule, x_t: Tensor, t: Tensor, out: Tensor,
              parameterization: str | Parameterization) -> Tensor:
    """The velocity sqrt(a) eps - sqrt(1 - a) x0 implied by `out` at (x_t, t). All [B, ...]."""
    scales = table_scales(schedule, t, x_t)
    eps, x0 = as_parameterization(parameterization).to_eps_x0(out, x_t, scales)
    return as_parameterization("v").from_eps_x0(eps, x0, scales)


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


def min_snr_weight(snr: Tensor, gamma: float, parameterization: str | Parameterization,
                   variant: MinSnrVariant = "paper", floor: float = 0.0) -> Tensor:
    """Min-SNR-gamma loss weight [B] for a per-sample SNR [B] (see `Parameterization.min_snr_weight`).

    variant "plus-one" (v only) is diffusers' reading for v: min(SNR + 1, gamma) / (SNR + 1), which is 1
    rather than 0 at zero SNR. `floor` is the least weight any timestep gets. Both exist because with
    zero terminal SNR the paper's v weight, min(SNR, gamma) / (SNR + 1), is exactly 0 at the last step
    and below 0.01 for the noisiest 16% of a linear schedule's steps.
    """
    kind = as_parameterization(parameterization)
    if gamma <= 0:
        raise ValueError(f"min_snr_gamma must be positive, got {gamma}")
    _check_choice("min_snr_variant", variant, ("paper", "plus-one"))
    if variant == "plus-one":
        if kind.name != "v":
            raise ValueError(f"min_snr_variant 'plus-one' is for v prediction, not {kind.name!r}")
        weight = (snr + 1).clamp(max=gamma) / (snr + 1)
    else:
        weight = kind.min_snr_weight(snr, gamma)
    if not 0 <= floor <= 1:
        raise ValueError(f"min_snr_floor must be in [0, 1], got {floor}")
    return weight.clamp(min=floor) if floor else weight


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r} (expected {' or '.join(repr(c) for c in choices)})")


@dataclass
class DiffusionConfig:
    """Config section for the diffusion process and its training loss."""

    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parameterization: ParameterizationName = "eps"
    loss: Literal["l2", "l1"] = "l2"
    min_snr_gamma: float | None = None  # 5.0 is the paper's choice
    # "plus-one" (v only, see `min_snr_weight`) and a floor both trained the shapes recipe worse than the
    # paper's weight (bench/RESULTS.md, "Issue 24 by measurement"); they stay for other data.
    min_snr_variant: MinSnrVariant = "paper"
    min_snr_floor: float = 0.0  # least min-SNR weight of any timestep
    learn_sigma: bool = False
    vlb_weight: float = 0.001
    decoder_nll: DecoderNLL = "gaussian"  # "discretized" only for 8-bit pixel data in [-1, 1]
    timestep_sampling: Literal["uniform", "importance"] = "uniform"
    fixed_variance: Literal["small", "large"] = "small"  # when learn_sigma is False


class Diffusion:
    """Training loss and reverse-step Gaussian of a discrete Gaussian diffusion.

    Args:
        schedule: the noise schedule.
        parameterization: what the network predicts: a `Parameterization` or its name "eps", "x0", "v".
        loss: "l2" (L_simple, mean squared error) or "l1" (mean absolute error).
        min_snr_gamma: if set, weight the simple loss with min-SNR-gamma.
        min_snr_variant, min_snr_floor: its form at low SNR (see `min_snr_weight`).
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
        parameterization: str | Parameterization = "eps",
        loss: Literal["l2", "l1"] = "l2",
        min_snr_gamma: float | None = None,
        min_snr_variant: MinSnrVariant = "paper",
        min_snr_floor: float = 0.0,
        learn_sigma: bool = False,
        vlb_weight: float = 0.001,
        decoder_nll: DecoderNLL = "gaussian",
        timestep_sampling: Literal["uniform", "importance"] = "uniform",
        fixed_variance: Literal["small", "large"] = "small",
    ):
        self.parameterization = as_parameterization(parameterization)
        _check_choice("loss", loss, ("l2", "l1"))
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be positive or None, got {min_snr_gamma}")
        if min_snr_gamma is not None:  # the variant and floor errors, before a run starts
            min_snr_weight(torch.zeros(1), min_snr_gamma, parameterization, min_snr_variant, min_snr_floor)
        _check_choice("decoder_nll", decoder_nll, ("gaussian", "discretized"))
        _check_choice("fixed_variance", fixed_variance, ("small", "large"))
        _check_choice("timestep_sampling", timestep_sampling, ("uniform", "importance"))
        if schedule.has_zero_terminal_snr and not self.parameterization.defined_at_zero_snr:
            raise ValueError(f"a zero-terminal-SNR schedule needs parameterization 'v' or 'x0' "
                             f"({self.parameterization.name} gives no x0 at t = T-1)")
        self.schedule, self.loss, self.min_snr_gamma = schedule, loss, min_snr_gamma
        self.min_snr_variant, self.min_snr_floor = min_snr_variant, min_snr_floor
        self.learn_sigma, self.vlb_weight = learn_sigma, vlb_weight
        self.decoder_nll, self.fixed_variance = decoder_nll, fixed_variance
        sampler = UniformTimestepSampler if timestep_sampling == "uniform" else LossSecondMomentSampler
        self.timestep_sampler = sampler(schedule.num_timesteps)

    @classmethod
    def from_config(cls, config: DiffusionConfig) -> Diffusion:
        """Build the schedule and the diffusion a `DiffusionConfig` describes (its other fields are our args)."""
        options = {f.name: getattr(config, f.name) for f in fields(config) if f.name != "schedule"}
        return cls(NoiseSchedule.from_config(config.schedule), **options)

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
        generator: Generators = None,
    ) -> dict[str, Tensor]:
        """Per-sample training losses for a batch of clean latents x0 [B, C, ...].

        `model_fn(x_t, t, **model_kwargs)` returns [B, C, ...] ([B, 2C, ...] with learn_sigma).
        t [B] and noise [B, C, ...] are drawn (with `generator`, if given; a list of B generators
        draws each sample's from its own, see common.randomness) when not passed; only
        then does importance sampling apply, and it learns from the losses when grad is enabled.

        Returns a dict of [B] tensors:
            "loss"   what to average and backpropagate (weighted simple loss + vlb part,
                     times the importance weight)
            "mse"    the unweighted simple loss (mean absolute error when loss="l1")
            "vlb"    L_t in bits per dim (only with learn_sigma; gradient reaches the
                     variance output only)
            "t"      the timesteps, "weight" the importance weights 1 / (T p(t)).
        """
        sampled_t = t is None
        t, weight = self._timesteps(x0, t, generator)
        noise = self._noise(x0, noise, generator)
        x_t = q_sample(self.schedule, x0, t, noise)
        model_out, var_values = self._model_output(model_fn(x_t, t, **(model_kwargs or {})), x0)

        target = self.parameterization.target(x0, noise, table_scales(self.schedule, t, x0))
        error = model_out.float() - target.float()
        simple = mean_flat(error**2 if self.loss == "l2" else error.abs())
        loss = simple
        if self.min_snr_gamma is not None:
            snr = self.schedule.snr.to(t.device)[t]
            loss = loss * min_snr_weight(snr, self.min_snr_gamma, self.parameterization, self.min_snr_variant,
                                         self.min_snr_floor)
        terms = {"mse": simple, "t": t}

        if self.learn_sigma:
            # Stop-gradient on the mean: L_vlb only trains the variance, L_simple the mean.
            terms["vlb"] = self._vlb(torch.cat([model_out.detach(), var_values], dim=1), x0, x_t, t)
            loss = loss + self.vlb_weight * self.num_timesteps * terms["vlb"]

        if sampled_t and torch.is_grad_enabled():
            # Only training steps feed the importance sampler: an evaluation pass under no_grad
            # (perhaps on one rank only, where a collective would hang) leaves its history alone.
            self.timestep_sampler.update(t, loss.detach())
        terms["weight"] = weight
        terms["loss"] = loss * weight
        return terms

    def _timesteps(self, x0: Tensor, t: Tensor | None, generator: Generators) -> tuple[Tensor, Tensor]:
        """Timesteps [B] (drawn by the timestep sampler when not given) and their importance weights [B]."""
        batch = x0.shape[0]
        if t is None and isinstance(generator, Sequence):  # one draw from each sample's own generator
            drawn = [self.timestep_sampler.sample(1, x0.device, g) for g in generator]
            return torch.cat([t for t, _ in drawn]), torch.cat([w for _, w in drawn])
        if t is None:
            return self.timestep_sampler.sample(batch, x0.device, generator)
        t = torch.as_tensor(t, device=x0.device).long()
        if t.shape != (batch,):
            raise ValueError(f"t must have shape [{batch}], got {tuple(t.shape)}")
        if bool((t < 0).any()) or bool((t >= self.num_timesteps).any()):
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps - 1}]")
        return t, torch.ones(batch, device=x0.device)

    @staticmethod
    def _noise(x0: Tensor, noise: Tensor | None, generator: Generators) -> Tensor:
        """The given noise (checked against x0 [B, C, ...]), else fresh noise from `generator`'s device."""
        if noise is None and isinstance(generator, Sequence):
            return randn_like(x0, generator)
        if noise is None:
            device = generator.device if generator is not None else x0.device
            return torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype).to(x0.device)
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} does not match x0 shape {tuple(x0.shape)}")
        return noise

    def _model_output(self, out: Tensor, x0: Tensor) -> tuple[Tensor, Tensor | None]:
        """The network output split into the prediction [B, C, ...] and the variance values (learn_sigma)."""
        batch, channels = x0.shape[:2]
        expected = (batch, 2 * channels if self.learn_sigma else channels, *x0.shape[2:])
        if tuple(out.shape) != expected:
            hint = " (learn_sigma needs twice the input channels)" if self.learn_sigma else ""
            raise ValueError(f"model output has shape {tuple(out.shape)}, expected {expected}{hint}")
        return out.split(channels, dim=1) if self.learn_sigma else (out, None)

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
        pred_eps, pred_x0 = self.parameterization.to_eps_x0(model_out, x_t, table_scales(self.schedule, t, x_t))
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
