"""The stage-1 result file: autoencoder weights with their config and latent scale factor."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from torch import nn

from autoencoder.config import AutoencoderConfig, build_autoencoder
from training.checkpoint import CheckpointError, load_weights, read_metadata, save_weights
from training.config import from_dict


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
    state = load_weights(path)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{path}: weights do not fit the config in its metadata "
                              f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
    return model.eval(), cfg, float(meta["scale_factor"])
