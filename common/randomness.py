"""Random draws that belong to a sample, not to a batch or a process.

A training step's randomness (posterior samples, caption dropout, timesteps, noise) is drawn from one
generator per sample, seeded by (run seed, the sample's key). The same sample then gets the same
numbers whatever the batch size, the gradient accumulation or the number of processes it is trained
in, so N processes with batch B / N train the model one process trains with batch B, and a run can
resume on another number of processes. Sampling uses the same per-image streams (batch invariance).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Generators = torch.Generator | Sequence[torch.Generator] | None

_MASK = (1 << 64) - 1


def sample_generators(seed: int, keys: Tensor | Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample key [B]: a splitmix64 hash of (seed, key), so that neighbouring
    keys and seeds give unrelated streams."""
    return [torch.Generator().manual_seed(_splitmix64(seed * 0x9E3779B97F4A7C15 + int(k)) >> 1)
            for k in (keys.tolist() if isinstance(keys, Tensor) else keys)]


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def randn(shape: Sequence[int], generators: Generators, device: torch.device | str = "cpu",
          dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise [B, ...], drawn on the CPU so every device gets the same numbers.
    A list of B generators gives sample i its own stream."""
    if generators is None or isinstance(generators, torch.Generator):
        noise = torch.randn(tuple(shape), generator=generators, dtype=dtype)
    else:
        _check_count(generators, shape[0])
        noise = torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=dtype) for g in generators])
    return noise.to(device)


def randn_like(x: Tensor, generators: Generators) -> Tensor:
    """`randn` shaped like x [B, ...], on its device and in its dtype."""
    return randn(x.shape, generators, x.device, x.dtype)


def rand(count: int, generators: Generators) -> Tensor:
    """Uniform [0, 1) numbers [count] on the CPU, one from each generator when given a list."""
    if generators is None or isinstance(generators, torch.Generator):
        return torch.rand(count, generator=generators)
    _check_count(generators, count)
    return torch.cat([torch.rand(1, generator=g) for g in generators])


def _check_count(generators: Sequence[torch.Generator], batch: int) -> None:
    if len(generators) != batch:
        raise ValueError(f"got {len(generators)} generators for a batch of {batch}")
