"""Whether this run may download: one switch for every loader that could reach a hub."""
from __future__ import annotations

import os


def hub_offline() -> bool:
    """True when `HF_HUB_OFFLINE` is set (the Makefile, tests and CI set it): loaders then fail at once with
    a message naming the missing file instead of trying the network, which can stall for minutes here."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
