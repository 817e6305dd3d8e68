"""The one configuration section every trainer uses to describe its images and captions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SOURCES = ("folder", "webdataset", "emoji", "shapes", "fashion-mnist")
CONDITIONS = ("canny", "shapes-edges", "shapes-mask")


@dataclass
class DataConfig:
    """Where images come from and how they are shaped into training items.

    Plain types only, so `common.config.from_dict` can check a YAML section against it.
    """

    # Which source to read; see `data.build_dataset` for what `path` means for each.
    source: Literal["folder", "webdataset", "emoji", "shapes", "fashion-mnist"] = "shapes"
    # folder: a directory (or one metadata.jsonl / .csv file); webdataset: a shard pattern such as
    # "shards/{000000..000009}.tar", a glob or a directory; emoji: a font file; fashion-mnist: the
    # directory with the idx .gz files. None picks the Debian install location where there is one.
    path: str | None = None
    size: int = 64
    crop: Literal["center", "random"] = "center"
    # Off by default: captions may say "left" or "right".
    flip: bool = False
    split: Literal["train", "test"] = "train"
    # Seeds augmentation (and, for shapes, the scenes themselves).
    seed: int = 0

    # Adds item["hint"] ([3, H, W] in [0, 1]) for ControlNet. "canny" works with every source;
    # "shapes-edges" / "shapes-mask" are the exact outlines / masks that only the shapes source knows.
    condition: Literal["canny", "shapes-edges", "shapes-mask"] | None = None
    canny_low: int = 100
    canny_high: int = 200

    # emoji: background the RGBA glyphs are composited on (any Pillow colour name or "#rrggbb"),
    # and whether the five skin-tone variants of people and hands are separate samples.
    emoji_background: str = "white"
    emoji_skin_tones: bool = False

    # shapes: number of distinct scenes in the split, and at most how many objects per scene.
    shapes_length: int = 10000
    shapes_max_objects: int = 2

    # webdataset: samples held in the shuffle buffer (train split only; 0 keeps shard order).
    shuffle_buffer: int = 1000


def validate_config(cfg: DataConfig) -> None:
    """Raise ValueError naming the first field that makes no sense (also for hand-built configs)."""
    if cfg.source not in SOURCES:
        raise ValueError(f"data.source must be one of {list(SOURCES)}, got {cfg.source!r}")
    if not isinstance(cfg.size, int) or cfg.size < 8:
        raise ValueError(f"data.size must be an int >= 8, got {cfg.size!r}")
    if cfg.crop not in ("center", "random"):
        raise ValueError(f"data.crop must be 'center' or 'random', got {cfg.crop!r}")
    if cfg.split not in ("train", "test"):
        raise ValueError(f"data.split must be 'train' or 'test', got {cfg.split!r}")
    if cfg.condition is not None and cfg.condition not in CONDITIONS:
        raise ValueError(f"data.condition must be None or one of {list(CONDITIONS)}, got {cfg.condition!r}")
    if cfg.condition in ("shapes-edges", "shapes-mask") and cfg.source != "shapes":
        raise ValueError(f"data.condition={cfg.condition!r} needs data.source='shapes', got {cfg.source!r}")
    if not 0 <= cfg.canny_low <= cfg.canny_high:
        raise ValueError(f"data.canny_low/canny_high must satisfy 0 <= low <= high, got {cfg.canny_low}, {cfg.canny_high}")
    if cfg.source == "shapes":
        if cfg.shapes_length < 1:
            raise ValueError(f"data.shapes_length must be >= 1, got {cfg.shapes_length}")
        if cfg.shapes_max_objects not in (1, 2):
            raise ValueError(f"data.shapes_max_objects must be 1 or 2, got {cfg.shapes_max_objects}")
        if cfg.flip:
            raise ValueError("data.flip=True contradicts the left/right positions in shapes captions; use flip: false")
    if cfg.shuffle_buffer < 0:
        raise ValueError(f"data.shuffle_buffer must be >= 0, got {cfg.shuffle_buffer}")
    if cfg.source in ("folder", "webdataset") and not cfg.path:
        raise ValueError(f"data.path is required for data.source={cfg.source!r}")
