"""Safe, atomic weight files, and the one strict way of loading weights into a module.

Weights are safetensors; optimizer and trainer state are `torch.save` files read back with
`weights_only=True`, so no pickle from a user's file is ever executed. Every write goes to a
temporary name first and is renamed into place, so a crash never leaves a half-written file
where a good one was.

Every file written here is byte-reproducible: the same tensors and metadata give the same bytes in
any process, so a file's sha256 names its content (a ControlNet records its stage-2 model's, and a
`--resume` that rewrites an unchanged model must not look like another model). Two things stood in
the way: safetensors serialises its metadata from a Rust HashMap, whose order is random per map, so
`_canonical_header` rewrites the header with sorted keys after `save_file`; and `torch.save` to a
path names the zip's records after the file, here a random temporary name, so `save_torch` writes
through a file object (records under `archive/`, as torch names them for any stream).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # reading the umask means setting it; put it back at once

# How many keys of each kind a mismatch message names.
SHOWN_KEYS = 5


class CheckpointError(RuntimeError, ValueError):
    """A checkpoint that is missing, corrupt or does not fit the model.

    Also a ValueError: a file that does not fit is bad input like any other, and the stage-1
    loaders raised ValueError before this class covered them.
    """


def save_weights(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, Any] | None = None) -> None:
    """Write `tensors` to `path` as safetensors, atomically and byte-reproducibly.

    `metadata` values are JSON-encoded with sorted keys, so equal dicts give equal bytes whatever
    order they were built in.
    """
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {k: json.dumps(v, sort_keys=True) for k, v in (metadata or {}).items()}
    atomic_write(path, lambda tmp: _save_safetensors(tensors, tmp, meta))


def _save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None) -> None:
    """`save_file`, then its header made canonical (see `_canonical_header`)."""
    save_file(tensors, path, metadata=metadata)
    _canonical_header(path)


def _canonical_header(path: str) -> None:
    """Rewrite a safetensors file's JSON header in place in one order: metadata first with its keys
    sorted, then the tensors in the order of their data (which safetensors fixes by dtype and name).

    The header holds the same text in another order, so it has the same length and the data offsets
    stay valid; it is padded with spaces to its old length, as safetensors pads it.
    """
    with open(path, "r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        metadata = header.pop("__metadata__", None)
        ordered = dict(sorted(header.items(), key=lambda item: (item[1]["data_offsets"], item[0])))
        if metadata is not None:
            ordered = {"__metadata__": dict(sorted(metadata.items())), **ordered}
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > size:  # cannot happen for serde_json's compact output; never write a broken file
            raise CheckpointError(f"{path}: the canonical safetensors header is longer than the written one")
        f.seek(8)
        f.write(text + b" " * (size - len(text)))


def load_weights(path: str | Path, device: str | torch.device = "cpu", prefix: str = "") -> dict[str, torch.Tensor]:
    """Read a weights file: safetensors, or a torch pickle under `weights_only=True`.

    A `.ckpt` holding {"state_dict": ...} is unwrapped. Anything else is a clear CheckpointError.
    With `prefix`, only the tensors named `prefix...`, under their names without it (a safetensors
    file reads only those).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            if not prefix:
                return load_file(str(path), device=str(device))
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    state = load_torch(path, map_location=device)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return {k[len(prefix):]: v for k, v in state.items() if isinstance(v, torch.Tensor) and k.startswith(prefix)}


def load_state_dict_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path, *,
                           what: str | None = None, file_key: Callable[[str], str] | None = None,
                           allow_missing: tuple[str, ...] = (), assign: bool = False, hint: str = "") -> None:
    """Load `state` into `module`; any missing, unexpected or mis-shaped key is a CheckpointError.

    Args:
        source: where the weights come from (a file's path), named first in the message.
        what: the module as the message calls it (default: its class name).
        file_key: a module key -> the name the file gives it (e.g. a prefix added), for the message.
        allow_missing: module key prefixes that may be absent (they keep their initial values).
        assign: passed to `load_state_dict` (keeps the given tensors, e.g. into a meta-device model).
        hint: a last sentence for the message (what to check).
    Shapes are compared before loading, so torch's size-mismatch RuntimeError never escapes; missing
    and unexpected keys come from torch's own (non-strict) load, so load hooks that fill in or drop
    keys are respected. On a mismatch the module may be partly loaded, as with torch's strict load.
    """
    expected = module.state_dict(keep_vars=True)
    misshaped = [k for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    fitting = {k: v for k, v in state.items() if k not in misshaped}
    result = module.load_state_dict(fitting, strict=False, assign=assign)
    missing = [k for k in result.missing_keys if k not in misshaped and not k.startswith(allow_missing or ("\0",))]
    if not (missing or result.unexpected_keys or misshaped):
        return
    name = file_key or (lambda k: k)
    shapes = [f"{name(k)} {tuple(state[k].shape)} (model {tuple(expected[k].shape)})" for k in misshaped]
    parts = [f"{len(keys)} {kind}, e.g. {keys[:SHOWN_KEYS]}" for kind, keys in (
        ("missing", [name(k) for k in missing]), ("unexpected", [name(k) for k in result.unexpected_keys]),
        ("mis-shaped", shapes)) if keys]
    message = f"{source}: {what or type(module).__name__} does not fit the weights: {'; '.join(parts)}"
    raise CheckpointError(f"{message}; {hint}" if hint else message)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON-decoded metadata of a safetensors file written by `save_weights`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    out = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (model files can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cast_weights_file(source: str | Path, target: str | Path, dtype: torch.dtype = torch.float16) -> None:
    """Copy a safetensors file with its floating-point tensors cast to `dtype`, metadata unchanged.

    Our model files load into float32 modules whatever the file's precision (load_state_dict casts),
    so an fp16 copy halves what is shipped or downloaded.
    """
    if Path(source).suffix != ".safetensors":
        raise CheckpointError(f"{source}: cast_weights_file copies .safetensors files only")
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_weights(source).items()}
    overflow = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if overflow:
        raise CheckpointError(f"{source}: {len(overflow)} tensors do not fit {dtype} (e.g. {overflow[0]})")
    with safe_open(str(source), framework="pt") as f:
        raw_metadata = f.metadata()  # copied as stored: not every writer's values are JSON
    atomic_write(Path(target), lambda tmp: _save_safetensors(tensors, tmp, raw_metadata))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file (results, tables) to a temporary name, then rename it into place."""
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_torch(obj: Any, path: str | Path) -> None:
    """`torch.save` to a temporary file, then rename; the same object gives the same bytes.

    Saved through a file object: given a path, torch names the zip's records after the file's stem,
    which here is the random temporary name. Reproducible as long as `obj` pickles in a fixed order
    (dicts and lists do; a set of strings would not, its order follows PYTHONHASHSEED).
    """
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    atomic_write(Path(path), write)


def load_torch(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load` with `weights_only=True`; a pickle that needs code execution is refused."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for unsafe or corrupt pickles
        raise CheckpointError(
            f"{path}: refused or unreadable (only safetensors or plain-tensor pickles are loaded): {first_line(e)}"
        ) from None


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Call `write(temporary name)` beside `path`, then rename the result to `path` (removed on failure)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, shared_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def shared_mode(directory: bool = False) -> int:
    """The permission bits the umask grants a new file (or folder), for what was made private-first.

    mkstemp's 0600 (mkdtemp's 0700) would make shared checkpoints unreadable to others on the machine.
    """
    return (0o777 if directory else 0o666) & ~_UMASK
