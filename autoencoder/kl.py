"""KL-regularised autoencoder (LDM/SD `AutoencoderKL`) and its diagonal Gaussian posterior."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import torch

from autoencoder.base import LatentAutoencoder, drop_training_params
from autoencoder.config import DDConfig, ddconfig_from
from autoencoder.modules import match_memory_format
from common.randomness import Generators, randn_like
from layers import Conv2d


class DiagonalGaussianDistribution:
    """N(mean, diag(exp(logvar))) over latents, built from the encoder's [B, 2C, h, w] output.

    logvar is clamped to [-30, 20] as in the original, which keeps exp() finite early in training.
    `deterministic=True` collapses it to its mean (zero variance, zero KL).
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.logvar = torch.zeros_like(self.mean)
            self.std = self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: Generators = None) -> torch.Tensor:
        """A reparameterised sample mean + std * eps, [B, C, h, w]; a list of B generators draws each
        sample's eps from its own (see common.randomness)."""
        if generator is None or isinstance(generator, torch.Generator):
            noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        else:
            noise = randn_like(self.mean, generator)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other), or KL(self || N(0, I)) when other is None, summed per sample: [B]."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        if other is None:
            terms = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            terms = (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
        return 0.5 * terms.sum(dim=(1, 2, 3))

    def nll(self, sample: torch.Tensor, dims: Iterable[int] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of `sample` under this distribution, summed over `dims`."""
        if self.deterministic:
            return torch.zeros(sample.shape[0], device=sample.device, dtype=sample.dtype)
        terms = math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var
        return 0.5 * terms.sum(dim=tuple(dims))


class AutoencoderKL(LatentAutoencoder):
    """Image [B, 3, H, W] in [-1, 1] <-> latent [B, embed_dim, H/f, W/f] with a Gaussian posterior.

    The constructor takes the `params` of an original LDM/SD config (`AutoencoderKL(**params)`).
    Training-side entries there (lossconfig, image_key, monitor, ema_decay, learn_logvar) are
    accepted and ignored: the loss is built separately and the training loop owns EMA.
    `ckpt_path` loads original weights (see `autoencoder.checkpoint`); `colorize_nlabels` keeps
    the original's random `colorize` buffer so segmentation checkpoints load strictly.
    """

    TRAINING_PARAMS = frozenset({"lossconfig", "image_key", "monitor", "ema_decay", "learn_logvar"})

    def __init__(self, ddconfig: DDConfig | dict, embed_dim: int, *, ckpt_path: str | Path | None = None,
                 ignore_keys: Iterable[str] = (), colorize_nlabels: int | None = None, **training_params: Any):
        drop_training_params("AutoencoderKL", training_params, self.TRAINING_PARAMS)
        cfg = ddconfig_from(ddconfig)
        if not cfg.double_z:
            raise ValueError("AutoencoderKL needs ddconfig.double_z: true (the encoder emits mean and logvar)")
        super().__init__(cfg, embed_dim)
        self.quant_conv = Conv2d(2 * cfg.z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = Conv2d(embed_dim, cfg.z_channels, 1)
        self.finish(colorize_nlabels, ckpt_path, ignore_keys)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """x [B, in_channels, H, W] -> posterior over [B, embed_dim, H/f, W/f]."""
        moments = self.quant_conv(self.encoder(match_memory_format(x, self.encoder.conv_in.weight)))
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, embed_dim, h, w] -> image [B, out_ch, h*f, w*f]."""
        return self.decoder(self.post_quant_conv(match_memory_format(z, self.decoder.conv_in.weight)))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruction [B, out_ch, H, W] and the posterior it was decoded from."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def encode_latents(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Unscaled diffusion latents: a posterior sample (or its mean when sample=False)."""
        posterior = self.encode(x)
        return posterior.sample(generator) if sample else posterior.mode()

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of `encode_latents` (same as `decode`)."""
        return self.decode(z)

