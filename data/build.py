"""`build_dataset`: a DataConfig in, the dataset of its source out."""
from __future__ import annotations

import torch

from data.config import DataConfig, validate_config


def build_dataset(cfg: DataConfig) -> torch.utils.data.Dataset:
    """The dataset `cfg` describes; every item is a dict

        "image":   float [3, size, size] in [-1, 1]
        "caption": str
        "hint":    float [3, size, size] in [0, 1]   (only when cfg.condition is set)
        "labels":  dict of ints / strs               (shapes and fashion-mnist)

    folder / emoji / shapes / fashion-mnist are map-style: `ds[key]` takes any key >= 0, reads
    sample `key % len(ds)` and seeds augmentation with (cfg.seed, key). webdataset is an
    IterableDataset with `set_epoch(epoch)` and `skip(n)`.
    """
    validate_config(cfg)
    # Imports are local so a source's dependencies load only when it is used.
    if cfg.source == "folder":
        from data.folder import FolderDataset

        return FolderDataset(cfg)
    if cfg.source == "webdataset":
        from data.webdataset_source import WebDatasetSource

        return WebDatasetSource(cfg)
    if cfg.source == "emoji":
        from data.emoji import EmojiDataset

        return EmojiDataset(cfg)
    if cfg.source == "shapes":
        from data.shapes import ShapesDataset

        return ShapesDataset(cfg)
    from data.fashion_mnist import FashionMNISTDataset

    return FashionMNISTDataset(cfg)
