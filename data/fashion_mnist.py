"""Fashion-MNIST (28x28 grey clothing) from the Debian package dataset-fashion-mnist.

The idx files are read once per process; the class name is the caption.
"""
from __future__ import annotations

import functools
import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from data.config import DataConfig
from data.keyed import KeyedImageDataset, RawSample

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
FILE_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: Path) -> np.ndarray:
    """An idx array (the MNIST file format: magic, dims, big-endian uint8 data), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as file:
        data = file.read()
    zero, dtype_code, ndim = struct.unpack_from(">HBB", data, 0)
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not a uint8 idx file")
    shape = struct.unpack_from(f">{ndim}I", data, 4)
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} bytes of data for shape {shape}, got {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


@functools.lru_cache(maxsize=4)
def load_fashion_mnist(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) of one split, cached per process."""
    root = Path(directory)
    prefix = FILE_PREFIX[split]
    found = {}
    for kind in ("images-idx3", "labels-idx1"):
        candidates = [root / f"{prefix}-{kind}-ubyte.gz", root / f"{prefix}-{kind}-ubyte"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            hint = "install it with `apt-get install dataset-fashion-mnist`, or " if directory == DEBIAN_DIR else ""
            raise FileNotFoundError(
                f"Fashion-MNIST file {candidates[0].name} not found in {root}: {hint}set data.path to the "
                "directory with the idx files"
            )
        found[kind] = read_idx(path)
    images, labels = found["images-idx3"], found["labels-idx1"]
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST files in {root} disagree: images {images.shape}, labels {labels.shape}")
    if labels.max(initial=0) >= len(CLASS_NAMES):
        raise ValueError(f"Fashion-MNIST labels in {root} go up to {labels.max()}, expected < {len(CLASS_NAMES)}")
    return images, labels


class FashionMNISTDataset(KeyedImageDataset):
    """60,000 train / 10,000 test images, grey replicated to RGB; caption = class name."""

    def __init__(self, cfg: DataConfig):
        directory = str(Path(cfg.path).expanduser()) if cfg.path else DEBIAN_DIR
        super().__init__(cfg, where=directory)
        self.images, self.labels = load_fashion_mnist(directory, cfg.split)

    def num_samples(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> RawSample:
        label = int(self.labels[index])
        image = Image.fromarray(self.images[index]).convert("RGB")
        return RawSample(image=image, caption=CLASS_NAMES[label], labels={"class_index": label})
