"""Models and losses from their config: the one place that knows every autoencoder kind."""
from __future__ import annotations

from torch import nn

from autoencoder.config import AutoencoderConfig, AutoencoderLossConfig
from autoencoder.kl import AutoencoderKL
from autoencoder.losses import AutoencoderLoss
from autoencoder.vq import VQModel


def build_autoencoder(cfg: AutoencoderConfig) -> nn.Module:
    """An AutoencoderKL or VQModel with freshly initialised weights."""
    if cfg.kind == "kl":
        return AutoencoderKL(ddconfig=cfg.ddconfig, embed_dim=cfg.embed_dim)
    if cfg.kind == "vq":
        return VQModel(
            ddconfig=cfg.ddconfig,
            n_embed=cfg.n_embed,
            embed_dim=cfg.embed_dim,
            sane_index_shape=cfg.sane_index_shape,
            beta=cfg.beta,
            legacy=cfg.legacy,
            codebook_ema=cfg.codebook_ema,
            ema_decay=cfg.ema_decay,
            ema_eps=cfg.ema_eps,
            dead_code_steps=cfg.dead_code_steps,
        )
    raise ValueError(f"model.kind must be 'kl' or 'vq', got {cfg.kind!r}")


def build_autoencoder_loss(cfg: AutoencoderLossConfig) -> nn.Module:
    """The reconstruction + regulariser + GAN loss module (holds the discriminator and logvar)."""
    return AutoencoderLoss(**vars(cfg))
