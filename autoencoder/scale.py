"""The latent scale factor that gives diffusion latents unit variance (LDM's `scale_by_std`)."""
from __future__ import annotations

from typing import Callable, Iterable

import torch


@torch.no_grad()
def measure_scale_factor(encode_fn: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[torch.Tensor]) -> float:
    """1 / std of all latents `encode_fn` produces over `batches` (e.g. `model.encode_latents`).

    SD's 0.18215 is this number for its kl-f8 autoencoder. Statistics are accumulated in float64
    over every element of every batch, so the answer does not depend on how data is batched.
    """
    count, total, total_sq = 0, 0.0, 0.0
    for batch in batches:
        z = encode_fn(batch).detach().double()
        count += z.numel()
        total += z.sum().item()
        total_sq += z.pow(2).sum().item()
    if count < 2:
        raise ValueError("measure_scale_factor needs at least two latent values (got no or empty batches)")
    variance = (total_sq - total * total / count) / (count - 1)
    if variance <= 0:
        raise ValueError("measure_scale_factor: latents have zero variance; the autoencoder output is constant")
    return float(variance ** -0.5)
