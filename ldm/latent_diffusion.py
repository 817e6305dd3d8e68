"""The stage-2 model: a text-conditioned U-Net denoising a frozen autoencoder's latents.

`LatentDiffusion` bundles what sampling and training need (U-Net, text encoder, autoencoder,
diffusion process, latent scale factor) and is saved as one safetensors file with its config in the
metadata, so `LatentDiffusion.load(path)` needs nothing else.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from autoencoder import AutoencoderConfig, build_autoencoder
from autoencoder.model_file import check_file_format
from autoencoder.tiling import decode_tiled
from common.config import from_dict
from common.weights import CheckpointError, file_sha256, load_state_dict_strict, load_weights, read_metadata, save_weights
from conditioning import TextEncoderConfig, build_text_encoder
from ldm.diffusion import Diffusion, DiffusionConfig
from ldm.unet import UNetConfig, UNetModel

FILE_FORMAT = "ldm-stage2"


def check_text_to_image_unet(unet: UNetConfig, source: str = "config") -> None:
    """A LatentDiffusion U-Net is conditioned on text only: no class labels or ADM vectors (`y`)."""
    if unet.num_classes is not None:
        raise ValueError(f"{source}: unet num_classes={unet.num_classes!r} is not supported: this text-to-image "
                         "model conditions on text only (num_classes must be null)")


@dataclass
class LatentDiffusionConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)


class LatentDiffusion(nn.Module):
    """U-Net + text encoder + frozen autoencoder + diffusion process.

    Latents seen by the U-Net are `scale_factor * autoencoder latents`, so they have about unit
    variance (SD: 0.18215). `latent_sample` says which latents it was trained on: posterior samples
    (true, as LDM and SD) or the posterior means (false, train_stage2.py's `latent_sample: false`); the
    file records it so that fine-tuning it (ControlNet, LoRA, DreamBooth) trains on the same latents.
    """

    def __init__(self, cfg: LatentDiffusionConfig, autoencoder: nn.Module, autoencoder_cfg: AutoencoderConfig,
                 scale_factor: float, latent_sample: bool = True):
        super().__init__()
        self.cfg, self.autoencoder_cfg, self.scale_factor = cfg, autoencoder_cfg, float(scale_factor)
        self.latent_sample = latent_sample
        self.text_encoder = build_text_encoder(cfg.text)
        check_text_to_image_unet(cfg.unet)
        unet_cfg = replace(cfg.unet, context_dim=cfg.unet.context_dim or self.text_encoder.context_dim)
        if unet_cfg.context_dim != self.text_encoder.context_dim:
            raise ValueError(f"unet.context_dim {unet_cfg.context_dim} does not match the text encoder's "
                             f"width {self.text_encoder.context_dim}")
        latent_channels = autoencoder_cfg.embed_dim
        out_channels = latent_channels * (2 if cfg.diffusion.learn_sigma else 1)
        if cfg.unet.in_channels != latent_channels or cfg.unet.out_channels != out_channels:
            raise ValueError(f"unet in/out channels must be {latent_channels}/{out_channels} for this autoencoder "
                             f"(embed_dim {latent_channels}, learn_sigma {cfg.diffusion.learn_sigma}); "
                             f"got {cfg.unet.in_channels}/{cfg.unet.out_channels}")
        self.unet = UNetModel(unet_cfg)
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.diffusion = Diffusion.from_config(cfg.diffusion)

    @property
    def latent_channels(self) -> int:
        return self.autoencoder_cfg.embed_dim

    @property
    def latent_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for kl-f8)."""
        return self.autoencoder.downsample_factor

    @property
    def default_image_size(self) -> int:
        """The image side the U-Net was trained at (its `image_size` in latent pixels), else SD's 512."""
        latent = self.cfg.unet.image_size
        return latent * self.latent_factor if latent else 512

    def to(self, *args, **kwargs):
        module = super().to(*args, **kwargs)
        self.diffusion.to(next(self.unet.parameters()).device)
        return module

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> cross-attention context [B, L, context_dim]."""
        return self.text_encoder(list(prompts))

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, sample: bool = True,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> scaled latents [B, C, H/f, W/f]."""
        return self.autoencoder.encode_latents(images, sample=sample, generator=generator) * self.scale_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Scaled latents [B, C, h, w] -> images [B, 3, h*f, w*f] in about [-1, 1]. tile: decode in
        overlapping tiles of `tile` x `tile` pixels, a quarter shared with each neighbour
        (`autoencoder.tiling`), so that the decoder's memory follows the tile, not the image; None: whole."""
        z = latents / self.scale_factor
        if tile is None:
            return self.autoencoder.decode_latents(z)
        side = max(1, tile // self.latent_factor)
        return decode_tiled(self.autoencoder.decode_latents, z, side, side // 4, self.latent_factor)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **unet_kwargs) -> torch.Tensor:
        """The U-Net's prediction at noisy latents x_t [B, C, h, w], timesteps t [B], context [B, L, D]."""
        return self.unet(x_t, t, context=context, **unet_kwargs)

    # -- one-file checkpoints -------------------------------------------------------------------

    def save(self, path: str | Path, unet_state: dict[str, torch.Tensor] | None = None,
             text_state: dict[str, torch.Tensor] | None = None) -> None:
        """Write U-Net, text encoder (when it trains or carries no pretrained source) and autoencoder
        weights plus configs to one safetensors file. `unet_state` / `text_state` replace the live
        weights (e.g. with EMA ones)."""
        tensors = {f"unet.{k}": v for k, v in (unet_state or self.unet.state_dict()).items()}
        if self._stores_text_encoder():
            tensors.update({f"text_encoder.{k}": v for k, v in (text_state or self.text_encoder.state_dict()).items()})
        tensors.update({f"autoencoder.{k}": v for k, v in self.autoencoder.state_dict().items()})
        save_weights(tensors, path, {"format": FILE_FORMAT, "config": asdict(self.cfg),
                                     "autoencoder": asdict(self.autoencoder_cfg), "scale_factor": self.scale_factor,
                                     "latent_sample": self.latent_sample})

    def _stores_text_encoder(self) -> bool:
        trains = any(p.requires_grad for p in self.text_encoder.parameters())
        return trains or self.cfg.text.kind == "transformer" or not self.cfg.text.pretrained

    @staticmethod
    def read_configs(path: str | Path) -> tuple[LatentDiffusionConfig, AutoencoderConfig, float]:
        """(config, autoencoder config, scale factor) of a file written by `save`, without its weights;
        a file of another kind is a CheckpointError that says what it is."""
        meta = read_metadata(path)
        check_file_format(path, meta, FILE_FORMAT, "train_stage2.py's model.safetensors")
        cfg = from_dict(LatentDiffusionConfig, meta["config"], source=str(path))
        ae_cfg = from_dict(AutoencoderConfig, meta["autoencoder"], source=str(path))
        return cfg, ae_cfg, meta["scale_factor"]

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> LatentDiffusion:
        """Rebuild a model written by `save`; a file of another kind is a clear CheckpointError."""
        cfg, ae_cfg, scale_factor = cls.read_configs(path)
        # Files written before the key existed were all trained on posterior samples.
        latent_sample = read_metadata(path).get("latent_sample", True)
        if not isinstance(latent_sample, bool):
            raise CheckpointError(f"{path}: metadata latent_sample must be true or false, got {latent_sample!r}")
        model = cls(cfg, build_autoencoder(ae_cfg), ae_cfg, scale_factor, latent_sample)
        weights = load_weights(path)
        for prefix, module in (("unet.", model.unet), ("autoencoder.", model.autoencoder),
                               ("text_encoder.", model.text_encoder)):
            state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
            if prefix == "text_encoder." and not state:
                continue  # a frozen pretrained encoder, rebuilt from its own source above
            load_state_dict_strict(module, state, path, what=f"the model's '{prefix}*' part",
                                   file_key=lambda k, prefix=prefix: prefix + k)
        return model.to(device).eval()


def same_unet_as(path: str | Path, sha256: str | None = None) -> set[str]:
    """sha256 of the files whose U-Net the model file at `path` (of hash `sha256`, when known) shares,
    its own included: a ControlNet or LoRA trained on any of them fits it."""
    meta = read_metadata(path) if str(path).endswith(".safetensors") else {}
    shared = meta.get("same_unet_as", [])
    return {sha256 or file_sha256(path), *(shared if isinstance(shared, list) else [])}
