"""What the KL and VQ autoencoders share: the encoder/decoder pair and the original-format extras."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from autoencoder.checkpoint import load_autoencoder_weights
from autoencoder.config import DDConfig
from autoencoder.modules import Decoder, Encoder


def drop_training_params(model: str, params: dict[str, Any], training_side: frozenset[str]) -> None:
    """Accept the original config entries that configure training there (the loss, logging, learning
    rates, weight EMA: the training loop's jobs here) and reject anything else by name."""
    unknown = sorted(set(params) - training_side)
    if unknown:
        raise ValueError(f"{model}: unknown argument(s) {unknown}")


class LatentAutoencoder(nn.Module):
    """Encoder + decoder for `ddconfig`; subclasses add the latent bottleneck, then call `finish`."""

    def __init__(self, cfg: DDConfig, embed_dim: int):
        super().__init__()
        self.ddconfig = cfg
        self.embed_dim = embed_dim
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def finish(self, colorize_nlabels: int | None, ckpt_path: str | Path | None, ignore_keys: Iterable[str]) -> None:
        """Add the original's random `colorize` buffer (segmentation configs, so their checkpoints load
        strictly) and load `ckpt_path`, once every submodule exists."""
        if colorize_nlabels is not None:
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if ckpt_path is not None:
            load_autoencoder_weights(self, ckpt_path, ignore_keys)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ddconfig.ch_mult) - 1)

    def decoder_parameters(self) -> list[nn.Parameter]:
        """What maps latents to images (post_quant_conv, decoder): training only these keeps the latent
        space, so a stage 2 trained on it still fits (SD's fine-tuned decoders, sd-vae-ft-mse)."""
        return [*self.post_quant_conv.parameters(), *self.decoder.parameters()]

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight, where the GAN loss balances its gradient against the rest."""
        return self.decoder.conv_out.weight
