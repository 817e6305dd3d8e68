"""Models and losses from their config: the one place that knows every autoencoder kind."""
from __future__ import annotations

from torch import nn

from autoencoder.config import AutoencoderConfig, AutoencoderLossConfig
from autoencoder.kl import AutoencoderKL
from autoencoder.losses import AutoencoderLoss
from autoencoder.vq import QUANTIZER_OPTIONS, VQModel


def build_autoencoder(cfg: AutoencoderConfig) -> nn.Module:
    """An AutoencoderKL or VQModel with freshly initialised weights."""
    if cfg.kind == "kl":
        return AutoencoderKL(ddconfig=cfg.ddconfig, embed_dim=cfg.embed_dim)
    if cfg.kind == "vq":
        codebook = {k: getattr(cfg, k) for k in QUANTIZER_OPTIONS if hasattr(cfg, k)}
        return VQModel(ddconfig=cfg.ddconfig, n_embed=cfg.n_embed, embed_dim=cfg.embed_dim, **codebook)
    raise ValueError(f"model.kind must be 'kl' or 'vq', got {cfg.kind!r}")


def build_autoencoder_loss(cfg: AutoencoderLossConfig) -> nn.Module:
    """The reconstruction + regulariser + GAN loss module (holds the discriminator and logvar)."""
    return AutoencoderLoss(**vars(cfg))
