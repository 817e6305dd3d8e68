"""LoRA files: the in-memory form, and reading / writing the kohya / A1111 and diffusers / PEFT formats.

In memory a LoRA is one `LoRALayer` (down, up, alpha) per adapted layer, keyed by the layer's name in
this project's model (`unet.<path>`, `text_encoder.<path>`; `ldm.lora_keys`), in the layout of that
layer's weight: down [r, in] and up [out, r] for a linear layer, down [r, in, kh, kw] and up
[out, r, 1, 1] for a convolution. Files name layers by other implementations' paths and store 1x1
convolutions and linear layers interchangeably (SD 1.x's proj_in is a 1x1 conv, SD 2.x's a linear
layer); reading puts every layer into its model layer's layout, and checks that it fits.
"""
from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from common.weights import CheckpointError, load_weights, read_metadata, save_weights
from ldm.lora_keys import TEXT, UNET, TargetTable
from ldm.unet import UNetModel

FORMATS = ("kohya", "peft")
SHOWN = 5  # keys named in a message

# File key suffix -> role; the module name is what comes before it.
_SUFFIXES = (("lora_down.weight", "down"), ("lora_up.weight", "up"), ("lora_A.weight", "down"), ("lora_B.weight", "up"),
             ("lora.down.weight", "down"), ("lora.up.weight", "up"), ("lora_linear_layer.down.weight", "down"),
             ("lora_linear_layer.up.weight", "up"), ("alpha", "alpha"))
# diffusers' older attention-processor form: `...attn1.processor.to_q_lora.down.weight`.
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
# PEFT's raw state_dict names the adapter: `...to_q.lora_A.default.weight`.
_ADAPTER_NAME = re.compile(r"\.(lora_[AB])\.[^.]+\.weight$")
_PEFT_META = "lora_adapter_metadata"


@dataclass
class LoRALayer:
    """One adapted layer: down [r, in] / [r, in, kh, kw], up [out, r] / [out, r, 1, 1], alpha."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """`alpha / rank * up @ down` shaped like the layer's weight ([out, in] or [out, in, kh, kw]), float32."""
        product = self.up.flatten(1).float() @ self.down.flatten(1).float()
        return (self.alpha / self.rank) * product.reshape(self.up.shape[0], *self.down.shape[1:])


@dataclass
class LoRA:
    """LoRA layers by target (`unet.<our module path>` / `text_encoder.<path>`) and where they came from."""

    layers: dict[str, LoRALayer] = field(default_factory=dict)
    source: str = "LoRA"


