"""The stage-1 result file: autoencoder weights with their config and latent scale factor."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from torch import nn

from autoencoder.build import build_autoencoder
from autoencoder.config import AutoencoderConfig
from common.config import from_dict
from common.weights import CheckpointError, load_state_dict_strict, load_weights, read_metadata, save_weights


FILE_FORMAT = "ldm-stage1"
STAGE2_FORMAT = "ldm-stage2"  # a stage-2 model file holds its autoencoder under "autoencoder."
# What each weights file of this project says it is (its "format" metadata), so that a loader handed
# another one can name it. The formats above stage 1 are written in ldm/ (latent_diffusion.py,
# controlnet.py, original_format.py); stage 1 is the lowest package with a model file, so the list is here.
FILE_DESCRIPTIONS = {
    FILE_FORMAT: "a stage-1 autoencoder file written by train_stage1.py",
    STAGE2_FORMAT: "a stage-2 model file written by train_stage2.py",
    "ldm-controlnet": "a ControlNet file written by train_controlnet.py",
    "ldm-original": "an original-format model file written by ldm.original_format.export_original",
}


def save_autoencoder(model: nn.Module, cfg: AutoencoderConfig, path: str | Path, scale_factor: float) -> None:
    """Write `model`'s weights to `path` (safetensors) with `cfg` and `scale_factor` in the metadata."""
    save_weights(model.state_dict(), path, {"format": FILE_FORMAT, "config": asdict(cfg), "scale_factor": scale_factor})


def read_autoencoder_config(path: str | Path) -> tuple[AutoencoderConfig, float]:
    """(config, latent scale factor) of the autoencoder in `path` without reading its weights: a file
    written by `save_autoencoder`, or a stage-2 model file (which carries its autoencoder). A
    CheckpointError says what the file is when it is another kind (e.g. a ControlNet file)."""
    cfg, scale_factor, _ = _autoencoder_entry(path)
    return cfg, scale_factor


def load_autoencoder(path: str | Path) -> tuple[nn.Module, AutoencoderConfig, float]:
    """(model in eval mode, its config, latent scale factor) from a stage-1 or stage-2 model file."""
    cfg, scale_factor, prefix = _autoencoder_entry(path)
    model = build_autoencoder(cfg)
    load_state_dict_strict(model, load_weights(path, prefix=prefix), path,
                           what="the autoencoder its metadata describes", file_key=lambda k: prefix + k)
    return model.eval(), cfg, scale_factor


def _autoencoder_entry(path: str | Path) -> tuple[AutoencoderConfig, float, str]:
    """(config, scale factor, prefix of its tensors' names) of the autoencoder a model file holds."""
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    meta = read_metadata(path) if str(path).endswith(".safetensors") else {}
    if meta.get("format") == STAGE2_FORMAT:
        return from_dict(AutoencoderConfig, meta["autoencoder"], source=str(path)), float(meta["scale_factor"]), \
            "autoencoder."
    check_file_format(path, meta, FILE_FORMAT, "train_stage1.py's autoencoder.safetensors, or a stage-2 "
                      "model.safetensors")
    return from_dict(AutoencoderConfig, meta["config"], source=str(path)), float(meta["scale_factor"]), ""


def check_file_format(path: str | Path, meta: dict, expected: str, usual_name: str) -> None:
    """A CheckpointError unless `meta` (a weights file's metadata) has format `expected`; it says what the
    file is instead when its format is one of ours, e.g. "x is a stage-2 model file ..., not a stage-1 ..."."""
    found = meta.get("format")
    if found == expected:
        return
    wanted = FILE_DESCRIPTIONS[expected].split(" written by ")[0]
    what = FILE_DESCRIPTIONS.get(found) if isinstance(found, str) else None
    if what:
        raise CheckpointError(f"{path} is {what}, not {wanted} ({usual_name})")
    raise CheckpointError(f"{path}: not {FILE_DESCRIPTIONS[expected]} (no {expected} metadata)")
