"""Safe, atomic checkpoint files.

Weights are safetensors; optimizer and trainer state are `torch.save` files read back with
`weights_only=True`, so no pickle from a user's file is ever executed. Every write goes to a
temporary name first and is renamed into place, so a crash never leaves a half-written checkpoint
where a good one was.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # reading the umask means setting it; put it back at once


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt or does not fit the model."""


def save_weights(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, Any] | None = None) -> None:
    """Write `tensors` to `path` as safetensors, atomically. `metadata` values are JSON-encoded."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a weights file: safetensors, or a torch pickle under `weights_only=True`.

    A `.ckpt` holding {"state_dict": ...} is unwrapped. Anything else is a clear CheckpointError.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device=str(device))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    state = load_torch(path, map_location=device)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON-decoded metadata of a safetensors file written by `save_weights`."""
    from safetensors import safe_open

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
    from safetensors import safe_open

    if Path(source).suffix != ".safetensors":
        raise CheckpointError(f"{source}: cast_weights_file copies .safetensors files only")
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_weights(source).items()}
    overflow = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if overflow:
        raise CheckpointError(f"{source}: {len(overflow)} tensors do not fit {dtype} (e.g. {overflow[0]})")
    with safe_open(str(source), framework="pt") as f:
        raw_metadata = f.metadata()  # copied as stored: not every writer's values are JSON
    _atomic(Path(target), lambda tmp: save_file(tensors, tmp, metadata=raw_metadata))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file (results, tables) to a temporary name, then rename it into place."""
    _atomic(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_torch(obj: Any, path: str | Path) -> None:
    """`torch.save` to a temporary file, then rename."""
    _atomic(Path(path), lambda tmp: torch.save(obj, tmp))


def load_torch(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load` with `weights_only=True`; a pickle that needs code execution is refused."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for unsafe or corrupt pickles
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused or unreadable (only safetensors or plain-tensor pickles are loaded): {first}"
        ) from None


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would make shared checkpoints unreadable to others
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class CheckpointDir:
    """`<run>/checkpoints/step_XXXXXXXX/` folders, each complete or absent; keeps the last `keep`."""

    def __init__(self, root: str | Path, keep: int = 3):
        self.root = Path(root)
        self.keep = keep

    def steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        found = []
        for d in self.root.iterdir():
            if d.is_dir() and d.name.startswith("step_") and (d / "trainer_state.pt").is_file():
                found.append(int(d.name[len("step_"):]))
        return sorted(found)

    def latest(self) -> Path | None:
        steps = self.steps()
        return self.path(steps[-1]) if steps else None

    def path(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def write(self, step: int, fill) -> Path:
        """Call `fill(folder)` on a temporary folder, then rename it to step_XXXXXXXX and prune old ones."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path(step)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".step_{step:08d}."))
        try:
            fill(tmp)
            os.chmod(tmp, 0o777 & ~_UMASK)  # as for files in `_atomic`
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.steps()[: -self.keep]:
            shutil.rmtree(self.path(old), ignore_errors=True)
        return final
