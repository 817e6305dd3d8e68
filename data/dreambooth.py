"""DreamBooth's data: a small folder of subject images under one prompt, and batches that pair each
subject example with a class example.

`InstanceImages` reads the 3-20 pictures of the subject, every one of them checked up front: with so
few, a broken or tiny file is a mistake to name, not a sample to skip. Each item is captioned with
the instance prompt ("a sks teapot").

`PriorPairs` is the training set of a run with prior preservation: item `key` is instance item `key`
with the class item `key` beside it under "class_"-prefixed names ("class_image", "class_caption",
or "class_latent_mean" / "class_latent_std" from a latent cache), so every batch holds as many class
examples as subject examples, as in the DreamBooth paper and diffusers' train_dreambooth.py. Both
parts take any key (they read `key % len`), so a key sees the same pair in every process and resume.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image

from data.config import DataConfig
from data.folder import IMAGE_SUFFIXES
from data.keyed import UNREADABLE_ERRORS, KeyedImageDataset, RawSample

MIN_INSTANCE_IMAGES, MAX_INSTANCE_IMAGES = 3, 20
CLASS_PREFIX = "class_"


def instance_image_files(folder: str | Path, size: int) -> list[str]:
    """The image files directly in `folder`, sorted, after checking their count (3-20) and that each
    opens and is at least `size` pixels on its shorter side (a smaller one would be upscaled, blurred).
    Raises FileNotFoundError / ValueError with a one-line message naming the folder or file."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dreambooth.instance_dir {root} is not a folder" if root.exists()
                                else f"dreambooth.instance_dir {root} does not exist")
    files = sorted(os.path.join(root, p.name) for p in root.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not MIN_INSTANCE_IMAGES <= len(files) <= MAX_INSTANCE_IMAGES:
        raise ValueError(f"dreambooth.instance_dir {root} holds {len(files)} images "
                         f"({', '.join(IMAGE_SUFFIXES)}); DreamBooth takes {MIN_INSTANCE_IMAGES} to "
                         f"{MAX_INSTANCE_IMAGES} pictures of the subject")
    for path in files:
        try:
            with Image.open(path) as image:
                image.load()
                width, height = image.size
        except UNREADABLE_ERRORS as error:
            raise ValueError(f"dreambooth.instance_dir: {path} is not a readable image ({error})") from None
        if min(width, height) < size:
            raise ValueError(f"dreambooth.instance_dir: {path} is {width}x{height}, smaller than data.size {size} "
                             f"on its shorter side (it would be upscaled); use pictures of at least {size} px")
    return files


class InstanceImages(KeyedImageDataset):
    """The subject's pictures (see `instance_image_files`), each captioned with `prompt`; items as
    `data.build_dataset`'s, cropped and flipped by `cfg` (size, crop, flip, seed)."""

    def __init__(self, folder: str | Path, prompt: str, cfg: DataConfig):
        self.files, self.prompt = instance_image_files(folder, cfg.size), prompt
        super().__init__(cfg, where=str(folder))

    def num_samples(self) -> int:
        return len(self.files)

    def describe(self, index: int) -> str:
        return self.files[index]

    def content_key(self, index: int) -> str:
        stat = os.stat(self.files[index])
        return f"{self.files[index]} {stat.st_size} {stat.st_mtime_ns} {self.prompt}"

    def load(self, index: int) -> RawSample:
        with Image.open(self.files[index]) as file:
            image = file.convert("RGB")
        return RawSample(image=image, caption=self.prompt)


class PriorPairs(torch.utils.data.Dataset):
    """Instance item `key`, with class item `key` beside it (its entries prefixed "class_") when
    `classes` is given; without, the instance items alone.

    `length` sets the epoch (at least the larger part's size, so that one batch fits); the parts read
    `key % len` themselves, and the instance images' crops and flips are seeded by the key.
    """

    def __init__(self, instances: torch.utils.data.Dataset, classes: torch.utils.data.Dataset | None, length: int):
        self.instances, self.classes, self.length = instances, classes, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: int) -> dict:
        item = dict(self.instances[key])
        if self.classes is not None:
            item.update({CLASS_PREFIX + k: v for k, v in self.classes[key].items()})
        return item


def split_pairs(batch: dict) -> tuple[dict, dict]:
    """A batch of `PriorPairs` items -> (the instance part, the class part with its prefix removed).
    Other entries (e.g. the loop's "sample_key") go to the instance part only."""
    instance = {k: v for k, v in batch.items() if not k.startswith(CLASS_PREFIX)}
    classes = {k[len(CLASS_PREFIX):]: v for k, v in batch.items() if k.startswith(CLASS_PREFIX)}
    return instance, classes