def model_parts(model: nn.Module | Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """The parts a LoRA can target: a UNetModel is the `unet`; a LatentDiffusion (or any module)
    gives its `unet` / `text_encoder` attributes; a mapping is taken as it is."""
    if isinstance(model, Mapping):
        return dict(model)
    if isinstance(model, UNetModel):
        return {UNET: model}
    return {part: getattr(model, part) for part in (UNET, TEXT) if isinstance(getattr(model, part, None), nn.Module)}


# ----------------------------------------------------------------------------- reading

PARTIAL_FLAG = "allow_partial / --allow-partial"  # the keyword and `python -m ldm.lora merge`'s flag


def read_lora(path: str | Path, model: nn.Module | Mapping[str, nn.Module], allow_partial: bool = False,
              partial_flag: str = PARTIAL_FLAG) -> LoRA:
    """Read a kohya / A1111 or diffusers / PEFT LoRA file for `model` (see `model_parts`).

    Keys naming no layer of the model are a CheckpointError naming some of them and the caller's way to
    skip them, `partial_flag` (with `allow_partial`, a warning with their count); weights that do not fit their layer are a
    CheckpointError naming the key and both shapes. A file without alphas means alpha = rank.
    """
    tensors = load_weights(path)
    return lora_from_state_dict(tensors, model, str(path), allow_partial, _peft_alphas(path), partial_flag)


def lora_from_state_dict(tensors: Mapping[str, torch.Tensor], model: nn.Module | Mapping[str, nn.Module],
                         source: str = "LoRA", allow_partial: bool = False,
                         default_alphas: Mapping[str, object] | None = None,
                         partial_flag: str = PARTIAL_FLAG) -> LoRA:
    """`read_lora` on tensors already in memory; `default_alphas` is diffusers' adapter metadata by part."""
    table = TargetTable(model_parts(model))
    found: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unmatched = []
    for key, value in tensors.items():
        module_name, role = _split_key(key)
        target = table.lookup(module_name) if role else None
        if target is None and role and "." in module_name and not module_name.startswith(("lora_", UNET, TEXT)):
            target = table.lookup(f"{UNET}.{module_name.removeprefix('base_model.model.')}")
        if target is None:
            unmatched.append(key)
            continue
        found.setdefault(target.name, {})[role] = (key, value)
    if unmatched:
        message = (f"{source}: {len(unmatched)} of {len(tensors)} LoRA keys match no layer of the model, "
                   f"e.g. {unmatched[:SHOWN]}")
        if not allow_partial:
            raise CheckpointError(f"{message} (a LoRA for another model or format; {partial_flag} skips them)")
        warnings.warn(f"{message}; skipped", stacklevel=2)
    lora = LoRA(source=source)
    for name, roles in sorted(found.items()):
        if "down" not in roles or "up" not in roles:
            key = next(iter(roles.values()))[0]
            raise CheckpointError(f"{source}: {key} has no matching {'up' if 'down' in roles else 'down'} weight")
        target = table.targets[name]
        down, up = _fit(roles["down"], roles["up"], target.module, name, source)
        alpha = float(roles["alpha"][1]) if "alpha" in roles else _default_alpha(default_alphas, target, down.shape[0])
        lora.layers[name] = LoRALayer(down, up, alpha)
    return lora


def _split_key(key: str) -> tuple[str, str | None]:
    """A file key -> (module name as the file gives it, role 'down' / 'up' / 'alpha'), role None if no LoRA key."""
    match = _PROCESSOR.search(key)
    if match:
        module = match.group(1) + (".0" if match.group(1) == "to_out" else "")
        return f"{key[:match.start()]}.{module}", match.group(2)
    key = _ADAPTER_NAME.sub(r".\1.weight", key)
    for suffix, role in _SUFFIXES:
        if key.endswith("." + suffix):
            return key[:-len(suffix) - 1], role
    return key, None


def _fit(down_item: tuple[str, torch.Tensor], up_item: tuple[str, torch.Tensor], module: nn.Module, name: str,
         source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """down / up in the layout of `module`'s weight (float32), or a one-line CheckpointError."""
    (key, down), (_, up) = down_item, up_item
    down, up = down.float(), up.float()
    weight = tuple(module.weight.shape)
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        if down.ndim == 2 and weight[2:] == (1, 1):  # a linear LoRA on a 1x1 conv (SD 2.x file on SD 1.x)
            down, up = down[:, :, None, None], up[:, :, None, None]
        fits = down.ndim == 4 and up.ndim == 4 and tuple(down.shape[1:]) == weight[1:] and up.shape[2:] == (1, 1)
    else:
        if down.ndim == 4 and down.shape[2:] == (1, 1) and up.ndim == 4 and up.shape[2:] == (1, 1):
            down, up = down.flatten(1), up.flatten(1)  # a 1x1-conv LoRA on a linear layer (SD 1.x file on SD 2.x)
        fits = isinstance(module, nn.Linear) and down.ndim == 2 and up.ndim == 2 and down.shape[1] == weight[1]
    fits = fits and up.shape[0] == weight[0] and up.shape[1] == down.shape[0]
    if not fits:
        raise CheckpointError(f"{source}: {key} does not fit the model's {name}: LoRA down {tuple(down_item[1].shape)}"
                              f" / up {tuple(up_item[1].shape)}, model weight {weight} (a LoRA for another model?)")
    return down.contiguous(), up.contiguous()


def _peft_alphas(path: str | Path) -> dict[str, object]:
    """diffusers' `lora_adapter_metadata` ({"unet.lora_alpha": ..., "unet.alpha_pattern": ...}) by part."""
    if Path(path).suffix != ".safetensors":
        return {}
    raw = read_metadata(path).get(_PEFT_META)
    meta = json.loads(raw) if isinstance(raw, str) else raw if isinstance(raw, dict) else {}
    return {part: {k[len(part) + 1:]: v for k, v in meta.items() if k.startswith(part + ".")} for part in (UNET, TEXT)}


def _default_alpha(alphas: Mapping[str, object] | None, target, rank: int) -> float:
    config = (alphas or {}).get(target.peft.split(".", 1)[0]) or {}
    path = target.peft.split(".", 1)[1]
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if path == pattern or path.endswith("." + pattern):
            return float(alpha)
    return float(config.get("lora_alpha", rank))


# ----------------------------------------------------------------------------- writing


def lora_state_dict(lora: LoRA, model: nn.Module | Mapping[str, nn.Module], format: str = "kohya") -> dict:
    """The tensors of a LoRA file in `format`.

    kohya: `lora_unet_<diffusers path>.lora_down.weight` / `.lora_up.weight` / `.alpha` (as sd-scripts
    writes, text encoder `lora_te_<transformers path>`). peft: `unet.<diffusers path>.lora_A.weight` /
    `.lora_B.weight` with alpha / rank folded into lora_B, since diffusers reads a PEFT file without
    alphas as alpha = rank for every layer.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown LoRA format {format!r}; choose one of {', '.join(FORMATS)}")
    table = TargetTable(model_parts(model))
    out = {}
    for name, layer in lora.layers.items():
        target = table.targets.get(name)
        if target is None:
            raise ValueError(f"{lora.source}: {name} is not a layer of the model")
        if format == "kohya":
            out[f"{target.kohya}.lora_down.weight"] = layer.down
            out[f"{target.kohya}.lora_up.weight"] = layer.up
            out[f"{target.kohya}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
        else:
            out[f"{target.peft}.lora_A.weight"] = layer.down
            out[f"{target.peft}.lora_B.weight"] = layer.up * (layer.alpha / layer.rank)
    return out


def write_lora(lora: LoRA, path: str | Path, model: nn.Module | Mapping[str, nn.Module], format: str = "kohya",
               dtype: torch.dtype = torch.float32, metadata: dict | None = None) -> None:
    """Write `lora` (for `model`) as a `.safetensors` file in `format` ('kohya' or 'peft'), atomically."""
    tensors = {k: v.to(dtype) for k, v in lora_state_dict(lora, model, format).items()}
    save_weights(tensors, path, metadata)
