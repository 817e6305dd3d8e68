"""`TensorFile`: a `.safetensors` or `.ckpt` weights file read one tensor at a time, each in the dtype asked for.

Memory. A `.safetensors` file is memory-mapped (safetensors' `safe_open` maps it whole, privately), and a
tensor read in its stored dtype is a view of the mapping: its pages come from the file when first used
and count once, whether the file is mapped or copied. A tensor whose dtype changes is read with plain
file reads into a temporary instead, cast, and the temporary dropped. Cast from the mapping, its pages
would stay resident beside the cast copy for as long as the mapping lives, which is as long as any view
of it does (a float32 text encoder's, say): an SD 1.x U-Net loaded as bf16 from an fp32 file held its
3.2 GiB of float32 pages and its 1.6 GiB of bf16 copy at once (bench/generation_memory.py).

A `.ckpt` (a zip pickle) is mapped by `torch.load(mmap=True)`; where a tensor sits in the zip is torch's
business, so its tensors are cast from the mapping, and the pages of the ones cast stay resident while
the file is open. (A legacy, non-zip pickle cannot be mapped and is read whole.)
"""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from common.weights import CheckpointError, load_torch

__all__ = ["TensorFile"]

# safetensors' dtype tags of the floating-point tensors that may be read and cast without the mapping.
FLOAT_TAGS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
CHUNK_BYTES = 1 << 24  # what one plain read brings in: 16 MiB, a multiple of every FLOAT_TAGS dtype's size


class TensorFile:
    """Lazy, read-one-tensor-at-a-time view of a `.safetensors` or `.ckpt` weights file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {self.path}")
        self._floats: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        self._buffer: torch.Tensor | None = None
        if self.path.suffix == ".safetensors":
            try:
                self._handle = safe_open(str(self.path), framework="pt", device="cpu")
                self._keys = list(self._handle.keys())
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{self.path}: not a readable safetensors file ({e})") from None
            self._tensors = None
            if sys.byteorder == "little":  # the file's byte order: its bytes are the tensors' as they are
                self._floats = _float_layout(self.path)
        else:
            self._tensors = _load_pickle(self.path)
            self._keys = list(self._tensors)
        self._key_set = set(self._keys)

    def keys(self) -> list[str]:
        return self._keys

    def __contains__(self, key: str) -> bool:
        return key in self._key_set

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor `key`; a floating-point one as `dtype` when given (others as stored). In its stored
        dtype it is a view of the file's mapping, cast it is a tensor of its own (see the module doc)."""
        layout = self._floats.get(key)
        if dtype is not None and layout is not None and layout[0] != dtype:
            return self._read_cast(key, *layout, dtype)
        value = self._mapped(key)
        return value.to(dtype) if dtype is not None and value.is_floating_point() else value

    def _mapped(self, key: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[key]
        try:
            return self._handle.get_tensor(key)
        except Exception as e:  # noqa: BLE001 - a truncated file fails here, with several error types
            raise CheckpointError(f"{self.path}: tensor {key!r} cannot be read ({e}); is the file truncated?") from None

    def _read_cast(self, key: str, stored: torch.dtype, shape: list[int], start: int, end: int,
                   dtype: torch.dtype) -> torch.Tensor:
        """Tensor `key` as `dtype`, read with plain file reads CHUNK_BYTES at a time into one buffer kept for
        the file's reads (a temporary per tensor would leave the allocator's heap full of holes the size of
        the float32 tensors: 0.36 GiB of an SD U-Net's load to bf16, measured) and cast into place."""
        out = torch.empty(shape, dtype=dtype)
        flat, size = out.view(-1), stored.itemsize
        if flat.numel() * size != end - start:
            raise CheckpointError(f"{self.path}: tensor {key!r} has {end - start} bytes for shape {shape}")
        if self._buffer is None:
            self._buffer = torch.empty(CHUNK_BYTES, dtype=torch.uint8)
        step = CHUNK_BYTES // size
        with open(self.path, "rb") as f:
            f.seek(start)
            for first in range(0, flat.numel(), step):
                count = min(step, flat.numel() - first)
                chunk = self._buffer[:count * size]
                if f.readinto(memoryview(chunk.numpy())) != count * size:
                    raise CheckpointError(f"{self.path}: tensor {key!r} cannot be read (the file ends inside it); "
                                          "is the file truncated?")
                flat[first:first + count].copy_(chunk.view(stored))  # the rounding of .to(dtype)
        return out


def _float_layout(path: Path) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """Key -> (dtype, shape, first byte, end byte in the file) of each floating-point tensor of a
    safetensors file: 8 bytes of header length (little-endian), the JSON header, then the data, whose
    offsets the header gives from the data's start. `safe_open` has checked the header already."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    base = 8 + size
    return {key: (FLOAT_TAGS[entry["dtype"]], entry["shape"], base + entry["data_offsets"][0],
                  base + entry["data_offsets"][1])
            for key, entry in header.items() if key != "__metadata__" and entry["dtype"] in FLOAT_TAGS}


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - legacy (non-zip) pickles cannot be mmap'ed; unsafe ones are
        state = load_torch(path)  # refused by load_torch, with its message
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
