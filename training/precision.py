"""`train.mixed_precision: auto`: bf16 autocast where the device computes bf16 natively, float32 elsewhere.

On a CPU with AVX-512 BF16 or AMX, bf16 autocast trained the emoji U-Net 1.4-1.6x faster than float32
(85.3-103.0 against 62.8 samples/s) with the same loss curve (bench/RESULTS.md, "Training step"); a CPU without them emulates bf16
and runs it slower than float32. CUDA: Ampere and later GPUs (not emulated bf16).
"""
from __future__ import annotations

import torch

PRECISIONS = ("no", "fp16", "bf16", "auto")


def native_bf16(device_type: str) -> bool:
    """Whether devices of this kind ("cpu", "cuda", ...) here compute bf16 in hardware."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":  # (private torch helpers: a torch without them counts as no)
        return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                          "_is_amx_tile_supported"))
    return False


def resolve_mixed_precision(name: str, device_type: str) -> str:
    """accelerate's mixed_precision ("no", "fp16", "bf16") for a `train.mixed_precision` value on `device_type`."""
    if name not in PRECISIONS:
        raise ValueError(f"train.mixed_precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if name != "auto":
        return name
    return "bf16" if native_bf16(device_type) else "no"
