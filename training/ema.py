"""Exponential moving average of model weights, with the LDM warm-up, and sampling with it."""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from common.weights import load_state_dict_strict


class EMA:
    """Keeps `shadow`, a frozen copy of `model` whose weights trail the model's.

    decay_n = min(decay, (1 + n) / (10 + n)) so early averages are not dominated by the random init.
    Only what the optimizer trains (parameters that require grad) is averaged. Buffers (e.g. BatchNorm
    statistics) and the other parameters are copied: frozen ones do not change, and one a module sets
    itself, like a VQ codebook learned by EMA k-means updates, must stay what its statistics (buffers) give.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        self.decay = decay
        self.num_updates = 0
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next `update` applies: the warm-up (1 + n) / (10 + n), capped at `decay`."""
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow's trained parameters towards `model`'s and copy the rest."""
        decay = self.current_decay()
        self.num_updates += 1
        averaged, copied = [], list(zip(self.shadow.buffers(), model.buffers()))
        for ema_p, p in zip(self.shadow.parameters(), model.parameters()):
            (averaged if p.requires_grad else copied).append((ema_p, p.detach()))
        if averaged:  # (the fused lerp refuses empty lists)
            torch._foreach_lerp_([ema_p for ema_p, _ in averaged], [p for _, p in averaged], 1.0 - decay)
        for ema_t, t in copied:
            ema_t.copy_(t)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow's weights (keys as in the followed model's state dict)."""
        return self.shadow.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int,
                        source: str | Path = "EMA state") -> None:
        """Restore the shadow's weights (strictly; `source` names them in errors) and the update count,
        which sets the warm-up's position."""
        load_state_dict_strict(self.shadow, state, source, what="the EMA copy")
        self.num_updates = num_updates


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Every module in eval mode inside the block; afterwards each submodule's own train/eval flag again."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


@contextlib.contextmanager
def ema_weights(model: nn.Module, ema: EMA | None) -> Iterator[nn.Module]:
    """`model` with `ema`'s weights (parameters and buffers) and in eval mode inside the block.

    Afterwards the live weights are back bit for bit, in the same tensors (so an optimizer's state
    still refers to them), and every submodule's train/eval flag is as before. With `ema` None the
    live weights stay and only the mode changes. `model` must be the module the EMA follows.
    """
    with eval_mode(model):
        if ema is None:
            yield model
            return
        live = model.state_dict()
        # Clones: `state_dict()` tensors share storage with the parameters they would restore.
        saved = {k: v.detach().clone() for k, v in live.items()}
        _copy_into(live, ema.shadow.state_dict())
        try:
            yield model
        finally:
            _copy_into(live, saved)


@torch.no_grad()
def _copy_into(targets: dict[str, torch.Tensor], sources: dict[str, torch.Tensor]) -> None:
    if targets.keys() != sources.keys():
        raise ValueError(f"ema_weights: the EMA does not follow this model ({len(targets)} tensors, "
                         f"EMA {len(sources)}; first differing key "
                         f"{sorted(targets.keys() ^ sources.keys())[0]!r})")
    for key, target in targets.items():
        target.copy_(sources[key])
