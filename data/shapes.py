"""Procedural scenes of one or two coloured shapes with exact compositional captions.

A scene is a pure function of (seed, split, index, size): the image is drawn 2-4x larger and box-filtered
down (anti-aliased edges), and the exact per-pixel object masks come from the same drawing, so
"shapes-mask" and "shapes-edges" hints agree with the picture. Each object sits inside its own
cell of a 3x3 grid, so objects never overlap and the position words are always true.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from data.config import DataConfig
from data.keyed import KeyedImageDataset, RawSample
from data.transforms import augmentation_rng

SHAPES = ("circle", "square", "triangle", "diamond", "hexagon", "star")
COLORS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 215, 30),
    "green": (40, 160, 70),
    "blue": (40, 90, 225),
    "purple": (140, 60, 185),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
# Radius (half-extent) as a fraction of the image side; a grid cell is 1/3 of the side.
SIZES = {"small": 0.09, "large": 0.15}
# Reading order of the 3x3 grid: row = index // 3, column = index % 3.
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
SPLIT_SEEDS = {"train": 0, "test": 1}  # disjoint seed streams for the two splits
SCENE_STREAM = 0x5C3E  # keeps scene randomness apart from the augmentation stream of the same seed
MAX_SUPERSAMPLE = 4  # anti-aliasing factor at small sizes, lowered for large images (cost grows with its square)


def position_phrase(position: str) -> str:
    return f"on the {position}" if position in ("left", "right") else f"at the {position}"


def shape_outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape of half-extent r centred at (cx, cy); y grows downwards."""

    def ring(count: int, radius: float, start_deg: float) -> list[tuple[float, float]]:
        return [
            (cx + radius * math.cos(math.radians(start_deg + 360 * k / count)),
             cy + radius * math.sin(math.radians(start_deg + 360 * k / count)))
            for k in range(count)
        ]

    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return ring(3, r, -90)
    if shape == "diamond":
        return ring(4, r, -90)
    if shape == "hexagon":
        return ring(6, r, 0)
    if shape == "star":
        outer, inner = ring(5, r, -90), ring(5, 0.45 * r, -90 + 36)
        return [vertex for pair in zip(outer, inner) for vertex in pair]
    raise ValueError(f"unknown shape {shape!r}")


def sample_scene(seed: int, split: str, index: int, max_objects: int) -> dict:
    """The attributes of scene `index`: background and objects sorted in reading order.

    Object centres are offsets in [-1, 1] within their cell, scaled when drawing.
    """
    rng = augmentation_rng(SCENE_STREAM, seed, SPLIT_SEEDS[split], index)
    count = 1 if max_objects == 1 else int(rng.integers(1, max_objects + 1))
    background = str(rng.choice(list(BACKGROUNDS)))
    objects = []
    for cell in sorted(int(c) for c in rng.choice(len(POSITIONS), size=count, replace=False)):
        colors = [c for c in COLORS if c != background]
        objects.append({
            "shape": str(rng.choice(SHAPES)),
            "color": str(rng.choice(colors)),
            "size": str(rng.choice(list(SIZES))),
            "position": POSITIONS[cell],
            "jitter": (float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1))),
        })
    return {"background": background, "objects": objects}


def scene_caption(scene: dict) -> str:
    """E.g. "a small red circle at the top left and a large blue star on the right on a white background"."""
    parts = [f"a {o['size']} {o['color']} {o['shape']} {position_phrase(o['position'])}" for o in scene["objects"]]
    return f"{' and '.join(parts)} on a {scene['background']} background"


def render_scene(scene: dict, size: int) -> tuple[Image.Image, np.ndarray]:
    """(RGB image [size, size], object id map uint8 [size, size]: 0 background, k for object k)."""
    factor = max(2, min(MAX_SUPERSAMPLE, 512 // size))
    big = size * factor
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(image)
    coverage = []
    cell = big / 3
    for obj in scene["objects"]:
        row, column = divmod(POSITIONS.index(obj["position"]), 3)
        r = SIZES[obj["size"]] * big
        slack = cell / 2 - r  # how far the centre may move while the shape stays in its cell
        cx = (column + 0.5) * cell + obj["jitter"][0] * slack
        cy = (row + 0.5) * cell + obj["jitter"][1] * slack
        mask = Image.new("L", (big, big), 0)
        for canvas, fill in ((draw, COLORS[obj["color"]]), (ImageDraw.Draw(mask), 255)):
            if obj["shape"] == "circle":
                canvas.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
            else:
                canvas.polygon(shape_outline(obj["shape"], cx, cy, r), fill=fill)
        coverage.append(np.asarray(mask.reduce(factor)) >= 128)
    object_ids = np.zeros((size, size), dtype=np.uint8)
    for k, covered in enumerate(coverage, 1):
        object_ids[covered] = k
    return image.reduce(factor), object_ids


def object_edges(object_ids: np.ndarray) -> np.ndarray:
    """uint8 [H, W]: 255 on object pixels with a 4-neighbour outside the object (the image border counts as outside)."""
    padded = np.pad(object_ids, 1)
    centre = padded[1:-1, 1:-1]
    differs = np.zeros(object_ids.shape, dtype=bool)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        differs |= padded[1 + dy : padded.shape[0] - 1 + dy, 1 + dx : padded.shape[1] - 1 + dx] != centre
    return np.where(differs & (centre > 0), 255, 0).astype(np.uint8)


def scene_labels(scene: dict) -> dict:
    """Flat attributes that default_collate can batch: absent second objects get "" values."""
    labels: dict = {"num_objects": len(scene["objects"]), "background": scene["background"]}
    for k in range(2):
        obj = scene["objects"][k] if k < len(scene["objects"]) else None
        for key in ("shape", "color", "size", "position"):
            labels[f"{key}_{k}"] = obj[key] if obj else ""
    return labels


class ShapesDataset(KeyedImageDataset):
    """`cfg.shapes_length` scenes per split, drawn at cfg.size; no files involved."""

    def __init__(self, cfg: DataConfig):
        super().__init__(cfg, where=f"shapes(seed={cfg.seed}, split={cfg.split})")

    def num_samples(self) -> int:
        return self.cfg.shapes_length

    def load(self, index: int) -> RawSample:
        scene = sample_scene(self.cfg.seed, self.cfg.split, index, self.cfg.shapes_max_objects)
        image, object_ids = render_scene(scene, self.cfg.size)
        hint = None
        if self.cfg.condition == "shapes-mask":
            hint = Image.fromarray(np.where(object_ids > 0, 255, 0).astype(np.uint8))
        elif self.cfg.condition == "shapes-edges":
            hint = Image.fromarray(object_edges(object_ids))
        return RawSample(image=image, caption=scene_caption(scene), hint=hint, labels=scene_labels(scene))
