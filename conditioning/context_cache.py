"""Contexts of a frozen text encoder, computed once per distinct caption."""
from __future__ import annotations

from typing import Callable

import torch


class ContextCache:
    """`cache(captions)` -> contexts [B, L, D] like `encode(captions)`, encoding each distinct caption once.

    A frozen encoder is deterministic, and small data sets repeat their captions every epoch, so this
    saves most of the encoder's time in training. Contexts are kept on the CPU until `max_bytes`;
    captions beyond it are encoded every time. A trainable encoder must run every step: with
    `frozen=False` every call goes to `encode`.
    """

    def __init__(self, encode: Callable[[list[str]], torch.Tensor], frozen: bool = True, max_bytes: int = 1 << 30):
        self.encode, self.frozen, self.max_bytes = encode, frozen, max_bytes
        self.contexts: dict[str, torch.Tensor] = {}
        self.bytes = 0
        self.device = torch.device("cpu")

    def __call__(self, captions: list[str]) -> torch.Tensor:
        if not self.frozen:
            return self.encode(captions)
        fresh: dict[str, torch.Tensor] = {}
        new = sorted(set(captions) - self.contexts.keys())
        if new:
            with torch.no_grad():
                fresh = dict(zip(new, self.encode(new)))
            self.device = next(iter(fresh.values())).device  # where the encoder's contexts live
            for caption, context in fresh.items():
                size = context.numel() * context.element_size()
                if self.bytes + size > self.max_bytes:
                    break
                self.contexts[caption], self.bytes = context.cpu(), self.bytes + size
        return torch.stack([fresh[c] if c in fresh else self.contexts[c].to(self.device) for c in captions])
