"""Prompt adherence on the procedural `shapes` data: a small CNN that reads a scene's attributes back.

Captions of the shapes source (data/shapes.py) name, for one or two objects, size, colour, shape
and grid position, plus the background. `parse_shapes_prompt` inverts that grammar into the same
flat labels the data set attaches to each item; `ShapesJudge` predicts those labels from an image,
so a generated image can be checked attribute by attribute against its prompt.

The data guarantee the judge is built on: every object lies inside its own cell of a 3x3 grid.
So the image is cut into its nine cells and one small CNN classifies each cell (empty or which
shape, colour, size, and the background around it). Object count, positions and the reading-order
slots of the caption follow from which cells are occupied; the background is the vote of all
nine cells. Cell-wise classification shares weights across positions and sees up to nine
examples per image, which is what makes a few CPU minutes of training enough.

    python -m metrics.shapes_judge --train      # writes metrics/weights/shapes_judge.safetensors
    python -m metrics.shapes_judge --validate   # per-attribute accuracy on held-out scenes

Images of any size are resized to 72x72 (24-pixel cells); the judge is trained on scenes rendered
at 32, 64 and 128 pixels. Shipped weights, on 2000 held-out (test split) scenes per size: every
attribute 100% at 64 and 128 pixels; at 32 pixels 99.5% for shape (a small hexagon is then
barely more than a circle) and 100% for the rest.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from common.weights import load_state_dict_strict
from data import DataConfig, build_dataset
from data.shapes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, position_phrase

GRID = 3
CELL_SIZE = 24
JUDGE_SIZE = GRID * CELL_SIZE
MAX_OBJECTS = 2
DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "shapes_judge.safetensors"
OBJECT_ATTRIBUTES = ("shape", "color", "size", "position")
SCENE_ATTRIBUTES = ("num_objects", "background")

# What the cell classifier predicts for each cell; shape "" is an empty cell.
CELL_HEADS: dict[str, tuple[str, ...]] = {
    "background": tuple(BACKGROUNDS),
    "shape": ("", *SHAPES),
    "color": tuple(COLORS),
    "size": tuple(SIZES),
}


# -- the caption grammar, inverted --------------------------------------------------------------

def _alternatives(words: Sequence[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_PHRASE_TO_POSITION = {position_phrase(p): p for p in POSITIONS}
_OBJECT = (rf"a (?P<size{{k}}>{_alternatives(SIZES)}) (?P<color{{k}}>{_alternatives(COLORS)}) "
           rf"(?P<shape{{k}}>{_alternatives(SHAPES)}) (?P<position{{k}}>{_alternatives(_PHRASE_TO_POSITION)})")
_CAPTION = re.compile(rf"{_OBJECT.format(k=0)}(?: and {_OBJECT.format(k=1)})? "
                      rf"on a (?P<background>{_alternatives(BACKGROUNDS)}) background")


def parse_shapes_prompt(prompt: str) -> dict:
    """Labels of a shapes caption, in the data set's `labels` layout:

        {"num_objects": 1 or 2, "background": str, "shape_0": str, "color_0": str, "size_0": str,
         "position_0": str, "shape_1": ..., "position_1": ...}   (slot-1 values "" for one object)

    Raises ValueError for text outside the caption grammar of data/shapes.py.
    """
    match = _CAPTION.fullmatch(prompt.strip())
    if match is None:
        raise ValueError(f"not a shapes caption (e.g. 'a small red circle at the top left on a white "
                         f"background'): {prompt!r}")
    labels: dict = {"num_objects": 1 if match["shape1"] is None else 2, "background": match["background"]}
    for slot in range(MAX_OBJECTS):
        for attribute in OBJECT_ATTRIBUTES:
            value = match[f"{attribute}{slot}"] or ""
            labels[f"{attribute}_{slot}"] = _PHRASE_TO_POSITION.get(value, "") if attribute == "position" else value
    if labels["num_objects"] == 2 and POSITIONS.index(labels["position_0"]) >= POSITIONS.index(labels["position_1"]):
        raise ValueError(f"shapes captions list objects in reading order of distinct cells: {prompt!r}")
    return labels


def labels_to_list(labels: Sequence[dict] | dict) -> list[dict]:
    """Per-image label dicts from a list of them or from a batch collated by default_collate (dict of lists)."""
    if isinstance(labels, dict):
        columns = {k: v.tolist() if isinstance(v, torch.Tensor) else list(v) for k, v in labels.items()}
        count = len(next(iter(columns.values())))
        return [{k: column[i] for k, column in columns.items()} for i in range(count)]
    return list(labels)


# -- the network ---------------------------------------------------------------------------------

def judge_input(images: torch.Tensor) -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1] -> [N, 3, 72, 72] (antialiased bicubic when the size differs)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"the shapes judge expects RGB images [N, 3, H, W], got shape {tuple(images.shape)}")
    images = images.float().clamp(-1, 1)
    if images.shape[-2:] != (JUDGE_SIZE, JUDGE_SIZE):
        # Bicubic keeps the corners that tell a small hexagon from a circle sharper than bilinear.
        images = F.interpolate(images, size=(JUDGE_SIZE, JUDGE_SIZE), mode="bicubic", align_corners=False,
                               antialias=True).clamp(-1, 1)
    return images


def to_cells(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, 72, 72] -> the grid cells in reading order [N * 9, 3, 24, 24] (cell k of image i at i * 9 + k)."""
    n, c = images.shape[:2]
    cells = images.reshape(n, c, GRID, CELL_SIZE, GRID, CELL_SIZE).permute(0, 2, 4, 1, 3, 5)
    return cells.reshape(n * GRID * GRID, c, CELL_SIZE, CELL_SIZE)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class CellClassifier(nn.Module):
    """One grid cell [B, 3, 24, 24] -> logits [B, sum of CELL_HEADS sizes].

    Global average pooling at the end: within its cell an object may sit anywhere.
    """

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv(3, w), _conv(w, w),                   # 24x24
            _conv(w, 2 * w, 2), _conv(2 * w, 2 * w),    # 12x12
            _conv(2 * w, 4 * w, 2), _conv(4 * w, 4 * w),  # 6x6
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, sum(len(v) for v in CELL_HEADS.values()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def split_logits(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """[B, total] -> {head: [B, classes of that head]}."""
    return dict(zip(CELL_HEADS, logits.split([len(v) for v in CELL_HEADS.values()], dim=1)))


def cell_targets(labels: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Scene label dicts -> per-cell class indices {head: [N * 9]}; -100 (ignored) for the colour
    and size of empty cells."""
    n = len(labels)
    targets = {head: torch.full((n, GRID * GRID), -100, dtype=torch.long) for head in CELL_HEADS}
    targets["shape"].zero_()  # index 0: empty
    for i, scene in enumerate(labels):
        targets["background"][i] = CELL_HEADS["background"].index(scene["background"])
        for slot in range(int(scene["num_objects"])):
            cell = POSITIONS.index(scene[f"position_{slot}"])
            for head in ("shape", "color", "size"):
                targets[head][i, cell] = CELL_HEADS[head].index(scene[f"{head}_{slot}"])
    return {head: t.flatten() for head, t in targets.items()}


def scene_labels_from_cells(logits: dict[str, torch.Tensor]) -> list[dict]:
    """Per-cell logits {head: [N * 9, classes]} -> N label dicts in the `parse_shapes_prompt` layout.

    num_objects is the number of occupied cells (so 0 or 3+ can be reported, and are then wrong);
    the first two occupied cells in reading order fill slots 0 and 1.
    """
    cells = GRID * GRID
    n = logits["shape"].shape[0] // cells
    background = logits["background"].log_softmax(-1).view(n, cells, -1).sum(1).argmax(-1).tolist()
    predicted = {head: logits[head].argmax(-1).view(n, cells).tolist() for head in ("shape", "color", "size")}
    scenes = []
    for i in range(n):
        occupied = [k for k in range(cells) if predicted["shape"][i][k] != 0]
        scene: dict = {"num_objects": len(occupied), "background": CELL_HEADS["background"][background[i]]}
        for slot in range(MAX_OBJECTS):
            cell = occupied[slot] if slot < len(occupied) else None
            for head in ("shape", "color", "size"):
                scene[f"{head}_{slot}"] = CELL_HEADS[head][predicted[head][i][cell]] if cell is not None else ""
            scene[f"position_{slot}"] = POSITIONS[cell] if cell is not None else ""
        scenes.append(scene)
    return scenes


class ShapesJudge:
    """A trained CellClassifier and the reading of scene labels from its cell predictions."""

    def __init__(self, net: CellClassifier, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device = "cpu") -> ShapesJudge:
        """The shipped weights (metrics/weights/shapes_judge.safetensors) or another file written by --train."""
        path = Path(path) if path else DEFAULT_WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(f"shapes judge weights not found at {path}; train them with "
                                    f"`python -m metrics.shapes_judge --train`")
        net = CellClassifier()
        state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
        load_state_dict_strict(net, state, path, what="this shapes judge", hint="retrain it with --train")
        return cls(net, device)

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, batch_size: int = 128) -> list[dict]:
        """Images [N, 3, H, W] in [-1, 1] -> N label dicts (the `parse_shapes_prompt` layout)."""
        scenes = []
        for chunk in images.split(batch_size):
            logits = split_logits(self.net(to_cells(judge_input(chunk.to(self.device)))).float().cpu())
            scenes += scene_labels_from_cells(logits)
        return scenes

    def score(self, images: torch.Tensor, labels: Sequence[dict] | dict) -> dict[str, float]:
        """Accuracy per requested attribute: images [N, 3, H, W] in [-1, 1] against N label dicts
        (from `parse_shapes_prompt` or a data batch).

        Keys: num_objects, background, shape, color, size, position (object attributes counted over
        the objects each prompt asks for; a missing or misplaced object counts as wrong) and
        all_attributes (fraction of images with every requested attribute right).
        """
        wanted = labels_to_list(labels)
        if len(wanted) != len(images):
            raise ValueError(f"got {len(images)} images but {len(wanted)} label sets")
        return adherence(self.predict(images), wanted)

    def score_prompts(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
        """`score` with labels parsed from shapes captions."""
        return self.score(images, [parse_shapes_prompt(p) for p in prompts])


def adherence(predicted: Sequence[dict], wanted: Sequence[dict]) -> dict[str, float]:
    """Per-attribute accuracy of predicted label dicts against requested ones (see `ShapesJudge.score`)."""
    hits: dict[str, list[bool]] = {name: [] for name in (*SCENE_ATTRIBUTES, *OBJECT_ATTRIBUTES)}
    all_right = []
    for guess, truth in zip(predicted, wanted):
        image_hits = []
        for name in SCENE_ATTRIBUTES:
            image_hits.append(guess[name] == truth[name])
            hits[name].append(image_hits[-1])
        for slot in range(int(truth["num_objects"])):
            for name in OBJECT_ATTRIBUTES:
                image_hits.append(guess[f"{name}_{slot}"] == truth[f"{name}_{slot}"])
                hits[name].append(image_hits[-1])
        all_right.append(all(image_hits))
    scores = {name: float(np.mean(values)) if values else float("nan") for name, values in hits.items()}
    scores["all_attributes"] = float(np.mean(all_right)) if all_right else float("nan")
    return scores


# -- training ------------------------------------------------------------------------------------

def render_scenes(count: int, size: int, split: str, seed: int) -> tuple[torch.Tensor, list[dict]]:
    """`count` shapes scenes rendered at `size` and brought to the judge's input: ([N, 3, 72, 72], labels)."""
    dataset = build_dataset(DataConfig(source="shapes", size=size, split=split, seed=seed, shapes_length=count))
    images, labels = [], []
    for start in range(0, count, 512):  # resized in chunks: 128-pixel renders would take 4x the memory
        items = [dataset[i] for i in range(start, min(start + 512, count))]
        images.append(judge_input(torch.stack([item["image"] for item in items])))
        labels += [item["labels"] for item in items]
    return torch.cat(images), labels


def training_cells(images: torch.Tensor, labels: Sequence[dict], empty_fraction: float,
                   generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cells [M, 3, 24, 24] and their targets: every occupied cell, and about `empty_fraction` of the
    empty ones (most cells are empty; all of them would mostly repeat the background)."""
    cells, targets = to_cells(images), cell_targets(labels)
    keep = (targets["shape"] != 0) | (torch.rand(len(cells), generator=generator) < empty_fraction)
    return cells[keep], {head: t[keep] for head, t in targets.items()}


def degrade(cells: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Training augmentation standing in for a generator's flaws: random blur, noise, slight colour drift."""
    n = cells.shape[0]
    blurred = cells.clone()
    # Mild and not too often: strong blur makes a small hexagon and a circle the same picture.
    blur = torch.rand(n, generator=generator) < 0.3
    if blur.any():  # down- and up-sampling by a random factor
        factor = float(torch.empty(1).uniform_(0.6, 0.9, generator=generator))
        small = F.interpolate(cells[blur], scale_factor=factor, mode="bilinear", antialias=True, align_corners=False)
        blurred[blur] = F.interpolate(small, size=cells.shape[-2:], mode="bilinear", align_corners=False)
    gain = 1 + 0.06 * (torch.rand(n, 3, 1, 1, generator=generator) - 0.5)
    shift = 0.08 * (torch.rand(n, 3, 1, 1, generator=generator) - 0.5)
    noise = torch.randn(cells.shape, generator=generator) * 0.06 * torch.rand(n, 1, 1, 1, generator=generator)
    return (blurred * gain + shift + noise).clamp(-1, 1)


def _cell_loss(logits: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
    # Colour and size of empty cells are -100: ignored.
    return sum(F.cross_entropy(part, targets[head], ignore_index=-100) for head, part in split_logits(logits).items())


def train_judge(out: Path = DEFAULT_WEIGHTS, scenes_per_size: dict[int, int] | None = None, epochs: int = 6,
                batch_size: int = 256, lr: float = 3e-3, empty_fraction: float = 0.15, seed: int = 0) -> CellClassifier:
    """Train on cells of rendered train-split scenes and write fp16 safetensors weights to `out`."""
    scenes_per_size = scenes_per_size or {32: 3000, 64: 10000, 128: 3000}
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    start = time.time()
    parts = [training_cells(*render_scenes(count, size, "train", seed=seed + size), empty_fraction, generator)
             for size, count in scenes_per_size.items()]
    cells = torch.cat([p[0] for p in parts])
    targets = {head: torch.cat([p[1][head] for p in parts]) for head in CELL_HEADS}
    print(f"{sum(scenes_per_size.values())} training scenes rendered, {len(cells)} cells "
          f"({time.time() - start:.0f} s)", flush=True)

    net = CellClassifier().to(memory_format=torch.channels_last)
    steps_per_epoch = math.ceil(len(cells) / batch_size)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                   pct_start=0.15)
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(cells), generator=generator)
        total = 0.0
        for step in range(steps_per_epoch):
            batch = order[step * batch_size:(step + 1) * batch_size]
            x = degrade(cells[batch], generator).contiguous(memory_format=torch.channels_last)
            loss = _cell_loss(net(x), {head: t[batch] for head, t in targets.items()})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        print(f"epoch {epoch + 1}/{epochs}: loss {total / steps_per_epoch:.4f} ({time.time() - start:.0f} s)",
              flush=True)
    net = net.eval().to(memory_format=torch.contiguous_format)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(out), metadata={"format": "shapes-judge", "input_size": str(JUDGE_SIZE)})
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)", flush=True)
    return net


def validate(judge: ShapesJudge, count: int = 2000, sizes: Sequence[int] = (32, 64, 128), seed: int = 1) -> dict:
    """Per-attribute accuracy on held-out (test split) scenes at each size, clean images."""
    report = {}
    for size in sizes:
        images, labels = render_scenes(count, size, "test", seed=seed)
        report[str(size)] = judge.score(images, labels)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m metrics.shapes_judge",
                                     description="Train or validate the shapes prompt-adherence judge.")
    parser.add_argument("--train", action="store_true", help="train and write the weights file")
    parser.add_argument("--validate", action="store_true", help="report held-out accuracy per attribute")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--count", type=int, default=2000, help="held-out scenes per size for --validate")
    args = parser.parse_args(argv)
    if not (args.train or args.validate):
        parser.error("nothing to do: pass --train and/or --validate")
    if args.train:
        train_judge(args.weights, epochs=args.epochs)
    judge = ShapesJudge.load(args.weights)
    print(json.dumps(validate(judge, args.count), indent=2))


if __name__ == "__main__":
    main()
