"""Adam and AdamW for the trainers, and their lr schedule: torch's fused kernel (one pass over all
parameters) where it has one.

torch's default on CPU steps one parameter at a time: at the tiny U-Net's training step that loop took
14.7 of 166 ms, the fused kernel 2.2 ms (bench/RESULTS.md, "Training step"). The update
is the same formula; the fused kernel rounds differently in the last bit.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal, get_args

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


LRDecay = Literal["constant", "cosine", "cooldown"]  # the trainers' `optim.decay`
LR_DECAYS = get_args(LRDecay)


def warmup_then_decay(optimizer: torch.optim.Optimizer, warmup_steps: int, decay: LRDecay = "constant",
                      total_steps: int | None = None, cooldown_fraction: float = 0.2
                      ) -> torch.optim.lr_scheduler.LambdaLR:
    """The lr factor at optimizer step s: a linear ramp (s + 1) / warmup_steps up to 1, times `decay`'s
    factor: 1 ("constant"); 0.5 (1 + cos(pi s / total_steps)) ("cosine"); or 1 until the last
    `cooldown_fraction` of total_steps, then a straight line to 0 at total_steps ("cooldown": the
    warm-up-stable-decay schedule, full lr for most of a fixed budget and the annealing at its end).
    total_steps is train.max_steps, so a run stopped early by max_minutes has not decayed yet."""
    if decay not in LR_DECAYS:
        raise ValueError(f"lr decay must be one of {', '.join(LR_DECAYS)}, got {decay!r}")
    if decay != "constant" and not total_steps:
        raise ValueError(f"{decay} lr decay needs the run's total steps (train.max_steps)")
    if not 0 < cooldown_fraction <= 1:
        raise ValueError(f"cooldown_fraction must be in (0, 1], got {cooldown_fraction}")
    warmup = max(1, warmup_steps)

    def factor(step: int) -> float:
        ramp = min(1.0, (step + 1) / warmup)
        if decay == "constant":
            return ramp
        if decay == "cosine":
            return ramp * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total_steps)))
        remaining = max(0, total_steps - step) / (cooldown_fraction * total_steps)
        return ramp * min(1.0, remaining)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
