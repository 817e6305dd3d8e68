"""LoRA files on a `Pipeline` (generate.py's --lora): named and checked before any weights load, read and
fitted to the model right after it loads (before any step), applied, and recorded in each PNG.

    pipe = Pipeline.from_file("model.safetensors", loras=[("style.safetensors", 0.8), "detail.safetensors"])
    # the same as: generate.py ... --lora style.safetensors:0.8 --lora detail.safetensors

LoRAs stack: each adds `scale * alpha / rank * up @ down` to the layers it adapts (`ldm.lora`), in the
U-Net and the text encoder. By default each is a forward hook per adapted layer (the weights stay the
file's); `merge` bakes them into the weights at load instead, which costs nothing per step. A LoRA at
scale 0 is read and checked but not applied, so its images are the base model's.

The PNG records each LoRA: our JSON its file name, scale and sha256 prefix, A1111's text a
`<lora:NAME:SCALE>` tag after the prompt and `Lora hashes: "NAME: HASH"` as A1111 writes them
(`ldm.png_metadata`), and `find_recorded_loras` finds the files again for --from-png.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from common.weights import CheckpointError, file_sha256
from .lora import LoRAHandle, apply_lora, merge_lora, read_lora
from .original_format import UNKNOWN_FILE, TensorFile, model_file_kind

__all__ = ["LoRASpec", "LoadedLoRA", "a1111_hash", "check_lora_files", "find_recorded_loras", "load_loras",
           "lora_record", "lora_specs", "parse_lora_arg"]

# A key of a LoRA in a format ldm.lora_files reads: kohya's lora_down / lora_up, PEFT's lora_A / lora_B
# (also `lora_A.default.`), diffusers' older `to_q_lora.down.` and `lora_linear_layer.down.`.
LORA_KEY = re.compile(r"lora[._](down|up|A|B)\.|lora_linear_layer\.")
# The suffixes A1111 looks for a LoRA named in a prompt under (its Lora folder holds these).
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")


@dataclass(frozen=True)
class LoRASpec:
    """A LoRA file to draw with, and its scale (1: as trained; 0: read and checked, not applied)."""

    path: str
    scale: float = 1.0


def parse_lora_arg(text: str) -> LoRASpec:
    """generate.py's `--lora PATH[:SCALE]`: the scale follows the last ':' if it reads as a number
    ("style.safetensors:0.8"), else the whole text is the path with scale 1 ("C:\\loras\\x.safetensors"). A
    file whose own name ends in ':<number>' is taken whole when only it exists."""
    path, colon, tail = text.rpartition(":")
    if not (colon and path):
        return LoRASpec(text)
    try:
        scale = float(tail)
    except ValueError:
        return LoRASpec(text)
    if not Path(path).exists() and Path(text).is_file():
        return LoRASpec(text)
    return LoRASpec(path, scale)


def lora_specs(loras: Iterable, n: Callable[[str], str]) -> tuple[LoRASpec, ...]:
    """`Pipeline.from_file`'s loras=[...]: each a path (scale 1), a (path, scale) pair or a LoRASpec. A
    path is a path as it is (no ':SCALE' parsing). Anything else is a one-line TypeError naming `n('loras')`."""
    if isinstance(loras, (str, os.PathLike)):
        raise TypeError(f"{n('loras')} takes a list of LoRA files, got the single path {loras!s}; "
                        f"write [{str(loras)!r}]")
    specs = []
    for item in loras:
        if isinstance(item, LoRASpec):
            specs.append(item)
        elif isinstance(item, (str, os.PathLike)):
            specs.append(LoRASpec(str(item)))
        elif (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], (str, os.PathLike))
              and isinstance(item[1], (int, float)) and not isinstance(item[1], bool)):
            specs.append(LoRASpec(str(item[0]), float(item[1])))
        else:
            raise TypeError(f"{n('loras')}: each LoRA is a file path or a (path, scale) pair, got {item!r}")
    return tuple(specs)


def check_lora_files(specs: Sequence[LoRASpec], n: Callable[[str], str]) -> None:
    """What can be told without the model: each scale a finite number, each file there and holding LoRA
    weights (from its key names; a safetensors file's header only). One-line errors naming the file."""
    for spec in specs:
        if not math.isfinite(spec.scale):
            raise ValueError(f"{n('loras')} {spec.path}: the scale must be a finite number, got {spec.scale}")
        if not Path(spec.path).is_file():
            raise FileNotFoundError(f"LoRA file not found: {spec.path}")
        if not any(LORA_KEY.search(key) for key in TensorFile(spec.path).keys()):
            kind = model_file_kind(spec.path)
            what = ("a weights file without LoRA weights (no lora_down / lora_up or lora_A / lora_B keys)"
                    if kind is UNKNOWN_FILE else kind.description)
            raise ValueError(f"{spec.path} is {what}; {n('loras')} takes LoRA files (kohya / A1111 or "
                             "diffusers / PEFT)")


def a1111_hash(path: str | Path) -> str:
    """The hash A1111 writes in "Lora hashes" (its first 12 hex digits): for a safetensors file the sha256
    of everything after the header (kohya's "addnet" hash: metadata edits keep it), else of the file."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return file_sha256(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(8 + int.from_bytes(f.read(8), "little"))
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class LoadedLoRA:
    """A LoRA read for a pipeline's model: what was asked, the file's sha256 and A1111 hash (hex), the
    number of layers it adapts, and its hooks (None when merged or at scale 0)."""

    spec: LoRASpec
    sha256: str
    a1111_hash: str
    layers: int
    handle: LoRAHandle | None


def load_loras(model: nn.Module, specs: Sequence[LoRASpec], *, merge: bool, allow_partial: bool,
               n: Callable[[str], str]) -> list[LoadedLoRA]:
    """Read each LoRA for `model` (a LatentDiffusion: its U-Net and text encoder) and apply it at its scale,
    in order: as forward hooks, or with `merge` into the weights. Keys that match no layer and weights
    that do not fit are a one-line CheckpointError naming the file (with `allow_partial`, unmatched keys
    are a warning on stderr with their count; a LoRA matching nothing at all is still an error)."""
    loaded = []
    for spec in specs:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lora = read_lora(spec.path, model, allow_partial=allow_partial, partial_flag=n("lora_allow_partial"))
        for warning in caught:
            print(f"warning: {warning.message}", file=sys.stderr)
        if not lora.layers:
            raise CheckpointError(f"{spec.path}: none of its LoRA weights match a layer of the model (a LoRA "
                                  "for another model?)")
        handle = None
        if spec.scale != 0:  # at 0 a hook would add nothing but would turn the layer's fused kernels off
            if merge:
                merge_lora(model, lora, spec.scale)
            else:
                handle = apply_lora(model, lora, spec.scale)
        loaded.append(LoadedLoRA(spec, file_sha256(spec.path), a1111_hash(spec.path), len(lora.layers), handle))
    return loaded


def lora_record(loaded: Sequence[LoadedLoRA], merged: bool) -> dict:
    """The PNG record's LoRA fields (none without LoRAs, so other records stay as they were): file names,
    scales, sha256 prefixes (12 hex digits, as the checkpoint's), A1111's hashes, and whether merged."""
    if not loaded:
        return {}
    record = {"loras": [Path(lora.spec.path).name for lora in loaded],
              "lora_scales": [lora.spec.scale for lora in loaded],
              "lora_sha256": [lora.sha256[:12] for lora in loaded],
              "lora_hashes": [lora.a1111_hash[:12] for lora in loaded]}
    if merged:
        record["lora_merge"] = True
    return record


def find_recorded_loras(fields: dict, folders: Sequence[str | Path], source: str) -> tuple[list[LoRASpec], list[str]]:
    """The LoRAs a PNG record names (`loras`, `lora_scales`, hashes), found by file name in `folders` (in
    order; an A1111 name without suffix as NAME.safetensors / .pt / .ckpt). A file whose hash matches
    the record's is preferred. Returns the specs and warnings (a file found only with another hash); a
    LoRA not found is a one-line ValueError."""
    names, scales = fields.get("loras") or [], fields.get("lora_scales") or []
    shas, hashes = fields.get("lora_sha256") or [None] * len(names), fields.get("lora_hashes") or [None] * len(names)
    specs, notes = [], []
    for name, scale, sha, a1111 in zip(names, scales, shas, hashes):
        files = [Path(folder) / candidate for folder in folders for candidate in _file_names(name)]
        files = [path for path in files if path.is_file()]
        if not files:
            raise ValueError(f"{source} with the LoRA {name} (scale {scale:g}), not found in "
                             f"{', '.join(str(f) for f in folders)}: give it with --lora PATH:SCALE or "
                             "its folder with --lora-dir")
        matching = [path for path in files if _hash_matches(path, sha, a1111)]
        if not matching and (sha or a1111):
            notes.append(f"{files[0]} is not the LoRA {name} the image was drawn with (sha256 "
                         f"{sha or a1111}...); the images will differ")
        specs.append(LoRASpec(str((matching or files)[0]), float(scale)))
    return specs, notes


def _file_names(name: str) -> list[str]:
    return [name] if name.endswith(LORA_SUFFIXES) else [name + suffix for suffix in LORA_SUFFIXES]


def _hash_matches(path: Path, sha: str | None, a1111: str | None) -> bool:
    """Our record's sha256 prefix when it has one, else A1111's hash."""
    if sha:
        return file_sha256(path).startswith(sha.lower())
    return bool(a1111) and a1111_hash(path).startswith(a1111.lower())
