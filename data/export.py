"""Write items of any data source as files: to look at the data, to carry a built-in set elsewhere,
or to get condition images for a ControlNet.

    python -m data.export --out examples/shapes --n 4 source=shapes split=test condition=shapes-edges

writes `images/00000.png` with its caption in `images/00000.txt` (the layout `data.source=folder`
reads back) and, with a `condition`, the condition image `hints/00000.png` beside them: what a
ControlNet trained on that condition takes as `generate.py --control-image`.
"""
from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from common.cli import ArgumentParser, check_output_folder, run
from common.config import apply_override, from_dict
from data.build import build_dataset
from data.config import DataConfig


def to_pil(image: torch.Tensor, low: float) -> Image.Image:
    """A [C, H, W] tensor with values in [low, 1] (-1 for images, 0 for hints) as an 8-bit RGB image."""
    pixels = ((image.clamp(low, 1) - low) / (1 - low) * 255).round().byte()
    if pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def export(cfg: DataConfig, out: Path, n: int) -> int:
    """Write the first `n` items of the data set `cfg` describes under `out`; return how many."""
    dataset = build_dataset(cfg)
    count = min(n, len(dataset))
    (out / "images").mkdir(parents=True, exist_ok=True)
    if cfg.condition:
        (out / "hints").mkdir(exist_ok=True)
    for index in tqdm(range(count), desc="export", unit="image"):
        item = dataset[index]
        name = f"{index:05d}"
        to_pil(item["image"], -1).save(out / "images" / f"{name}.png")
        (out / "images" / f"{name}.txt").write_text(item["caption"] + "\n", encoding="utf-8")
        if cfg.condition:
            to_pil(item["hint"], 0).save(out / "hints" / f"{name}.png")
    return count


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write images/ (and hints/) into")
    parser.add_argument("--n", type=int, default=16, help="how many items (the first ones of the split)")
    parser.add_argument("settings", nargs="*", help="data settings as key=value, e.g. source=shapes split=test")
    args = parser.parse_args(argv)
    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    check_output_folder(args.out, "--out")
    raw = asdict(DataConfig())
    for item in args.settings:
        apply_override(raw, item, source="data settings")
    cfg = from_dict(DataConfig, raw, source="data settings")
    count = export(cfg, args.out, args.n)
    print(f"wrote {count} image{'s' * (count != 1)} to {args.out / 'images'}"
          + (f" and their {cfg.condition} conditions to {args.out / 'hints'}" if cfg.condition else ""))


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]))
