"""Is a training state finite? One max-|x| reduction per device and dtype, one host sync in all.

A loss check sees a NaN only when it reaches the loss; an infinite learning rate, an overflowing
optimizer moment or a discriminator that is not in the loss yet can leave non-finite weights
behind a finite loss. The loop checks the stepped parameters after every optimizer step and the
whole state before every save, so a checkpoint on disk is always one to resume from.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from common.cli import RunFailed


class NonFiniteLossError(RunFailed):
    """A loss became NaN or infinite; the run stops without touching saved checkpoints."""


class NonFiniteStateError(RunFailed):
    """Weights or optimizer state became NaN or infinite; the run stops without saving them."""


def nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors in `named` that hold a NaN or an infinity."""
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[str, torch.Tensor]]] = {}
    for name, t in named:
        if t.is_floating_point() and t.numel():
            groups.setdefault((t.device, t.dtype), []).append((name, t.detach()))
    if not groups:
        return []
    names, peaks = [], []
    for members in groups.values():
        names += [name for name, _ in members]
        # max |x| is inf or nan exactly when a value is; a norm could overflow on finite weights
        peaks += [p.float().cpu() for p in torch._foreach_norm([t for _, t in members], float("inf"))]
    finite = torch.stack(peaks).isfinite().tolist()
    return [name for name, ok in zip(names, finite) if not ok]


def state_tensors(prefix: str, state) -> Iterable[tuple[str, torch.Tensor]]:
    """(dotted name, tensor) for every tensor in a nested dict/list state (a state_dict, an optimizer's)."""
    if isinstance(state, torch.Tensor):
        yield prefix, state
    elif isinstance(state, Mapping):
        for k, v in state.items():
            yield from state_tensors(f"{prefix}.{k}" if prefix else str(k), v)
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            yield from state_tensors(f"{prefix}.{i}", v)
