"""Text-encoder settings as a config dataclass, and the one place that turns them into a module."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .pretrained_text_encoders import (
    SD1_CLIP,
    SD2_OPENCLIP_ARCH,
    SD2_OPENCLIP_WEIGHTS,
    FrozenCLIPTextEncoder,
    FrozenOpenCLIPTextEncoder,
    HFTextEncoder,
)
from .text_encoders import TextEncoder, TransformerTextEncoder
from .tokenizer import END_OF_TEXT_ID


@dataclass
class TextEncoderConfig:
    """Which text encoder conditions the U-Net.

    kind:
      "transformer" a transformer over CLIP tokens trained with the U-Net (n_embed/n_layer/n_head/dropout).
      "clip"        Hugging Face CLIPTextModel, SD 1.x (name_or_path: hub id or folder,
                    default openai/clip-vit-large-patch14).
      "openclip"    open_clip text tower, SD 2.x (arch; name_or_path: weight tag or file,
                    default laion2b_s32b_b79k).
      "hf"          any Hugging Face encoder folder (name_or_path required).
    pretrained: False builds a pretrained kind's architecture without weights, for loading an SD
      checkpoint that carries them (cond_stage_model.*).
    layer: "last" | "penultimate"; default "penultimate" for openclip (SD 2.x), "last" otherwise.
    pad_with: token after the end of a CLIP-tokenised prompt, "end" (SD 1.x) or "zero" (open_clip);
      default "zero" for openclip, "end" for clip and transformer. Not used by "hf".
    freeze: pretrained kinds only; the trainable transformer always trains.
    """

    kind: Literal["transformer", "clip", "openclip", "hf"] = "transformer"
    name_or_path: str | None = None
    pretrained: bool = True
    arch: str = SD2_OPENCLIP_ARCH
    layer: Literal["last", "penultimate"] | None = None
    max_length: int = 77
    pad_with: Literal["end", "zero"] | None = None
    n_embed: int = 512
    n_layer: int = 4
    n_head: int = 8
    dropout: float = 0.0
    freeze: bool = True


def _pad_token_id(cfg: TextEncoderConfig, default: Literal["end", "zero"]) -> int:
    return END_OF_TEXT_ID if (cfg.pad_with or default) == "end" else 0


def build_text_encoder(cfg: TextEncoderConfig) -> TextEncoder:
    """The encoder `cfg` describes; `.context_dim` gives the U-Net's cross-attention width."""
    if cfg.kind == "transformer":
        if cfg.layer not in (None, "last"):
            raise ValueError(f"text encoder 'transformer' has no layer choice, got layer={cfg.layer!r}")
        return TransformerTextEncoder(n_embed=cfg.n_embed, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                      max_length=cfg.max_length, pad_token_id=_pad_token_id(cfg, "end"),
                                      dropout=cfg.dropout)
    if cfg.kind == "clip":
        name = (cfg.name_or_path or SD1_CLIP) if cfg.pretrained else None
        return FrozenCLIPTextEncoder(name, layer=cfg.layer or "last", max_length=cfg.max_length,
                                     pad_token_id=_pad_token_id(cfg, "end"), freeze=cfg.freeze)
    if cfg.kind == "openclip":
        weights = (cfg.name_or_path or SD2_OPENCLIP_WEIGHTS) if cfg.pretrained else None
        return FrozenOpenCLIPTextEncoder(cfg.arch, weights, layer=cfg.layer or "penultimate",
                                         max_length=cfg.max_length, pad_token_id=_pad_token_id(cfg, "zero"),
                                         freeze=cfg.freeze)
    if cfg.kind == "hf":
        if not cfg.name_or_path:
            raise ValueError("text encoder 'hf' needs name_or_path: a Hugging Face model folder")
        if not cfg.pretrained:
            raise ValueError("text encoder 'hf' always loads its weights (pretrained=False is for clip/openclip)")
        if cfg.pad_with is not None:
            raise ValueError("text encoder 'hf' pads with its own tokenizer's pad token; leave pad_with unset")
        return HFTextEncoder(cfg.name_or_path, layer=cfg.layer or "last", max_length=cfg.max_length, freeze=cfg.freeze)
    raise ValueError(f"unknown text encoder kind {cfg.kind!r} (transformer, clip, openclip, hf)")
