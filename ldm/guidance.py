"""Classifier-free guidance (Ho & Salimans 2022) with optional guidance rescale (Lin et al. 2023).

Guidance extrapolates from the unconditional towards the conditional network output,
out = u + s (c - u), in whatever the network predicts (eps, x0 or v): each is an affine function of
the others at fixed (x_t, t), so guiding any of them gives the same sampler input. Both halves come
from ONE batched network call on [uncond, cond].
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .denoiser import NoiseLevels
from .diffusion import Diffusion
from .parameterization import parameterization

X0_PREDICTION = parameterization("x0")
ConditionalModel = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x_t, t, context) -> raw output


def guide(uncond: Tensor, cond: Tensor, scale: float) -> Tensor:
    """u + s (c - u): s = 0 is unconditional, 1 conditional, > 1 extrapolates past it."""
    return uncond + scale * (cond - uncond)


def rescale_guided(guided: Tensor, cond: Tensor, phi: float) -> Tensor:
    """Guidance rescale (Lin et al. 2023, eq. 15-16) on [B, ...] x0 predictions.

    Large scales inflate the guided prediction's standard deviation (over-exposure); rescaling it
    per sample to the conditional one's std and mixing by phi (0.7 in the paper) undoes that.
    """
    dims = tuple(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


class ClassifierFreeGuidance:
    """A `ModelFn` (x_t, t) -> guided raw output for the samplers.

    Args:
        model: (x_t [B, C, h, w], t [B], context [B, L, D]) -> raw output (a `LatentDiffusion`).
        diffusion: gives the parameterization and learn_sigma (variance channels are taken from
            the conditional half, not guided) and the noise levels that rescale needs.
        cond, uncond: text contexts [B, L, D]; uncond encodes the negative prompt or "".
        scale: guidance scale s; s = 1 calls the model on cond only (exactly the conditional model).
        rescale: phi of guidance rescale, applied to the x0 prediction; 0 turns it off.
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
        alpha_bar = self.levels.alpha_bar(t.cpu()).to(x_t).reshape(-1, *([1] * (x_t.ndim - 1)))
        _, x0_guided = self.parameterization.to_eps_x0(guided, x_t, alpha_bar)
        _, x0_cond = self.parameterization.to_eps_x0(cond, x_t, alpha_bar)
        x0 = rescale_guided(x0_guided, x0_cond, self.rescale)
        # The eps that, with this x0, reproduces x_t (what an x0-network's output implies): the
        # output stays consistent with the state.
        eps, _ = X0_PREDICTION.to_eps_x0(x0, x_t, alpha_bar)
        return self.parameterization.from_eps_x0(eps, x0, alpha_bar)
