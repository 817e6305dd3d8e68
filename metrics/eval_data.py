"""The image sets the evaluation commands compare: a data source named on the command line,
one of its splits, a reproducible subset of n items, streamed in batches.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from data import DataConfig

NAMED_SOURCES = ("shapes", "emoji", "fashion-mnist")  # sources that need no path


def data_config(data: str, size: int, split: str) -> DataConfig:
    """DataConfig for a `--data` value: a built-in source name (shapes, emoji, fashion-mnist), a
    webdataset shard pattern ("shards/{000000..000009}.tar" or anything ending in .tar), or a
    folder / metadata file of images with captions."""
    if data in NAMED_SOURCES:
        return DataConfig(source=data, size=size, split=split)
    if data in ("folder", "webdataset"):
        raise ValueError(f"--data {data}: give the {data}'s path instead of the source name")
    if data.endswith(".tar") or "{" in data:
        return DataConfig(source="webdataset", path=data, size=size, split=split, shuffle_buffer=0)
    if os.path.exists(data):
        return DataConfig(source="folder", path=data, size=size, split=split)
    raise FileNotFoundError(f"--data {data!r} is neither a source name ({', '.join(NAMED_SOURCES)}) "
                            f"nor an existing folder, metadata file or .tar shard pattern")


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, H, W] in [-1, 1]
    captions: list[str]
    labels: list[dict] | None  # exact attributes, when the source has them (shapes, fashion-mnist)


def subset_size(dataset: torch.utils.data.Dataset, n: int) -> int:
    """n, or the data set's size when it is smaller (an IterableDataset is assumed to be large enough)."""
    if n < 2:
        raise ValueError(f"--n must be at least 2 (FID needs a covariance), got {n}")
    return min(n, len(dataset)) if not isinstance(dataset, torch.utils.data.IterableDataset) else n


def iterate_batches(dataset: torch.utils.data.Dataset, n: int, batch_size: int, seed: int = 0) -> Iterator[Batch]:
    """Batches of n items: a seeded random subset of a map-style data set (so a folder sorted by
    name is not read in order), the first n items of an iterable one."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        items = (item for _, item in zip(range(n), dataset))
    else:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
        items = (dataset[int(key)] for key in order)
    chunk: list[dict] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == batch_size:
            yield _collate(chunk)
            chunk = []
    if chunk:
        yield _collate(chunk)


def _collate(items: list[dict]) -> Batch:
    labels = [item["labels"] for item in items] if all("labels" in item for item in items) else None
    return Batch(torch.stack([item["image"] for item in items]), [item["caption"] for item in items], labels)
