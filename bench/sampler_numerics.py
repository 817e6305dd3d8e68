"""Sampler numerics on closed-form Gaussian denoisers (issue 24, items 5 and 6), float64, no models.

rescale: the space guidance rescale (Lin et al. 2024, Algorithm 2) works in. Gaussian "images"
    [4 x 16] with exact conditional / unconditional networks (tests/sampling_helpers.py), guidance 7.5,
    phi 0.7, DDIM; the final samples with the rescale in x0 (this repository before), in v (after:
    the paper's quantity) and in eps (diffusers' `rescale_noise_cfg` on an eps network), their per-image
    mean and std against the conditional data's, how far apart they end, and how far each is from an
    independent numpy DDIM that applies the paper's Algorithm 2 to v.
heun: Heun's first step from the zero-terminal-SNR stand-in sigma (sigma = inf). The output of a
    deterministic sampler on Gaussian data is an affine function of its start noise, so its mean and
    std are exact (`affine_statistics`, no Monte Carlo). Errors against the data distribution
    N(0.7, s^2) for several data stds s (a direction of an image's latent with that variance), at
    S = 5, 10, 15, 25, 50, for the zero-terminal-SNR schedule and the usual one, before and after.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/sampler_numerics.py [--section rescale|heun|all]
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from sampling_helpers import (affine_statistics, conditional_gaussian_network, gaussian_network,  # noqa: E402
                              paper_rescaled_cfg)

from ldm.denoiser import Denoiser, make_sigmas, make_timesteps  # noqa: E402
from ldm.diffusion import Diffusion  # noqa: E402
from ldm.guidance import ClassifierFreeGuidance, rescale_guided  # noqa: E402
from ldm.parameterization import parameterization  # noqa: E402
from ldm.samplers import sample_ddim, sample_heun  # noqa: E402
from ldm.schedule import NoiseSchedule, make_betas, rescale_zero_terminal_snr  # noqa: E402

T = 1000
STEPS = (5, 10, 15, 25, 50)


def schedules() -> dict[str, NoiseSchedule]:
    return {"zero-SNR": NoiseSchedule(rescale_zero_terminal_snr(make_betas("ldm-linear"))),
            "usual": NoiseSchedule(make_betas("ldm-linear"))}


# -- guidance rescale space -------------------------------------------------------------------------

def ar1(n: int, rho: float, std: float) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64)
    return std**2 * rho ** (i[:, None] - i[None, :]).abs()


COND = (torch.tensor([1.0, 0.4, -0.6, 0.8], dtype=torch.float64), ar1(4, 0.6, 0.3))
UNCOND = (torch.zeros(4, dtype=torch.float64), ar1(4, 0.6, 0.8))
GUIDANCE, PHI = 7.5, 0.7


class RescaleIn(ClassifierFreeGuidance):
    """`ClassifierFreeGuidance` with the rescale done in another space ("x0", "eps" or "v")."""

    def __init__(self, *args, space: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.space = parameterization(space)

    def _rescale(self, guided, cond, x_t, t):
        alpha_bar = self.levels.alpha_bar(t.cpu()).to(x_t).reshape(-1, *([1] * (x_t.ndim - 1)))
        own = self.parameterization

        def to_space(out):
            return self.space.from_eps_x0(*own.to_eps_x0(out, x_t, alpha_bar), alpha_bar)

        rescaled = rescale_guided(to_space(guided), to_space(cond), self.rescale)
        return own.from_eps_x0(*self.space.to_eps_x0(rescaled, x_t, alpha_bar), alpha_bar)


def paper_ddim(schedule: NoiseSchedule, network, kind: str, noise: np.ndarray, timesteps: list[int],
               cond: torch.Tensor, uncond: torch.Tensor) -> np.ndarray:
    """Deterministic DDIM written out in numpy with the paper's Algorithm 2 applied to v, whatever the
    network outputs (v = sqrt(a) eps - sqrt(1 - a) x0); ends at alphas_cumprod[0] like LDM's DDIM."""
    ab = schedule.alphas_cumprod.double().numpy()
    x = noise.copy()
    for i, t in enumerate(timesteps):
        a = ab[t]
        a_prev = ab[timesteps[i + 1]] if i + 1 < len(timesteps) else ab[0]
        tt = torch.full((len(x),), float(t), dtype=torch.float64)
        outputs = []
        for context in (cond, uncond):
            out = network(torch.from_numpy(x), tt, context).numpy()
            if kind == "eps":
                out = math.sqrt(a) * out - math.sqrt(1 - a) * (x - math.sqrt(1 - a) * out) / math.sqrt(a)
            elif kind == "x0":
                out = math.sqrt(a) * (x - math.sqrt(a) * out) / math.sqrt(1 - a) - math.sqrt(1 - a) * out
            outputs.append(out)
        v = paper_rescaled_cfg(outputs[0], outputs[1], GUIDANCE, PHI)
        x0 = math.sqrt(a) * x - math.sqrt(1 - a) * v
        eps = math.sqrt(a) * v + math.sqrt(1 - a) * x
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x


