"""What a diffusion network predicts, as objects (like k-diffusion's `external.py` and EDM's `*Precond`).

With x_t = sqrt(a) x0 + sqrt(1 - a) eps at alpha_bar a, a network can output one of three equivalent
quantities, each an affine function of the others at fixed (x_t, a):
    eps  the noise,
    x0   the clean sample,
    v    sqrt(a) eps - sqrt(1 - a) x0   (Salimans & Ho 2022; SD 2.x 768-v).
A `Parameterization` converts an output to (eps, x0) and back, gives the training target and the
min-SNR loss weight in its space. Configs name it by string ("eps", "x0", "v"); `parameterization(name)`
gives the object, made once.

Every `alpha_bar` argument is a float, a tensor broadcasting against x_t (so conversions also hold
between table entries), or `NoiseScales` precomputed from a schedule's float64-derived tables.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

ParameterizationName = Literal["eps", "x0", "v"]


@dataclass(frozen=True)
class NoiseScales:
    """sqrt(a) and sqrt(1 - a) at some alpha_bar a, each broadcasting against x_t.

    `recip` = 1 / sqrt(a) and `recipm1` = sqrt(1 / a - 1), when given, are used for x0 from eps, which
    the original DDPM code computes from those precomputed tables (kept for bit-exactness).
    """

    signal: Tensor | float
    noise: Tensor | float
    recip: Tensor | float | None = None
    recipm1: Tensor | float | None = None


def noise_scales(alpha_bar: Tensor | float | NoiseScales, like: Tensor) -> NoiseScales:
    """`NoiseScales` of alpha_bar, computed in like's dtype and on its device (passed through if given)."""
    if isinstance(alpha_bar, NoiseScales):
        return alpha_bar
    a = torch.as_tensor(alpha_bar, dtype=like.dtype, device=like.device)
    return NoiseScales(a.sqrt(), (1 - a).sqrt())


class Parameterization:
    """One kind of network output. Shapes: out, x_t, eps, x0 [B, C, ...]; alpha_bar see the module doc."""

    name: str
    # Whether x0 follows from the output where a = 0 (a zero-terminal-SNR schedule's last step).
    defined_at_zero_snr: bool = True

    def to_eps_x0(self, out: Tensor, x_t: Tensor, alpha_bar: Tensor | float | NoiseScales) -> tuple[Tensor, Tensor]:
        """(eps, x0) implied by the network output `out` at x_t."""
        raise NotImplementedError

    def from_eps_x0(self, eps: Tensor, x0: Tensor, alpha_bar: Tensor | float | NoiseScales) -> Tensor:
        """What a network of this kind outputs for (eps, x0); inverse of `to_eps_x0`."""
        raise NotImplementedError

    def target(self, x0: Tensor, eps: Tensor, alpha_bar: Tensor | float | NoiseScales) -> Tensor:
        """The training target for x_t = sqrt(a) x0 + sqrt(1 - a) eps: the exact output for that (eps, x0)."""
        return self.from_eps_x0(eps, x0, alpha_bar)

    def min_snr_weight(self, snr: Tensor, gamma: float) -> Tensor:
        """Min-SNR-gamma loss weight (Hang et al. 2023) for a per-sample SNR [B], in this output's space.

        The paper weights the x0-space error by min(SNR, gamma); since |eps - eps^|^2 = SNR |x0 - x0^|^2
        and |v - v^|^2 = (SNR + 1) |x0 - x0^|^2, eps and v divide that by SNR and SNR + 1.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"parameterization({self.name!r})"


class EpsPrediction(Parameterization):
    name = "eps"
    defined_at_zero_snr = False  # x0 = (x_t - eps) / sqrt(a) has no value at a = 0

    def to_eps_x0(self, out, x_t, alpha_bar):
        s = noise_scales(alpha_bar, x_t)
        if s.recip is not None:
            return out, s.recip * x_t - s.recipm1 * out
        return out, (x_t - s.noise * out) / s.signal

    def from_eps_x0(self, eps, x0, alpha_bar):
        return eps

    def min_snr_weight(self, snr, gamma):
        # == min(SNR, gamma) / SNR, but also finite (1) where SNR is 0 (zero terminal SNR).
        return (gamma / snr).clamp(max=1.0)


class X0Prediction(Parameterization):
    name = "x0"

    def to_eps_x0(self, out, x_t, alpha_bar):
        s = noise_scales(alpha_bar, x_t)
        return (x_t - s.signal * out) / s.noise, out

    def from_eps_x0(self, eps, x0, alpha_bar):
        return x0

    def min_snr_weight(self, snr, gamma):
        return snr.clamp(max=gamma)


class VPrediction(Parameterization):
    name = "v"

    def to_eps_x0(self, out, x_t, alpha_bar):
        s = noise_scales(alpha_bar, x_t)
        return s.signal * out + s.noise * x_t, s.signal * x_t - s.noise * out

    def from_eps_x0(self, eps, x0, alpha_bar):
        s = noise_scales(alpha_bar, x0)
        return s.signal * eps - s.noise * x0

    def min_snr_weight(self, snr, gamma):
        return snr.clamp(max=gamma) / (snr + 1)


PARAMETERIZATIONS: dict[str, Parameterization] = {p.name: p for p in (EpsPrediction(), X0Prediction(), VPrediction())}


def parameterization(kind: str | Parameterization) -> Parameterization:
    """The `Parameterization` named `kind` ("eps", "x0" or "v"); an object is returned as it is."""
    if isinstance(kind, Parameterization):
        return kind
    if kind not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {kind!r} (expected one of {', '.join(PARAMETERIZATIONS)})")
    return PARAMETERIZATIONS[kind]
