"""Adam and AdamW for the trainers: torch's fused kernel (one pass over all parameters) where it has one.

torch's default on CPU steps one parameter at a time: at the tiny U-Net's training step that loop took
14.7 of 166 ms, the fused kernel 2.2 ms (bench/RESULTS.md, "Training step"). The update
is the same formula; the fused kernel rounds differently in the last bit.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

FUSED_DEVICES = ("cpu", "cuda")


def fused_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused Adam(W) takes every tensor of `params`: plain floating-point tensors on a CPU
    or a CUDA device. (Tensor subclasses, e.g. quantized weights, keep torch's default.)"""
    return all(type(p) in (torch.Tensor, torch.nn.Parameter) and p.is_floating_point()
               and p.device.type in FUSED_DEVICES for p in params)


def adam(params: Iterable[torch.Tensor], decoupled_weight_decay: bool = False, **options) -> torch.optim.Optimizer:
    """torch.optim.Adam (AdamW with `decoupled_weight_decay`) over `params`, fused where supported.
    `options`: lr, betas, weight_decay, ... as torch's."""
    params = list(params)
    kind = torch.optim.AdamW if decoupled_weight_decay else torch.optim.Adam
    return kind(params, fused=fused_supported(params) or None, **options)