def rescale_section(images: int) -> None:
    cases = [("v", "zero-SNR", "trailing", 25), ("eps", "usual", "uniform", 50), ("x0", "zero-SNR", "trailing", 25)]
    g = torch.Generator().manual_seed(0)
    reference = COND[0].view(1, 4, 1) + torch.linalg.cholesky(COND[1]) @ torch.randn(20000, 4, 16, generator=g,
                                                                                      dtype=torch.float64)
    ref_mean, ref_std = reference.mean(dim=(1, 2)), reference.std(dim=(1, 2))
    print(f"Guidance rescale space: Gaussian images [4 x 16], guidance {GUIDANCE}, phi {PHI}, {images} images, "
          f"DDIM eta 0. Per-image mean / std of the conditional data: {ref_mean.mean():.3f} / {ref_std.mean():.3f}")
    print("| network, schedule, steps | rescale in | per-image mean | per-image std | max |x - x_v| "
          "| max |x - paper| |")
    print("|---|---|---|---|---|---|")
    for kind, schedule_name, spacing, steps in cases:
        schedule = schedules()[schedule_name]
        diffusion = Diffusion(schedule, parameterization=kind)
        network = conditional_gaussian_network(schedule, kind, COND, UNCOND)
        cond = torch.ones(images, 1, 1, dtype=torch.float64)
        timesteps = make_timesteps(T, steps, spacing)
        noise = torch.randn(images, 1, 4, 16, generator=g, dtype=torch.float64)
        paper = paper_ddim(schedule, network, kind, noise.numpy(), timesteps, cond, -cond)
        finals = {}
        spaces = [("none (phi 0)", "v", 0.0), ("x0 (before)", "x0", PHI), ("v (after)", "v", PHI)]
        if not schedule.has_zero_terminal_snr:  # eps gives no x0 at a = 0
            spaces.append(("eps", "eps", PHI))
        for label, space, phi in spaces:
            guided = RescaleIn(network, diffusion, cond, -cond, GUIDANCE, phi, space=space)
            if space == "v" and phi:  # the library's own guidance is the v-space one
                library = ClassifierFreeGuidance(network, diffusion, cond, -cond, GUIDANCE, phi)
                x_t, t = noise, torch.full((images,), 600.0, dtype=torch.float64)
                assert torch.allclose(guided(x_t, t), library(x_t, t), rtol=1e-10, atol=1e-10)
                guided = library
            finals[label] = sample_ddim(Denoiser(guided, diffusion), noise, timesteps)
        for label, x in finals.items():
            note = {"x0 (before)": " = diffusers" if kind == "x0" else "",
                    "v (after)": " = diffusers" if kind == "v" else "",
                    "eps": " = diffusers" if kind == "eps" else ""}.get(label, "")
            print(f"| {kind}, {schedule_name}, DDIM {spacing} {steps} | {label}{note} | "
                  f"{x.mean(dim=(1, 2, 3)).mean():.3f} | {x.std(dim=(1, 2, 3)).mean():.3f} | "
                  f"{(x - finals['v (after)']).abs().max():.3g} | {np.abs(x.numpy() - paper).max():.2g} |")


# -- Heun's first step ------------------------------------------------------------------------------

MU = 0.7
DATA_STDS = (0.4, 1.0, 3.0, 30.0)
BEFORE = "459ba6f"  # the last revision whose Heun took an Euler first step from the stand-in sigma


