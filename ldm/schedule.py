"""Discrete-time Gaussian noise schedules (DDPM / LDM).

A schedule is a sequence of betas over `num_timesteps` steps; everything else (alpha-bar, SNR,
posterior coefficients, k-diffusion sigmas) is derived from it in float64 and stored in float32.
Timesteps are 0-based: t = 0 is the least noisy step, t = T - 1 the noisiest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

ScheduleKind = Literal["ldm-linear", "linear", "cosine"]
SCHEDULE_KINDS = ("ldm-linear", "linear", "cosine")


@dataclass
class ScheduleConfig:
    """Config section describing the noise schedule (SD 1.x/2.x defaults)."""

    kind: ScheduleKind = "ldm-linear"
    num_timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012
    cosine_s: float = 8e-3
    # Lin et al. 2023: rescale so the last step is pure noise. Needs v- or x0-prediction.
    zero_terminal_snr: bool = False


def make_betas(
    kind: str,
    num_timesteps: int = 1000,
    linear_start: float = 0.00085,
    linear_end: float = 0.012,
    cosine_s: float = 8e-3,
) -> Tensor:
    """Betas of a named schedule, float64 [num_timesteps].

    - "ldm-linear": linspace(sqrt(start), sqrt(end), T) ** 2, what LDM/SD call "linear"
      (diffusers: "scaled_linear").
    - "linear": linspace(start, end, T), the original DDPM schedule (DDPM used 1e-4 .. 0.02).
    - "cosine": improved DDPM, alpha_bar(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2),
      betas = 1 - alpha_bar(t + 1) / alpha_bar(t) clipped at 0.999 so the last step stays finite
      (diffusers: "squaredcos_cap_v2").
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be positive, got {num_timesteps}")
    if kind == "ldm-linear":
        start, end = math.sqrt(linear_start), math.sqrt(linear_end)
        sqrt_betas = torch.linspace(start, end, num_timesteps, dtype=torch.float64)
        return sqrt_betas**2
    if kind == "linear":
        return torch.linspace(linear_start, linear_end, num_timesteps, dtype=torch.float64)
    if kind == "cosine":
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        alpha_bar = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
        return betas.clamp(max=0.999)
    raise ValueError(f"unknown noise schedule kind {kind!r} (expected one of {', '.join(SCHEDULE_KINDS)})")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas so the final alpha_bar is exactly 0 (Lin et al. 2023, Algorithm 1).

    sqrt(alpha_bar) is shifted so its last value is 0 and scaled so its first value is unchanged;
    the training then sees pure noise at t = T - 1, matching what samplers start from.
    Returns float64 betas of the same length; the last beta is 1.
    """
    betas = betas.to(torch.float64)
    sqrt_ab = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def values_at(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """`values[t]` reshaped to [B, 1, ..., 1] so it broadcasts against `like` [B, ...].

    `values` is a per-timestep table [T]; `t` holds integer timesteps [B]. The table is moved to
    t's device if needed (free once the schedule lives there, see `NoiseSchedule.to`).
    """
    if values.device != t.device:
        values = values.to(t.device)
    out = values[t.long()].to(like.dtype)
    return out.reshape(t.shape[0], *([1] * (like.ndim - 1)))


class NoiseSchedule:
    """All per-timestep tables of a discrete Gaussian diffusion, float32 tensors [T].

    Names follow the buffers of the original LDM checkpoints (`betas`, `alphas_cumprod`,
    `posterior_mean_coef1`, ...); `buffers()` returns exactly those. Extra tables:
    `snr` = a / (1 - a) and `sigmas` = sqrt((1 - a) / a), the noise level of the equivalent
    variance-exploding process x / sqrt(a) used by k-diffusion-style samplers
    (a = alphas_cumprod; with zero terminal SNR the last sigma is inf and the last snr 0).
    """

    CHECKPOINT_BUFFERS = (
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    )
    EXTRA_TABLES = ("snr", "sigmas", "log_betas")

    def __init__(self, betas: Tensor):
        """`betas` [T] in (0, 1] (only the last may be 1); computed in float64, stored float32."""
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError(f"betas must be a 1-D tensor of at least 2 steps, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()) or bool((betas[:-1] >= 1).any()):
            raise ValueError("betas must lie in (0, 1), only the last one may equal 1")
        alphas = 1 - betas
        ab = torch.cumprod(alphas, dim=0)
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        # Variance of q(x_{t-1} | x_t, x_0); it is 0 at t = 0, so the log is clipped to the t = 1 value.
        post_var = betas * (1 - ab_prev) / (1 - ab)
        tables = {
            "betas": betas,
            "alphas_cumprod": ab,
            "alphas_cumprod_prev": ab_prev,
            "sqrt_alphas_cumprod": ab.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - ab).sqrt(),
            "log_one_minus_alphas_cumprod": torch.log1p(-ab),
            "sqrt_recip_alphas_cumprod": ab.rsqrt(),
            "sqrt_recipm1_alphas_cumprod": (1 / ab - 1).sqrt(),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": torch.cat([post_var[1:2], post_var[1:]]).log(),
            "posterior_mean_coef1": betas * ab_prev.sqrt() / (1 - ab),
            "posterior_mean_coef2": (1 - ab_prev) * alphas.sqrt() / (1 - ab),
            "snr": ab / (1 - ab),
            "sigmas": ((1 - ab) / ab).sqrt(),
            "log_betas": betas.log(),
        }
        for name, value in tables.items():
            setattr(self, name, value.to(torch.float32))

    @classmethod
    def from_config(cls, config: ScheduleConfig) -> NoiseSchedule:
        """Build the schedule a `ScheduleConfig` describes."""
        betas = make_betas(
            config.kind, config.num_timesteps, config.linear_start, config.linear_end, config.cosine_s
        )
        if config.zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas)

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def device(self) -> torch.device:
        return self.betas.device

    @property
    def has_zero_terminal_snr(self) -> bool:
        return bool(self.alphas_cumprod[-1] == 0)

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """Move every table to `device` in place (indexing then needs no copies); returns self."""
        for name in self.CHECKPOINT_BUFFERS + self.EXTRA_TABLES:
            setattr(self, name, getattr(self, name).to(device))
        return self

    def buffers(self) -> dict[str, Tensor]:
        """The schedule tables under the names original LDM/SD checkpoints store at top level."""
        return {name: getattr(self, name) for name in self.CHECKPOINT_BUFFERS}

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(T={self.num_timesteps}, betas {self.betas[0].item():.3g}"
            f"..{self.betas[-1].item():.3g}, alpha_bar[-1]={self.alphas_cumprod[-1].item():.3g})"
        )
