"""Caption dropout: the training half of classifier-free guidance."""
from __future__ import annotations

from typing import Sequence

from common.randomness import Generators, rand


def drop_captions(captions: Sequence[str], p: float, generator: Generators = None) -> list[str]:
    """Replace each caption by "" independently with probability `p`.

    "" is also the unconditional prompt at sampling time, so the model learns the unconditional
    prediction that guidance extrapolates from. Common rates: 0.1 (SD, DiT), 0.5 (ControlNet).
    A CPU `generator` makes the choice reproducible; a list of them, one per caption, makes each
    caption's choice its own (see common.randomness).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"caption dropout probability must be in [0, 1], got {p}")
    captions = list(captions)
    if p == 0.0 or not captions:
        return captions
    drop = rand(len(captions), generator) < p
    return ["" if d else c for c, d in zip(captions, drop.tolist())]
