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

    New captions are encoded in batches of exactly `chunk` (the last one filled up by repeating its last
    caption): a batched encoder's numerics may follow its batch size (MiniLM's GEMMs on an Intel Xeon with
    AMX at 2 threads moved a context by 1.5e-6 from 3 captions a batch on), and a caption's context must
    not depend on which captions happened to be new with it, or a resumed run, starting with an empty
    cache, would train on other contexts than the run it continues.
    """

    def __init__(self, encode: Callable[[list[str]], torch.Tensor], frozen: bool = True, max_bytes: int = 1 << 30,
                 chunk: int = 16):
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk}")
        self.encode, self.frozen, self.max_bytes, self.chunk = encode, frozen, max_bytes, chunk
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
                fresh = self._encode_in_chunks(new)
            self.device = next(iter(fresh.values())).device  # where the encoder's contexts live
            for caption, context in fresh.items():
                size = context.numel() * context.element_size()
                if self.bytes + size > self.max_bytes:
                    break
                self.contexts[caption], self.bytes = context.cpu(), self.bytes + size
        return torch.stack([fresh[c] if c in fresh else self.contexts[c].to(self.device) for c in captions])

    def _encode_in_chunks(self, captions: list[str]) -> dict[str, torch.Tensor]:
        fresh = {}
        for start in range(0, len(captions), self.chunk):
            part = captions[start:start + self.chunk]
            contexts = self.encode(part + part[-1:] * (self.chunk - len(part)))
            fresh.update(zip(part, contexts))
        return fresh
