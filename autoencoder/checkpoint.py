"""Loading original LDM/SD autoencoder weights.

Accepts a stand-alone autoencoder checkpoint (`encoder.*`, `decoder.*`, ..., plus `loss.*` from
training) or a full Stable Diffusion checkpoint (`first_stage_model.*`), as .ckpt or .safetensors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from common.weights import load_state_dict_strict, load_weights

FULL_MODEL_PREFIX = "first_stage_model."
# Training-only state that is never part of the autoencoder itself: LPIPS, discriminator and
# logvar (`loss.*`), and the original VQModel's weight EMA (`model_ema.*`).
TRAINING_ONLY_PREFIXES = ("loss.", "model_ema.")


def autoencoder_state_dict(weights: dict[str, torch.Tensor], ignore_keys: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """The autoencoder's own tensors out of a checkpoint's flat tensor map.

    Keys under `first_stage_model.` are taken (prefix stripped) when present; `loss.*`,
    `model_ema.*` and any key starting with one of `ignore_keys` are dropped.
    """
    if any(k.startswith(FULL_MODEL_PREFIX) for k in weights):
        weights = {k[len(FULL_MODEL_PREFIX):]: v for k, v in weights.items() if k.startswith(FULL_MODEL_PREFIX)}
    drop = TRAINING_ONLY_PREFIXES + tuple(ignore_keys)
    return {k: v for k, v in weights.items() if not k.startswith(drop)}


def load_autoencoder_weights(model: nn.Module, path: str | Path, ignore_keys: Iterable[str] = ()) -> None:
    """Load an original-format checkpoint into `model` strictly (keys from `ignore_keys` excepted).

    Raises CheckpointError (a ValueError) naming the first missing, unexpected and mis-shaped keys
    when the layouts differ.
    """
    ignore_keys = tuple(ignore_keys)
    state = autoencoder_state_dict(load_weights(path), ignore_keys)
    load_state_dict_strict(model, state, path, allow_missing=ignore_keys,
                           hint="check ddconfig/embed_dim against the checkpoint")
