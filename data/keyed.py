"""Map-style datasets addressed by an unbounded key.

The trainers' sampler hands out keys `epoch * len(ds) + permuted_index`. A key picks sample
`key % len(ds)`, and all augmentation randomness for it comes from a generator seeded by
(cfg.seed, key): the same key gives the same item in any process with any number of workers,
which makes resuming exact, while a sample seen in a new epoch gets a fresh crop.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from PIL import Image

from data.config import DataConfig
from data.transforms import augmentation_rng, make_item, resize_crop_flip

log = logging.getLogger(__name__)

# What a broken or truncated image file raises from Pillow or from reading it.
UNREADABLE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclass
class RawSample:
    """One sample as a source produces it, before resizing and cropping."""

    image: Image.Image
    caption: str
    hint: Image.Image | None = None  # a source's own aligned hint ("L"), e.g. exact shape masks
    labels: dict | None = None  # exact attributes, batched by default_collate


class KeyedImageDataset(torch.utils.data.Dataset):
    """Base class: a source implements `num_samples`, `load(index)` and `describe(index)`.

    Unreadable samples (`load` raising one of UNREADABLE_ERRORS) are skipped in favour of the
    next index, counted in `num_skipped` and reported once each with `logging.warning`.
    """

    def __init__(self, cfg: DataConfig, where: str):
        self.cfg = cfg
        self.where = where  # said in errors: the directory / file the samples come from
        self.num_skipped = 0
        self._unreadable: set[int] = set()

    def num_samples(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> RawSample:
        """Sample `index` in [0, len): may raise one of UNREADABLE_ERRORS."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """Where sample `index` lives (a file path), for warnings."""
        return f"{self.where} [{index}]"

    def content_key(self, index: int) -> str:
        """A string that changes when sample `index` changes (caches of derived data compare it)."""
        return self.describe(index)

    def __len__(self) -> int:
        return self.num_samples()

    def __getitem__(self, key: int) -> dict:
        key = int(key)
        if key < 0:
            raise IndexError(f"dataset keys must be non-negative, got {key}")
        count = len(self)
        raw = self._load_readable(key % count, count)
        image, hint = resize_crop_flip(
            raw.image, self.cfg.size, self.cfg.crop, self.cfg.flip, augmentation_rng(self.cfg.seed, key), raw.hint
        )
        return make_item(image, raw.caption, self.cfg, extra_hint=hint, labels=raw.labels)

    def _load_readable(self, index: int, count: int) -> RawSample:
        for step in range(count):
            candidate = (index + step) % count
            if candidate in self._unreadable:
                continue
            try:
                raw = self.load(candidate)
                raw.image.load()  # Pillow decodes lazily: surface truncation errors here
                return raw
            except UNREADABLE_ERRORS as error:
                self._unreadable.add(candidate)
                self.num_skipped += 1
                log.warning("skipping unreadable image %s: %s", self.describe(candidate), error)
        raise ValueError(f"no readable image in {self.where}: all {count} samples failed to load")
