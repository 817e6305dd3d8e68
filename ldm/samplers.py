"""Samplers for discrete-time diffusion models, written as short loops over a `Denoiser`.

Two families, by the space the state x lives in:

- timestep samplers (DDPM, DDIM, PLMS) keep the variance-preserving state x_t of the schedule and
  step between integer timesteps, as the original DDPM/LDM code does;
- sigma samplers (Euler, Heun, DPM-Solver++(2M)) follow k-diffusion/EDM and keep the
  variance-exploding state x = x_t / sqrt(a) with noise level sigma = sqrt((1 - a) / a), ending at
  sigma = 0. A sigma between two table entries is given to the network as a fractional timestep
  found by interpolating the table's log-sigmas (`ldm.denoiser.NoiseLevels`).

Every sampler takes the starting state, a decreasing sequence of levels (timesteps or sigmas, see
`ldm.denoiser.make_timesteps` / `make_sigmas`), and optionally: per-image CPU generators for all fresh noise
(image i of a batch then depends only on its own generator), and as keyword `hooks` for the shared
loop `_walk`: `before_step(i, x) -> x` (inpainting re-imposes known content there), `callback(i, x, x0)`
after each step, and `progress` (a tqdm bar). Each sampler is one `step(x, i, j) -> (x, x0)`.

The registry `SAMPLERS` declares what each sampler supports (state space, spacings, eta, RePaint);
callers read it there instead of testing names.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from common.randomness import Generators, randn_like

from .denoiser import (SIGMA_SPACINGS, TIMESTEP_SPACINGS, ZERO_SNR_SIGMA_MAX, Denoiser, NoiseLevels, final_alphas,
                       make_sigmas, make_timesteps)
from .diffusion import Diffusion
from .schedule import NoiseSchedule

BeforeStep = Callable[[int, Tensor], Tensor]
Callback = Callable[[int, Tensor, Tensor], None]
Step = Callable[[Tensor, int, int], tuple[Tensor, Tensor]]  # (x, level i, next level j) -> (x, x0 prediction)
Renoise = Callable[[Tensor, int, int], Tensor]  # (x, level i, higher level j) -> x

# -- noise ------------------------------------------------------------------------------------------

def renoise(x: Tensor, alpha_from: float, alpha_to: float, generators: Generators) -> Tensor:
    """Sample q(x_high | x_low): forward-diffuse a variance-preserving state to a noisier level."""
    ratio = alpha_to / alpha_from
    return ratio**0.5 * x + (1 - ratio) ** 0.5 * randn_like(x, generators)


def repaint_path(steps: int, jump_length: int, resamples: int) -> list[int]:
    """RePaint's jump schedule (Lugmayr et al. 2022) as level indices 0 .. steps (steps = done).

    Going down, at levels steps - 1, steps - 1 - jump_length, ... (counted from the clean end, while
    at least `jump_length`) the state is diffused back up `jump_length` levels and denoised again,
    `resamples - 1` times, so the last steps, where detail forms, are resampled; the step to done
    never is (the paper's Algorithm 1 resamples only while t > 1). resamples = 1 gives 0, 1, ..., steps.

    Mapping to RePaint's `get_schedule_jump` and diffusers' `RePaintScheduler.set_timesteps(steps,
    jump_length, jump_n_sample)`: jump_length is the same; resamples is their jump_n_sample (the
    paper's r or U: r - 1 extra passes); their list counts states from the clean end, level i here
    being t = steps - 1 - i ("leading" timestep t * (T // steps) in diffusers) and done t = -1, which
    diffusers leaves out; one jump here is their jump_length unit steps up. (diffusers' pipeline
    reads the same list as the timesteps of its model calls, which puts every jump one step later,
    from the finished sample back up; the original repository and this path read it as states.)
    """
    if jump_length < 1 or resamples < 1:
        raise ValueError(f"RePaint needs jump_length >= 1 and resamples >= 1, got {jump_length}, {resamples}")
    jumps_left = {steps - 1 - k: resamples - 1 for k in range(0, steps - jump_length, jump_length)}
    path, i = [0], 0
    while i < steps:
        i += 1
        path.append(i)
        if jumps_left.get(i, 0) > 0:
            jumps_left[i] -= 1
            i -= jump_length
            path.append(i)
    return path


def _steps(path: Sequence[int], progress: bool):
    """Consecutive (from, to) level pairs of a path, with an optional progress bar."""
    return tqdm(list(zip(path[:-1], path[1:])), disable=not progress, leave=False)


def _walk(x: Tensor, path: Sequence[int], step: Step, *, renoise_to: Renoise | None = None,
          before_step: BeforeStep | None = None, callback: Callback | None = None, progress: bool = False) -> Tensor:
    """Run a sampler's `step(x, i, j) -> (x, x0)` from level i down to j over consecutive pairs of `path`.

    Every sampler shares this loop: `before_step` before each step, `callback` after it; a pair going
    up (a RePaint path) calls `renoise_to(x, i, j)` instead.
    """
    for i, j in _steps(path, progress):
        if j < i:
            x = renoise_to(x, i, j)
            continue
        if before_step is not None:
            x = before_step(i, x)
        x, x0 = step(x, i, j)
        if callback is not None:
            callback(i, x, x0)
    return x


# -- timestep samplers ------------------------------------------------------------------------------

def ddim_update(x0: Tensor, eps: Tensor, alpha: float, alpha_prev: float, eta: float, noise: Tensor | None) -> Tensor:
    """One DDIM step (Song et al. 2021, eq. 12) from level alpha to alpha_prev.

    sigma = eta sqrt((1 - a_prev) / (1 - a) (1 - a / a_prev)); eta = 0 is deterministic, 1 is DDPM-like.
    """
    sigma = eta * ((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)) ** 0.5 if eta else 0.0
    x = alpha_prev**0.5 * x0 + max(1 - alpha_prev - sigma**2, 0.0) ** 0.5 * eps
    return x + sigma * noise if sigma else x


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: Tensor, timesteps: Sequence[int], *, eta: float = 0.0,
                generators: Generators = None, path: Sequence[int] | None = None, **hooks) -> Tensor:
    """DDIM from x_t [B, C, ...] at timesteps[0] down through `timesteps` (decreasing).

    `path` (see `repaint_path`) may revisit levels; going up re-noises the state. `hooks`: before_step,
    callback, progress (see the module doc).
    """
    alphas = final_alphas(denoiser.levels, timesteps)

    def step(x: Tensor, i: int, j: int) -> tuple[Tensor, Tensor]:
        eps, x0 = denoiser.predict(x, timesteps[i])
        noise = randn_like(x, generators) if eta else None
        return ddim_update(x0, eps, alphas[i], alphas[j], eta, noise), x0

    return _walk(x, path or range(len(timesteps) + 1), step,
                 renoise_to=lambda x, i, j: renoise(x, alphas[i], alphas[j], generators), **hooks)


def respaced_diffusion(diffusion: Diffusion, timesteps: Sequence[int]) -> Diffusion:
    """The diffusion restricted to a subset of timesteps (improved DDPM's respacing).

    The kept alpha_bars define new betas 1 - a_k / a_{k-1}; fixed and learned variances are then
    those of the shorter chain. Index k of the result is timestep sorted(timesteps)[k].
    """
    alphas = diffusion.schedule.alphas_cumprod.double().cpu()[sorted(timesteps)]
    betas = 1 - alphas / torch.cat([alphas.new_ones(1), alphas[:-1]])
    return Diffusion(NoiseSchedule(betas), parameterization=diffusion.parameterization,
                     learn_sigma=diffusion.learn_sigma, fixed_variance=diffusion.fixed_variance)


@torch.no_grad()
def sample_ddpm(denoiser: Denoiser, x: Tensor, timesteps: Sequence[int], *, generators: Generators = None,
                path: Sequence[int] | None = None, **hooks) -> Tensor:
    """Ancestral sampling of p(x_{t-1} | x_t) with the model's variance (fixed small/large or learned).

    With fewer timesteps than the schedule has, the chain is respaced; the last step returns the mean.
    """
    respaced = respaced_diffusion(denoiser.diffusion, timesteps)
    alphas = [float(a) for a in respaced.schedule.alphas_cumprod.flip(0)] + [1.0]
    n = len(timesteps)

    def step(x: Tensor, i: int, j: int) -> tuple[Tensor, Tensor]:
        out = denoiser.output(x, timesteps[i])
        k = torch.full((x.shape[0],), n - 1 - i, device=x.device)
        p = respaced.p_mean_variance(out, x, k)
        x = p["mean"].to(x.dtype)
        if i < n - 1:
            x = x + (0.5 * p["log_variance"]).exp().to(x.dtype) * randn_like(x, generators)
        return x, p["pred_x0"]

    return _walk(x, path or range(n + 1), step,
                 renoise_to=lambda x, i, j: renoise(x, alphas[i], alphas[j], generators), **hooks)


PLMS_COEFFICIENTS = {2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def adams_bashforth(history: Sequence[Tensor]) -> Tensor:
    """Linear multistep combination of the last 2-4 eps predictions (oldest first, newest last),
    integrating exactly a polynomial of degree len - 1 through them over the next step."""
    coefficients = PLMS_COEFFICIENTS[len(history)]
    return sum(c * e for c, e in zip(coefficients, reversed(history)))


@torch.no_grad()
def sample_plms(denoiser: Denoiser, x: Tensor, timesteps: Sequence[int], *, generators: Generators = None,
                **hooks) -> Tensor:
    """Pseudo linear multistep (Liu et al. 2022), as in LDM: an improved-Euler first step (two
    evaluations), then Adams-Bashforth of order 2, 3, 4 on eps; deterministic (eta = 0)."""
    alphas = final_alphas(denoiser.levels, timesteps)
    if alphas[0] == 0:
        raise ValueError("plms needs x0 from eps at every step; a zero-terminal-SNR schedule has none at t = T - 1")

    def ddim_step(x: Tensor, eps: Tensor, i: int) -> tuple[Tensor, Tensor]:
        x0 = (x - (1 - alphas[i]) ** 0.5 * eps) / alphas[i] ** 0.5
        return ddim_update(x0, eps, alphas[i], alphas[i + 1], 0.0, None), x0

    history: list[Tensor] = []

    def step(x: Tensor, i: int, j: int) -> tuple[Tensor, Tensor]:
        eps, _ = denoiser.predict(x, timesteps[i])
        if history:
            eps_prime = adams_bashforth([*history[-3:], eps])
        elif i + 1 < len(timesteps):
            x_euler, _ = ddim_step(x, eps, i)
            eps_prime = (eps + denoiser.predict(x_euler, timesteps[i + 1])[0]) / 2
        else:
            eps_prime = eps
        history.append(eps)
        return ddim_step(x, eps_prime, i)

    return _walk(x, range(len(timesteps) + 1), step, **hooks)


# -- sigma samplers ---------------------------------------------------------------------------------

@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generators: Generators = None,
                 **hooks) -> Tensor:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (EDM)."""
    sigmas = sigmas.tolist()

    def step(x: Tensor, i: int, j: int) -> tuple[Tensor, Tensor]:
        denoised = denoiser.denoise(x, sigmas[i])
        return x + (x - denoised) / sigmas[i] * (sigmas[j] - sigmas[i]), denoised

    return _walk(x, range(len(sigmas)), step, **hooks)


@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generators: Generators = None,
                **hooks) -> Tensor:
    """Heun's second-order method (EDM, Algorithm 1 without churn); the last step to 0 is Euler.

    A first step from the zero-terminal-SNR stand-in sigma (sigma = inf, where x / sigma is the unit
    noise the sampler starts from) is the trapezoid in u = 1 / sigma instead: with y = x / sigma the
    flow is dy/du = D(x, sigma), and u runs from 0, so
        x_next = sigma_next y + (D + D_next) / 2,  D_next at the DDIM point sigma_next y + D,
    second order like the other steps and exact in the limit. The trapezoid in sigma there multiplies
    the difference of the two slopes by ~sigma / 2 (from 4096 to a few); the Euler (= DDIM) step used
    before is first order: it misses c / (2 sigma_next) of the std in a direction of data variance c.
    """
    sigmas = sigmas.tolist()

    def step(x: Tensor, i: int, j: int) -> tuple[Tensor, Tensor]:
        sigma, sigma_next = sigmas[i], sigmas[j]
        denoised = denoiser.denoise(x, sigma)
        if 0 < sigma_next and sigma >= ZERO_SNR_SIGMA_MAX * (1 - 1e-9):  # Karras gives 4095.9999999999973
            scaled_noise = sigma_next / sigma * x
            denoised_next = denoiser.denoise(scaled_noise + denoised, sigma_next)
            return scaled_noise + (denoised + denoised_next) / 2, denoised
        d = (x - denoised) / sigma
        x_next = x + d * (sigma_next - sigma)
        if 0 < sigma_next:
            d_next = (x_next - denoiser.denoise(x_next, sigma_next)) / sigma_next
            x_next = x + (d + d_next) / 2 * (sigma_next - sigma)
        return x_next, denoised

    return _walk(x, range(len(sigmas)), step, **hooks)


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generators: Generators = None,
                    **hooks) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): multistep, second order, in data prediction.

    With lambda = -log sigma and h the step in lambda, x_next = (sigma_next / sigma) x + (1 - e^-h) D,
    where D is the x0 prediction, extrapolated from the previous one after the first step. The last
    step (to sigma = 0) is first order and returns D.
    """
    sigmas = sigmas.tolist()
    previous: list[Tensor] = []  # the last step's x0 prediction

    def step(x: Tensor, i: int, j: int) -> tuple[Tensor, Tensor]:
        sigma, sigma_next = sigmas[i], sigmas[j]
        denoised = denoiser.denoise(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            d = denoised
            if previous:
                r = math.log(sigmas[i - 1] / sigma) / h
                d = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * previous[-1]
            x = sigma_next / sigma * x - math.expm1(-h) * d
        previous[:] = [denoised]
        return x, denoised

    return _walk(x, range(len(sigmas)), step, **hooks)


# -- registry ---------------------------------------------------------------------------------------

class TimestepSpace:
    """The variance-preserving state x_t = sqrt(a) x0 + sqrt(1 - a) eps at integer timesteps."""

    name = "timestep"
    spacings = TIMESTEP_SPACINGS

    def levels(self, noise_levels: NoiseLevels, steps: int, spacing: str) -> list[int]:
        """The decreasing timesteps a sampler runs through [levels]."""
        return make_timesteps(noise_levels.num_timesteps, steps, spacing)

    def state_scales(self, noise_levels: NoiseLevels, levels: Sequence[int]) -> list[tuple[float, float]]:
        """(signal, noise) with state = signal x0 + noise eps at each level a step starts from [levels]."""
        alphas = [float(noise_levels.alphas_cumprod[t]) for t in levels]
        return [(a**0.5, (1 - a) ** 0.5) for a in alphas]

    def pure_noise_scale(self, levels: Sequence[int]) -> float:
        return 1.0  # DDPM/LDM start from x_T = noise


class SigmaSpace:
    """The variance-exploding state x = x_t / sqrt(a) = x0 + sigma eps, with sigmas ending at 0."""

    name = "sigma"
    spacings = SIGMA_SPACINGS

    def levels(self, noise_levels: NoiseLevels, steps: int, spacing: str) -> Tensor:
        """The decreasing sigmas a sampler runs through, float64 [levels + 1] ending in 0."""
        return make_sigmas(noise_levels, steps, spacing)

    def state_scales(self, noise_levels: NoiseLevels, levels: Tensor) -> list[tuple[float, float]]:
        return [(1.0, float(s)) for s in levels[:-1]]

    def pure_noise_scale(self, levels: Tensor) -> float:
        return float(levels[0])


StateSpace = TimestepSpace | SigmaSpace
STATE_SPACES: dict[str, StateSpace] = {space.name: space for space in (TimestepSpace(), SigmaSpace())}


@dataclass(frozen=True)
class SamplerSpec:
    """What a sampler is and supports: its loop, the space its state lives in (which gives its
    levels and allowed spacings), its default spacing and the one on a zero-terminal-SNR schedule,
    whether it takes DDIM's eta, and whether it can follow a RePaint path (go back up)."""

    sample: Callable[..., Tensor]
    space: str  # "timestep" or "sigma", a key of STATE_SPACES
    default_spacing: str
    # On a zero-terminal-SNR schedule sampling must start at t = T - 1 (pure noise) for images to get
    # their own mean brightness (Lin et al. 2023), so "trailing"; PLMS's eps steps cannot start there.
    zero_snr_spacing: str = "trailing"
    eta: bool = False
    resampling: bool = False
    # Network calls per image for a path of `steps` steps (plans a sweep's cost).
    evaluations: Callable[[int], int] = lambda steps: steps

    @property
    def state_space(self) -> StateSpace:
        """Where the state lives: gives the levels, their state scales and the allowed spacings."""
        return STATE_SPACES[self.space]

    @property
    def spacings(self) -> tuple[str, ...]:
        return self.state_space.spacings

    def spacing_for(self, schedule: NoiseSchedule) -> str:
        """The level spacing this sampler uses on `schedule` unless told."""
        return self.zero_snr_spacing if schedule.has_zero_terminal_snr else self.default_spacing

    def run(self, denoiser: Denoiser, x: Tensor, levels, *, eta: float = 0.0, **kwargs) -> Tensor:
        """`sample` with the options it takes: eta only where it applies."""
        if self.eta:
            kwargs["eta"] = eta
        return self.sample(denoiser, x, levels, **kwargs)


SAMPLERS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec(sample_ddpm, "timestep", "linspace", resampling=True),
    "ddim": SamplerSpec(sample_ddim, "timestep", "uniform", eta=True, resampling=True),
    # PLMS's first step is an improved-Euler step (two calls).
    "plms": SamplerSpec(sample_plms, "timestep", "uniform", zero_snr_spacing="uniform",
                        evaluations=lambda steps: steps + (steps > 1)),
    "dpmpp-2m": SamplerSpec(sample_dpmpp_2m, "sigma", "karras"),
    "euler": SamplerSpec(sample_euler, "sigma", "karras"),
    # Two calls a step but the last, to sigma = 0, which is an Euler step.
    "heun": SamplerSpec(sample_heun, "sigma", "karras", evaluations=lambda steps: 2 * steps - 1),
}


def get_sampler(name: str) -> SamplerSpec:
    """The registry entry for `name`, or a ValueError listing the known samplers."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r} (expected one of {', '.join(SAMPLERS)})")
    return SAMPLERS[name]


def samplers_with(capability: str) -> list[str]:
    """Names of the registered samplers whose spec has `capability` (e.g. "eta", "resampling") set."""
    return [name for name, spec in SAMPLERS.items() if getattr(spec, capability)]


def default_spacing(name: str, schedule: NoiseSchedule) -> str:
    """The level spacing sampler `name` uses on `schedule` unless told (see `SamplerSpec.spacing_for`)."""
    return get_sampler(name).spacing_for(schedule)
