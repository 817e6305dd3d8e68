"""Stage 1: autoencoders that map images to latents (KL- or VQ-regularised) and their losses."""
from autoencoder.checkpoint import autoencoder_state_dict, load_autoencoder_weights
from autoencoder.build import build_autoencoder, build_autoencoder_loss
from autoencoder.config import AutoencoderConfig, AutoencoderLossConfig, DDConfig
from autoencoder.discriminator import NLayerDiscriminator
from autoencoder.kl import AutoencoderKL, DiagonalGaussianDistribution
from autoencoder.losses import AutoencoderLoss
from autoencoder.modules import Decoder, Encoder
from autoencoder.perceptual import LPIPS
from autoencoder.scale import measure_scale_factor
from autoencoder.vq import QuantizationInfo, VectorQuantizer, VQModel

__all__ = [
    "AutoencoderConfig",
    "AutoencoderKL",
    "AutoencoderLoss",
    "AutoencoderLossConfig",
    "DDConfig",
    "Decoder",
    "DiagonalGaussianDistribution",
    "Encoder",
    "LPIPS",
    "NLayerDiscriminator",
    "QuantizationInfo",
    "VQModel",
    "VectorQuantizer",
    "autoencoder_state_dict",
    "build_autoencoder",
    "build_autoencoder_loss",
    "load_autoencoder_weights",
    "measure_scale_factor",
]
