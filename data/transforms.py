"""Image geometry and the item format shared by every source.

Every source ends in `make_item`: an RGB uint8 picture already at the training size, its caption,
and optionally a hint and labels, become the dict the trainers batch.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from conditioning.edges import canny, edges_to_hint
from data.config import DataConfig


def augmentation_rng(*seed_parts: int) -> np.random.Generator:
    """A generator that depends only on the given non-negative ints (e.g. cfg.seed and the sample key).

    SeedSequence hashes the whole tuple, so neighbouring keys give unrelated streams and the result
    is the same in every process, whatever the DataLoader worker layout.
    """
    return np.random.default_rng(np.random.SeedSequence([int(p) for p in seed_parts]))


def resize_crop_flip(
    image: Image.Image,
    size: int,
    crop: str,
    flip: bool,
    rng: np.random.Generator,
    extra: Image.Image | None = None,
) -> tuple[Image.Image, Image.Image | None]:
    """Scale the shorter side to `size`, crop a `size` x `size` square, maybe mirror it.

    `extra` (a mask or edge map aligned with `image`) gets the same crop and flip, resized with
    nearest-neighbour so it stays exact. The rng is always consulted in the same order, so a
    sample's crop does not depend on whether flipping is on.
    """
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
        if extra is not None:
            extra = extra.resize((new_w, new_h), Image.Resampling.NEAREST)
    offsets = rng.random(2)
    if crop == "random":
        left, top = int(offsets[0] * (new_w - size + 1)), int(offsets[1] * (new_h - size + 1))
    else:
        left, top = (new_w - size) // 2, (new_h - size) // 2
    box = (left, top, left + size, top + size)
    if box != (0, 0, new_w, new_h):
        image = image.crop(box)
        extra = extra.crop(box) if extra is not None else None
    if rng.random() < 0.5 and flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        extra = extra.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if extra is not None else None
    return image, extra


def image_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [3, H, W] in [-1, 1].

    Done in numpy: tiny element-wise torch ops go through the intra-op thread pool, which costs
    more than the arithmetic when the data pipeline shares the cores with training.
    """
    scaled = pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return torch.from_numpy(np.ascontiguousarray(scaled))


def make_item(
    image: Image.Image,
    caption: str,
    cfg: DataConfig,
    extra_hint: Image.Image | None = None,
    labels: dict | None = None,
) -> dict:
    """The training item: {"image": [3, H, W] in [-1, 1], "caption": str, and "hint" / "labels" if any}.

    `extra_hint` is a source's own single-channel hint ("L", 0 or 255); for condition "canny" the
    hint is computed here from the final (cropped, flipped) pixels so it matches them exactly.
    """
    pixels = np.asarray(image.convert("RGB"))
    item = {"image": image_to_tensor(pixels), "caption": caption}
    if cfg.condition == "canny":
        item["hint"] = edges_to_hint(canny(pixels, cfg.canny_low, cfg.canny_high))
    elif cfg.condition is not None:
        if extra_hint is None:
            raise ValueError(f"data.condition={cfg.condition!r} is not available from data.source={cfg.source!r}")
        item["hint"] = edges_to_hint(np.array(extra_hint.convert("L")))
    if labels is not None:
        item["labels"] = labels
    return item
