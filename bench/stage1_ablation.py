"""What do the perceptual loss and the PatchGAN buy a small stage-1 autoencoder at a fixed CPU budget?

    python bench/stage1_ablation.py --data emoji --minutes 12 --out /tmp/bench/stage1-ablation/emoji

Trains four arms of one stage-1 config (default configs/autoencoder/kl-f4-emoji64.yaml) with
train_stage1.py, each for the same wall time on the same data and seed:

  l1-kl       L1 + KL only (perceptual weight 0, discriminator never started)
  perceptual  + the offline Inception perceptual distance (loss.lpips_net=inception)
  gan         + the PatchGAN from step --disc-start (hinge loss, LDM's adaptive weight)
  both        + both

then evaluates each with autoencoder.evaluate on --n held-out images (PSNR, SSIM, edge F1 at 1 px
against the originals, rFID, the Inception distance, and the shapes judge's adherence on shapes
data). rFID and the Inception distance use the network the perceptual arms trained with, so they
are not independent evidence for those arms; PSNR, SSIM, edges and the judge are.

Prints a markdown table for bench/RESULTS.md, writes results.json and rows.png (originals on top,
then one row of reconstructions per arm, in the table's order) under --out. Run it on a quiet
machine: the budget is wall time, so a loaded machine gives every arm fewer steps.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def arms(perceptual_weight: float, disc_start: int) -> dict[str, list[str]]:
    """Config overrides of each arm."""
    no_gan = "loss.disc_start=1000000000"
    perceptual = [f"loss.perceptual_weight={perceptual_weight}", "loss.lpips_net=inception"]
    return {
        "l1-kl": ["loss.perceptual_weight=0", no_gan],
        "perceptual": [*perceptual, no_gan],
        "gan": ["loss.perceptual_weight=0", f"loss.disc_start={disc_start}"],
        "both": [*perceptual, f"loss.disc_start={disc_start}"],
    }


def last_step(run_dir: Path) -> int:
    """The step of the run's last checkpoint (the loop saves where a time limit stopped it)."""
    steps = [int(m.group()) for p in (run_dir / "checkpoints").iterdir() if (m := re.search(r"\d+", p.name))]
    return max(steps)


def train(args: argparse.Namespace, run_dir: Path, overrides: list[str]) -> dict:
    command = [sys.executable, str(ROOT / "train_stage1.py"), "--config", args.config,
               f"data.source={args.data}", f"train.output_dir={run_dir}", "train.max_steps=1000000",
               f"train.max_minutes={args.minutes}", "train.image_every=1000000", "train.checkpoint_every=1000000",
               *overrides, *args.overrides]
    print("+", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return {"train_seconds": round(time.perf_counter() - started, 1), "steps": last_step(run_dir)}


def evaluate(args: argparse.Namespace, run_dir: Path) -> dict:
    out = run_dir / "eval.json"
    command = [sys.executable, "-m", "autoencoder.evaluate", "--checkpoint", str(run_dir / "autoencoder.safetensors"),
               "--data", args.data, "--n", str(args.n), "--lpips-net", "inception", "--row", str(run_dir / "row.png"),
               "--row-images", str(args.row_images), "--out", str(out)]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)
    return json.loads(out.read_text())


def stack_rows(rows: list[Path]) -> Image.Image:
    """The originals (top half of the first arm's row) above every arm's reconstructions (bottom halves)."""
    images = [np.asarray(Image.open(path).convert("RGB")) for path in rows]
    half = images[0].shape[0] // 2
    return Image.fromarray(np.concatenate([images[0][:half], *(image[half:] for image in images)], axis=0))


def table(results: dict[str, dict], shapes: bool) -> str:
    head = "| arm | steps | PSNR (dB) | SSIM | edge F1 (1 px) | rFID* | Inception distance* |"
    rule = "|---|---|---|---|---|---|---|"
    if shapes:
        head += " judge: all right | shape | colour | position | size |"
        rule += "---|---|---|---|---|"
    lines = [head, rule]
    for name, r in results.items():
        line = (f"| {name} | {r['steps']:,} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['edges']['f1']:.3f} | "
                f"{r['rfid']:.1f} | {r['lpips']:.3f} |")
        if shapes:
            s = r["shapes"]
            line += " " + " | ".join(f"{100 * s[k]:.1f}%" for k in ("all_attributes", "shape", "color", "position", "size")) + " |"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="emoji", help="data source (emoji, shapes, ...)")
    parser.add_argument("--config", default="configs/autoencoder/kl-f4-emoji64.yaml")
    parser.add_argument("--minutes", type=float, default=12.0, help="wall-time budget of each arm")
    # About equal to L1 at the start: after 60 steps L1 is 0.30 and the distance 1.8 (2026-12-04).
    parser.add_argument("--perceptual-weight", type=float, default=0.2)
    parser.add_argument("--disc-start", type=int, default=300)
    parser.add_argument("--arms", nargs="+", help="a subset of l1-kl perceptual gan both")
    parser.add_argument("--n", type=int, default=192, help="held-out images evaluated")
    parser.add_argument("--row-images", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench/stage1-ablation"))
    parser.add_argument("overrides", nargs="*", help="config overrides for every arm, key=value")
    args = parser.parse_args()

    results: dict[str, dict] = {}
    for name, overrides in arms(args.perceptual_weight, args.disc_start).items():
        if args.arms and name not in args.arms:
            continue
        run_dir = args.out / name
        if not (run_dir / "autoencoder.safetensors").exists():
            stats = train(args, run_dir, overrides)
            (run_dir / "train.json").write_text(json.dumps(stats))
        results[name] = {**json.loads((run_dir / "train.json").read_text()), **evaluate(args, run_dir)}
        print(json.dumps({name: results[name]}), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    names = list(results)
    stack_rows([args.out / n / "row.png" for n in names]).save(args.out / "rows.png")
    print(table(results, shapes=args.data == "shapes"))
    print(f"rows: {args.out / 'rows.png'} (originals, then {', '.join(names)})")


if __name__ == "__main__":
    main()
