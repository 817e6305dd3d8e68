"""The main job: text-to-image from a few prompts on the built-in default model.

    python demo.py            (what `make demo` runs)

Uses `models/default/model.safetensors` when the repository ships it. Until then it trains a small
model on the built-in emoji data first (stage 1, then stage 2, a few minutes on a CPU), keeps it in
`runs/demo/` for the next call, and generates from that.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SHIPPED = ROOT / "models" / "default" / "model.safetensors"
QUICK = ROOT / "runs" / "demo"
PROMPTS = ["grinning face", "dog face", "sun", "green heart"]
OUT = ROOT / "outputs" / "demo"


def _python(*args) -> None:
    subprocess.run([sys.executable, *map(str, args)], check=True, cwd=ROOT)


def quick_model(stage1_steps: int, stage2_steps: int) -> Path:
    """Train the stage-1 and stage-2 emoji configs briefly (or reuse an earlier quick run)."""
    stage1 = QUICK / "stage1" / "autoencoder.safetensors"
    stage2 = QUICK / "stage2" / "model.safetensors"
    if not stage1.is_file():
        print("demo: no shipped model yet; training a quick one on the built-in emoji data (stage 1)")
        _python("train_stage1.py", "--config", "configs/autoencoder/kl-f4-emoji64.yaml",
                f"train.output_dir={stage1.parent}", f"train.max_steps={stage1_steps}", "train.checkpoint_every=1000")
    if not stage2.is_file():
        print("demo: training the quick model's stage 2")
        _python("train_stage2.py", "--config", "configs/ldm/emoji64.yaml", "--first-stage", stage1,
                f"train.output_dir={stage2.parent}", f"train.max_steps={stage2_steps}", "train.checkpoint_every=1000",
                "train.image_every=0", "train.ema_decay=0.99", "train.batch_size=16",
                f"latent_cache_dir={QUICK / 'latent_cache'}")
    return stage2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage1-steps", type=int, default=400, help="quick model only")
    parser.add_argument("--stage2-steps", type=int, default=300, help="quick model only")
    args = parser.parse_args()
    checkpoint = SHIPPED if SHIPPED.is_file() else quick_model(args.stage1_steps, args.stage2_steps)
    prompts = OUT / "prompts.txt"
    OUT.mkdir(parents=True, exist_ok=True)
    prompts.write_text("\n".join(PROMPTS) + "\n")
    _python("generate.py", "--checkpoint", checkpoint, "--prompts-file", prompts, "--n", 4,
            "--sampler", "dpmpp-2m", "--steps", 25, "--cfg", 3, "--out", OUT)
    print(f"demo: {len(PROMPTS) * 4} images and grid.png in {OUT}")


if __name__ == "__main__":
    main()
