"""The stage-1 result file: autoencoder weights with their config and latent scale factor."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from torch import nn

from autoencoder.build import build_autoencoder
from autoencoder.config import AutoencoderConfig
from common.config import from_dict
from common.weights import CheckpointError, load_state_dict_strict, load_weights, read_metadata, save_weights


def save_autoencoder(model: nn.Module, cfg: AutoencoderConfig, path: str | Path, scale_factor: float) -> None:
    """Write `model`'s weights to `path` (safetensors) with `cfg` and `scale_factor` in the metadata."""
    save_weights(model.state_dict(), path, {"format": "ldm-stage1", "config": asdict(cfg), "scale_factor": scale_factor})


def load_autoencoder(path: str | Path) -> tuple[nn.Module, AutoencoderConfig, float]:
    """(model in eval mode, its config, latent scale factor) from a file written by `save_autoencoder`."""
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    meta = read_metadata(path) if str(path).endswith(".safetensors") else {}
    if meta.get("format") != "ldm-stage1":
        raise CheckpointError(f"{path}: not a stage-1 autoencoder file written by train_stage1.py "
                              "(no ldm-stage1 metadata)")
    cfg = from_dict(AutoencoderConfig, meta["config"], source=str(path))
    model = build_autoencoder(cfg)
    load_state_dict_strict(model, load_weights(path), path, what="the autoencoder its metadata describes")
    return model.eval(), cfg, float(meta["scale_factor"])
