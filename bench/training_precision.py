"""Stage-2 or ControlNet training in bf16 autocast against float32 (issue 20): the same run (config, seed,
data) in each precision, loss curves side by side, and a second bf16 seed for the noise between runs.

Each run is the real `train_stage2.py` (or `train_controlnet.py`) in a subprocess (`train.mixed_precision`,
`train.seed`, `train.max_steps` overridden; log every 10 steps); a finished run is reused. Prints window means of the
logged loss per run, |fp32 - bf16| on the same seed beside |bf16 seed 0 - bf16 seed 1|, and the median
training throughput; draws the curves (50-step means, log scale) into `--plot`.

    HF_HUB_OFFLINE=1 python bench/training_precision.py --first-stage runs/ae/autoencoder.safetensors \\
        --steps 1000 --plot docs/training-bf16-vs-fp32.png
    HF_HUB_OFFLINE=1 python bench/training_precision.py --controlnet-of models/default/model.safetensors \\
        --config controlnet/emoji-canny --out /tmp/bench/training-precision-controlnet
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common.cli import ArgumentParser, run  # noqa: E402
from training.run_log import read_scalars  # noqa: E402

RUNS = (("no", 0), ("bf16", 0), ("bf16", 1))  # (train.mixed_precision, train.seed)
COLOURS = {("no", 0): (31, 119, 180), ("bf16", 0): (214, 39, 40), ("bf16", 1): (150, 150, 150)}
WIDTHS = {("no", 0): 6, ("bf16", 0): 2, ("bf16", 1): 1}  # fp32 drawn wide under bf16: where they agree, both show


def run_name(precision: str, seed: int) -> str:
    return f"{'fp32' if precision == 'no' else precision}-seed{seed}"


def train_run(out: Path, config: str, trainer: list[str], steps: int, precision: str, seed: int) -> Path:
    """The run's folder, trained now unless it holds a finished run of `steps` steps. `trainer`: the
    script and its model flag, e.g. [train_stage2.py, --first-stage, FILE]."""
    folder = out / run_name(precision, seed)
    if any(folder.glob(f"checkpoints/step_{steps:08d}")):
        return folder
    command = [sys.executable, *trainer, "--config", config, f"train.output_dir={folder}",
               f"latent_cache_dir={out / 'latent_cache'}", f"train.max_steps={steps}", f"train.mixed_precision='{precision}'",
               f"train.seed={seed}", "train.max_minutes=null", "train.log_every=10", "train.image_every=0",
               f"train.checkpoint_every={steps}", "train.keep_checkpoints=1"]
    print(" ".join(command[1:]), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return folder


def window_means(points: list[tuple[int, float]], width: int) -> dict[int, float]:
    """{last step of the window: mean of the values logged in it} over windows of `width` steps."""
    sums: dict[int, list[float]] = {}
    for step, value in points:
        sums.setdefault(math.ceil(step / width) * width, []).append(value)
    return {end: sum(v) / len(v) for end, v in sorted(sums.items())}


def plot(curves: dict[tuple[str, int], dict[int, float]], path: Path, size=(720, 360), margin=50) -> None:
    """Log-scale loss against step, one line per run, with a legend."""
    values = [v for curve in curves.values() for v in curve.values()]
    low, high = math.log10(min(values)), math.log10(max(values))
    last = max(max(curve) for curve in curves.values())
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    width, height = size[0] - 2 * margin, size[1] - 2 * margin
    to_xy = lambda step, value: (margin + width * step / last,  # noqa: E731
                                 margin + height * (high - math.log10(value)) / (high - low))
    draw.rectangle([margin, margin, margin + width, margin + height], outline="black")
    for i in range(5):  # five ticks evenly spaced on the log scale
        value = 10 ** (low + i * (high - low) / 4)
        y = to_xy(0, value)[1]
        draw.line([margin - 4, y, margin, y], fill="black")
        draw.text((4, y - 6), f"{value:.3g}", fill="black")
    for step in range(0, last + 1, max(1, last // 5)):
        x = to_xy(step, 10 ** high)[0]
        draw.text((x - 10, margin + height + 6), str(step), fill="black")
    for row, (key, curve) in enumerate(curves.items()):
        draw.line([to_xy(s, v) for s, v in curve.items()], fill=COLOURS[key], width=WIDTHS[key])
        draw.text((margin + width - 150, margin + 8 + 14 * row), f"{run_name(*key)}", fill=COLOURS[key])
    draw.text((margin, 8), "training loss (50-step means) against step", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python bench/training_precision.py", description=__doc__.split("\n")[0])
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--first-stage", help="autoencoder.safetensors of train_stage1.py: train a U-Net on it")
    model.add_argument("--controlnet-of", help="a model.safetensors: train a ControlNet on it")
    parser.add_argument("--config", default="ldm/emoji64")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--window", type=int, default=100, help="steps per row of the table")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench/training-precision"))
    parser.add_argument("--plot", type=Path, help="PNG of the loss curves")
    args = parser.parse_args(argv)
    trainer = ([str(ROOT / "train_stage2.py"), "--first-stage", args.first_stage] if args.first_stage
               else [str(ROOT / "train_controlnet.py"), "--stage2", args.controlnet_of])
    folders = {key: train_run(args.out, args.config, trainer, args.steps, *key) for key in RUNS}
    scalars = {key: read_scalars(folder) for key, folder in folders.items()}
    losses = {key: [(step, value) for _, step, value in s["loss"]] for key, s in scalars.items()}
    tables = {key: window_means(points, args.window) for key, points in losses.items()}
    same_seed, other_seed = (("no", 0), ("bf16", 0)), (("bf16", 0), ("bf16", 1))
    print("\n| steps | " + " | ".join(run_name(*key) for key in RUNS) + " | fp32 - bf16, seed 0 | bf16 seed 0 - seed 1 |")
    print("|---|" + "---|" * (len(RUNS) + 2))
    for end in tables[RUNS[0]]:
        cells = [tables[key].get(end, math.nan) for key in RUNS]
        gaps = [tables[a].get(end, math.nan) - tables[b].get(end, math.nan) for a, b in (same_seed, other_seed)]
        print(f"| {end - args.window + 1}-{end} | " + " | ".join(f"{c:.4f}" for c in cells)
              + " | " + " | ".join(f"{g:+.4f}" for g in gaps) + " |")
    for key, s in scalars.items():
        rates = sorted(v for _, _, v in s.get("samples_per_second", []))
        if rates:
            print(f"{run_name(*key)}: median {rates[len(rates) // 2]:.1f} samples/s")
    if args.plot:
        plot({key: window_means(points, 50) for key, points in losses.items()}, args.plot)


if __name__ == "__main__":
    run(main)
