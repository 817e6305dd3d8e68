"""Classifier-free guidance (Ho & Salimans 2022) with optional guidance rescale (Lin et al. 2024).

Guidance extrapolates from the unconditional towards the conditional network output,
out = u + s (c - u), in whatever the network predicts (eps, x0 or v): each is an affine function of
the others at fixed (x_t, t), so guiding any of them gives the same sampler input. Both halves come
from ONE batched network call on [uncond, cond].

Guidance rescale is not affine (it divides by a per-sample std), so the space it works in matters.
It works on the v prediction, for every parameterization: Lin et al. ("Common diffusion noise
schedules and sample steps are flawed", WACV 2024, section 3.4 and Algorithm 2) rescale "the model
outputs", and their model is a v-prediction one (section 3.2), so x_pos, x_neg there are v. A v
network is therefore rescaled exactly as in the paper and as diffusers' `rescale_noise_cfg`; an eps or
x0 network's outputs are converted to v and back, so one denoiser gives the same images whichever way
it is parameterized. diffusers rescales the raw output instead: eps for an eps model, x0 for an x0
model, which differs from this (and from the paper's quantity) for those two kinds.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .denoiser import NoiseLevels
from .diffusion import Diffusion
from .parameterization import parameterization

V_PREDICTION = parameterization("v")
ConditionalModel = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x_t, t, context) -> raw output


def guide(uncond: Tensor, cond: Tensor, scale: float) -> Tensor:
    """u + s (c - u): s = 0 is unconditional, 1 conditional, > 1 extrapolates past it."""
    return uncond + scale * (cond - uncond)


def rescale_guided(guided: Tensor, cond: Tensor, phi: float) -> Tensor:
    """Guidance rescale (Lin et al. 2024, eq. 14-16, Algorithm 2) on [B, ...] predictions (v, see the
    module doc): guided * (phi std(cond) / std(guided) + 1 - phi), std per sample over all other dims.

    Large scales inflate the guided prediction's standard deviation (over-exposure); rescaling it
    per sample to the conditional one's std and mixing by phi (0.7 in the paper) undoes that. A flat
    guided prediction (std 0, where the paper's ratio is 0 / 0: at t = T - 1 of a zero-terminal-SNR
    schedule v = -x0 is the predicted mean, flat for a flat image) is left as it is.
    """
    dims = tuple(range(1, guided.ndim))
    std_guided = guided.std(dim=dims, keepdim=True)
    ratio = torch.where(std_guided > 0, cond.std(dim=dims, keepdim=True) / std_guided, torch.ones_like(std_guided))
    rescaled = guided * ratio
    return phi * rescaled + (1 - phi) * guided


class ClassifierFreeGuidance:
    """A `ModelFn` (x_t, t) -> guided raw output for the samplers.

    Args:
        model: (x_t [B, C, h, w], t [B], context [B, L, D]) -> raw output (a `LatentDiffusion`).
        diffusion: gives the parameterization and learn_sigma (variance channels are taken from
            the conditional half, not guided) and the noise levels that rescale needs.
        cond, uncond: text contexts [B, L, D]; uncond encodes the negative prompt or "".
        scale: guidance scale s; s = 1 calls the model on cond only (exactly the conditional model).
        rescale: phi of guidance rescale, applied to the v prediction (see the module doc); 0 turns
            it off.
    """

    def __init__(self, model: ConditionalModel, diffusion: Diffusion, cond: Tensor, uncond: Tensor | None,
                 scale: float, rescale: float = 0.0):
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"guidance rescale must lie in [0, 1], got {rescale}")
        if scale != 1 and (uncond is None or uncond.shape != cond.shape):
            got = None if uncond is None else tuple(uncond.shape)
            raise ValueError(f"guidance needs an unconditional context shaped like the conditional "
                             f"{tuple(cond.shape)}, got {got}")
        self.model, self.diffusion = model, diffusion
        self.parameterization = diffusion.parameterization
        self.cond, self.uncond = cond, uncond
        self.scale, self.rescale = scale, rescale
        self.levels = NoiseLevels(diffusion.schedule)

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        if self.scale == 1:
            return self.model(x_t, t, self.cond)
        both = self.model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([self.uncond, self.cond]))
        out_uncond, out_cond = both.chunk(2)
        channels = x_t.shape[1]
        guided = guide(out_uncond[:, :channels], out_cond[:, :channels], self.scale)
        if self.rescale > 0:
            guided = self._rescale(guided, out_cond[:, :channels], x_t, t)
        return torch.cat([guided, out_cond[:, channels:]], dim=1)

    def _rescale(self, guided: Tensor, cond: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        if self.parameterization.name == "v":
            return rescale_guided(guided, cond, self.rescale)
        alpha_bar = self.levels.alpha_bar(t.cpu()).to(x_t).reshape(-1, *([1] * (x_t.ndim - 1)))

        def to_v(out: Tensor) -> Tensor:
            return V_PREDICTION.from_eps_x0(*self.parameterization.to_eps_x0(out, x_t, alpha_bar), alpha_bar)

        v = rescale_guided(to_v(guided), to_v(cond), self.rescale)
        # Back to this network's kind, with x_t: the output stays consistent with the state.
        return self.parameterization.from_eps_x0(*V_PREDICTION.to_eps_x0(v, x_t, alpha_bar), alpha_bar)
