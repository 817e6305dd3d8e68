"""A network and its discrete noise levels as the samplers see them.

`NoiseLevels` converts between timesteps, alpha-bar and sigma = sqrt((1 - a) / a) for a schedule,
also between table entries; `Denoiser` wraps a network's raw output (eps, x0 or v, converted by the
diffusion's `Parameterization`) into (eps, x0) at a timestep or x0 at a sigma; `make_timesteps` / `make_sigmas` give the decreasing levels a
sampler runs through (ldm/samplers.py).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .diffusion import Diffusion
from .schedule import NoiseSchedule

ModelFn = Callable[[Tensor, Tensor], Tensor]  # (x_t [B, C, ...], t [B] float) -> raw network output

TIMESTEP_SPACINGS = ("uniform", "leading", "trailing", "linspace")
SIGMA_SPACINGS = ("karras", *TIMESTEP_SPACINGS)
# A zero-terminal-SNR schedule has sigma = inf at its last step; the sigma samplers start from this
# finite stand-in (alpha_bar = 2^-24, as diffusers does) instead.
ZERO_SNR_SIGMA_MAX = 4096.0


class NoiseLevels:
    """Conversions between timesteps, alpha-bar and sigma for a discrete schedule.

    sigma(t) for fractional t interpolates log-sigma linearly between table entries, and
    `sigma_to_t` inverts it; integer t gives the table values exactly.
    """

    def __init__(self, schedule: NoiseSchedule):
        self.alphas_cumprod = schedule.alphas_cumprod.double().cpu()
        sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        self.sigmas = torch.where(torch.isfinite(sigmas), sigmas, torch.tensor(ZERO_SNR_SIGMA_MAX, dtype=torch.float64))
        self.log_sigmas = self.sigmas.log()

    @property
    def num_timesteps(self) -> int:
        return len(self.sigmas)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def t_to_sigma(self, t: Tensor | float) -> Tensor:
        """sigma at (possibly fractional) timesteps t in [0, T - 1], float64 with t's shape."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - low
        return torch.lerp(self.log_sigmas[low], self.log_sigmas[low + 1], w).exp()

    def sigma_to_t(self, sigma: Tensor | float) -> Tensor:
        """The fractional timestep whose interpolated sigma is `sigma` (clamped to the table's range)."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).log()
        low = (torch.searchsorted(self.log_sigmas, log_sigma) - 1).clamp(0, self.num_timesteps - 2)
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        return low + ((log_sigma - lo) / (hi - lo)).clamp(0, 1)

    def alpha_bar(self, t: Tensor | float) -> Tensor:
        """alpha_bar at timesteps t, float64: the table value at integer t, interpolated otherwise."""
        t = torch.as_tensor(t, dtype=torch.float64)
        exact = self.alphas_cumprod[t.round().long().clamp(0, self.num_timesteps - 1)]
        return torch.where(t == t.round(), exact, 1 / (1 + self.t_to_sigma(t) ** 2))


class Denoiser:
    """A network as the samplers see it: raw output, (eps, x0) at timestep t, or x0 at sigma.

    model_fn(x_t, t) returns the raw output (guidance included, see `ldm.guidance`); its
    parameterization and the variance channels (learn_sigma) come from `diffusion`.
    """

    def __init__(self, model_fn: ModelFn, diffusion: Diffusion):
        self.model_fn = model_fn
        self.diffusion = diffusion
        self.parameterization = diffusion.parameterization
        self.levels = NoiseLevels(diffusion.schedule)

    def output(self, x_t: Tensor, t: float | Tensor) -> Tensor:
        """Raw network output [B, C or 2C, ...] at one timestep shared by the batch."""
        timesteps = torch.full((x_t.shape[0],), float(t), device=x_t.device)
        return self.model_fn(x_t, timesteps)

    def _predict(self, x_t: Tensor, t: float | Tensor, alpha_bar: float) -> tuple[Tensor, Tensor]:
        out = self.output(x_t, t)
        if self.diffusion.learn_sigma:
            out = out[:, : x_t.shape[1]]
        return self.parameterization.to_eps_x0(out, x_t, alpha_bar)

    def predict(self, x_t: Tensor, t: int | float) -> tuple[Tensor, Tensor]:
        """(eps, x0) predicted at the variance-preserving state x_t [B, C, ...] and timestep t."""
        return self._predict(x_t, t, float(self.levels.alpha_bar(t)))

    def denoise(self, x: Tensor, sigma: float) -> Tensor:
        """x0 predicted at the variance-exploding state x = x_t / sqrt(a) with noise level sigma."""
        scale = (1 + sigma**2) ** -0.5  # = sqrt(a)
        _, x0 = self._predict(x * scale, self.levels.sigma_to_t(sigma), scale**2)
        return x0


# -- levels -----------------------------------------------------------------------------------------

def make_timesteps(num_timesteps: int, steps: int, spacing: str = "uniform") -> list[int]:
    """About `steps` integer timesteps in decreasing order.

    - "uniform": LDM's DDIM spacing, exactly: c = T // S and every t = 0, c, 2c, ... below T, plus 1
      (50 of 1000: 981 .. 1). When S does not divide T this is more than S steps, as in the original
      (30 of 1000: 31 steps, 991 .. 1). A level at t = T, past the table, is left out (3 of 1000:
      667, 334, 1; 1000 of 1000: 999 steps).
    - "leading": S steps 0, c, 2c, ... (diffusers' default, steps_offset=0).
    - "trailing": round(T - k T / S) - 1 for k < S; always starts at T - 1 (999 .. 19).
    - "linspace": round(linspace(0, T - 1, S)): both ends, improved DDPM's respacing.
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must lie in [1, {num_timesteps}], got {steps}")
    stride = num_timesteps // steps
    if spacing == "uniform":
        # t = T, where the original would index past its table (e.g. 3 of 1000 steps), is left out.
        ts = [t + 1 for t in range(0, num_timesteps, stride) if t + 1 < num_timesteps]
    elif spacing == "leading":
        ts = [k * stride for k in range(steps)]
    elif spacing == "trailing":
        ts = [round(num_timesteps - k * num_timesteps / steps) - 1 for k in range(steps)][::-1]
    elif spacing == "linspace" and steps == 1:
        ts = [num_timesteps - 1]  # a single step must start from noise, not from t = 0
    elif spacing == "linspace":
        ts = torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64).round().long().tolist()
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r} (expected one of {', '.join(TIMESTEP_SPACINGS)})")
    if len(set(ts)) != len(ts):
        raise ValueError(f"spacing {spacing!r} gives repeated timesteps for {steps} steps")
    return ts[::-1]


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> Tensor:
    """EDM's noise levels (Karras et al. 2022, eq. 5): `steps` sigmas from sigma_max down to sigma_min,
    evenly spaced in sigma^(1/rho), then a final 0. float64 [steps + 1]."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def make_sigmas(levels: NoiseLevels, steps: int, spacing: str = "karras", rho: float = 7.0) -> Tensor:
    """Decreasing noise levels for the sigma samplers, float64 [levels + 1] ending in 0 (levels = steps,
    except that LDM's "uniform" spacing may give more, see `make_timesteps`).

    "karras": EDM's rho-spacing between the table's smallest and largest sigma; any timestep spacing
    of `make_timesteps`: the table sigmas at those timesteps.
    """
    if spacing == "karras":
        if steps < 1:
            raise ValueError(f"steps must be positive, got {steps}")
        if steps == 1:
            return torch.tensor([levels.sigma_max, 0.0], dtype=torch.float64)
        return karras_sigmas(levels.sigma_min, levels.sigma_max, steps, rho)
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown sigma spacing {spacing!r} (expected one of {', '.join(SIGMA_SPACINGS)})")
    sigmas = levels.sigmas[make_timesteps(levels.num_timesteps, steps, spacing)]
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def final_alphas(levels: NoiseLevels, timesteps: Sequence[int]) -> list[float]:
    """alpha_bar at each timestep and after the last step [len + 1].

    The level after the last step is alphas_cumprod[0] (LDM's alphas_prev; diffusers'
    set_alpha_to_one=False), not 1: the output keeps the t = 0 noise level.
    """
    return [float(levels.alphas_cumprod[t]) for t in timesteps] + [float(levels.alphas_cumprod[0])]