def sample_heun_at(revision: str):
    """`sample_heun` of ldm/samplers.py as it was at a git revision, imported inside the ldm package."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:ldm/samplers.py"], check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType("ldm.samplers_at_" + revision)
    module.__package__ = "ldm"
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(source, f"{revision}:ldm/samplers.py", "exec"), module.__dict__)
    return module.sample_heun


def heun_variant(denoiser: Denoiser, x: torch.Tensor, sigmas: list[float], first: str) -> torch.Tensor:
    """Heun (EDM Algorithm 1, last step Euler) with a chosen first step from the stand-in sigma:
    "euler" (the code before: one DDIM step), "sigma-trapezoid" (plain Heun, as diffusers'
    HeunDiscreteScheduler and k-diffusion with a stand-in sigma), "u-trapezoid" (the code after: the
    trapezoid in u = 1 / sigma from u = 0, x_next = sigma_next x / sigma + (D + D_next) / 2)."""
    for i, (sigma, nxt) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = denoiser.denoise(x, sigma)
        if i == 0 and nxt > 0 and first == "u-trapezoid":  # sigma = inf: x / sigma is the unit noise
            noise = nxt / sigma * x
            x = noise + (denoised + denoiser.denoise(noise + denoised, nxt)) / 2
            continue
        d = (x - denoised) / sigma
        x_next = x + d * (nxt - sigma)
        if nxt > 0 and not (i == 0 and first == "euler"):
            d_next = (x_next - denoiser.denoise(x_next, nxt)) / nxt
            x_next = x + (d + d_next) / 2 * (nxt - sigma)
        x = x_next
    return x


def heun_stats(schedule: NoiseSchedule, data_std: float, steps: int, spacing: str, before) -> dict[str, tuple]:
    """(mean error, std error) against N(MU, data_std^2) of each first-step variant, exact; `before` is
    the old `sample_heun`."""
    denoiser = Denoiser(gaussian_network(schedule, "v", [MU], [[data_std**2]]), Diffusion(schedule, parameterization="v"))
    sigmas = make_sigmas(denoiser.levels, steps, spacing)
    s = sigmas.tolist()

    def errors(sample):
        mean, cov = affine_statistics(sample, 1)
        return float(mean[0]) - MU, math.sqrt(float(cov[0, 0])) - data_std

    results = {"library": errors(lambda z: sample_heun(denoiser, z * s[0], sigmas)),
               "before": errors(lambda z: before(denoiser, z * s[0], sigmas))}
    if not schedule.has_zero_terminal_snr:
        plain = errors(lambda z: heun_variant(denoiser, z * s[0], s, "sigma-trapezoid"))
        assert plain == results["library"] == results["before"], "the usual schedule's Heun changed"
        return results
    for first in ("euler", "sigma-trapezoid", "u-trapezoid"):
        results[first] = errors(lambda z: heun_variant(denoiser, z * s[0], s, first))
    finite = float(denoiser.levels.sigmas[-2])  # the schedule's largest finite sigma, t = T - 2
    results["ddim to T-2"] = errors(lambda z: heun_variant(denoiser, z * s[0], [s[0], finite, *s[1:]], "euler"))
    # Not a sampler: Heun from the exact marginal at the first finite level, what the first step should reach.
    results["exact start"] = errors(lambda z: sample_heun(denoiser, MU + math.sqrt(data_std**2 + s[1] ** 2) * z,
                                                          sigmas[1:]))
    # The first step alone: std of the state at sigma_1 against the exact sqrt(s^2 + sigma_1^2).
    exact = math.sqrt(data_std**2 + s[1] ** 2)
    for first in ("euler", "u-trapezoid"):
        _, cov = affine_statistics(lambda z: heun_variant(denoiser, z * s[0], s[:2], first), 1)
        results[f"first step {first}"] = (s[1], math.sqrt(float(cov[0, 0])) - exact)
    return results


def heun_section(before_revision: str) -> None:
    before = sample_heun_at(before_revision)
    print("Heun's first step: errors of the final samples against N(0.7, s^2), signed std error, exact "
          "(affine in the start noise). v network, ldm-linear schedule.")
    for schedule_name, spacing in (("zero-SNR", "trailing"), ("zero-SNR", "karras"), ("usual", "karras"),
                                   ("usual", "trailing")):
        schedule = schedules()[schedule_name]
        zero = schedule.has_zero_terminal_snr
        print(f"\n{schedule_name} schedule, {spacing} spacing" + ("" if zero else " (Heun unchanged: before = after)"))
        if zero:
            print(f"| s | S | mean err before / after | std err before ({before_revision}) | after (u-trapezoid 1st) "
                  "| Euler 1st | sigma-trapezoid 1st | DDIM to T-2 + Heun | exact start at sigma_1 | sigma_1 "
                  "| 1st-step std err Euler / u-trap |")
            print("|---|---|---|---|---|---|---|---|---|---|---|")
        else:
            print("| s | S | mean err | std err |")
            print("|---|---|---|---|")
        for data_std in DATA_STDS:
            for steps in STEPS:
                r = heun_stats(schedule, data_std, steps, spacing, before)
                if not zero:
                    print(f"| {data_std:g} | {steps} | {r['library'][0]:+.4f} | {r['library'][1]:+.4f} |")
                    continue
                assert r["library"] == r["u-trapezoid"], "the library's Heun is not the u-trapezoid variant"
                sigma_1, first_euler = r["first step euler"]
                print(f"| {data_std:g} | {steps} | {r['before'][0]:+.4f} / {r['library'][0]:+.4f} | "
                      f"{r['before'][1]:+.4g} | {r['library'][1]:+.4f} | {r['euler'][1]:+.4f} | "
                      f"{r['sigma-trapezoid'][1]:+.4g} | "
                      f"{r['ddim to T-2'][1]:+.4g} | {r['exact start'][1]:+.4f} | {sigma_1:.3g} | "
                      f"{first_euler:+.4f} / {r['first step u-trapezoid'][1]:+.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=("rescale", "heun", "all"), default="all")
    parser.add_argument("--images", type=int, default=1000, help="images for the guidance-rescale section")
    parser.add_argument("--before", default=BEFORE, help="git revision whose sample_heun is 'before'")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    print(f"# {' '.join(sys.argv)}\n# {datetime.date.today()}, {cpu or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, 1 thread\n")
    if args.section in ("rescale", "all"):
        rescale_section(args.images)
        print()
    if args.section in ("heun", "all"):
        heun_section(args.before)


if __name__ == "__main__":
    main()
