"""The main job: text-to-image from a few prompts on the shipped default model, plus a ControlNet example.

    python demo.py [--out outputs/demo]      (what `make demo` runs)

Uses `models/default/` (trained by scripts/train_default_model.sh on the built-in emoji; see
models/default/RECIPE.md). Writes `text-to-image/grid.png` (four prompts, four seeds each) and, for a
few held-out emoji (`controlnet/source-*.png`), their Canny edges (`controlnet/edges-*.png`), the
images the Canny ControlNet draws from them (`controlnet/<name>/`) and `controlnet/overview.png`
with all of them side by side; `lora-fashion/grid.png`: Fashion-MNIST prompts drawn with the
shipped LoRA (`models/default/lora-fashion.safetensors`, generate.py --lora), a domain the model never
saw; and `shapes/grid.png`: compositional prompts (shape, colour, size, position, background) drawn by
the shipped shapes model (`models/default/shapes.safetensors`, DATA=shapes scripts/train_default_model.sh). Under a minute on 2 CPU cores (44 s on an AMD EPYC, 2026-12-05, quiet).

The demo's files have fixed names (generate.py --overwrite: `000-seed0.png` ... and `grid.png`), so a
second `make demo` replaces the first one's instead of adding numbered copies beside them.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from common.cli import ArgumentParser, check_output_folder, run

ROOT = Path(__file__).resolve().parent
MODEL_DIR = ROOT / "models" / "default"
PROMPTS = ["grinning face", "cat face", "purple heart", "fire"]  # training captions it draws well (see RECIPE.md)
LORA_PROMPTS = ["sneaker", "dress", "bag", "ankle boot"]  # Fashion-MNIST classes, for the shipped LoRA
CONTROL_EMOJI = ["crying cat face", "teapot"]  # in the held-out split
SHAPES_PROMPTS = [  # captions in the shapes data's grammar, none of them a training caption's exact words
    "a large red circle at the center on a white background",
    "a small blue square at the top left on a black background",
    "a large yellow star on the right on a gray background",
    "a small green triangle at the top and a large purple hexagon at the bottom right on a white background",
]
SHAPES_GUIDANCE = 2.0  # best by the sweep at n = 384: 42% of images fully right at 2, 40% at 3, FID 89 against 96


def _python(*args) -> None:
    """Run a script of this repository; its failure (it printed its one-line error) ends the demo."""
    code = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT).returncode
    if code:
        sys.exit(code)


def held_out_emoji(captions: list[str]) -> dict[str, Image.Image]:
    """The 64x64 held-out emoji with these captions, as RGB images."""
    from data import DataConfig, build_dataset

    test = build_dataset(DataConfig(source="emoji", size=64, split="test"))
    found = {}
    for key in range(len(test)):
        item = test[key]
        if item["caption"] in captions:
            pixels = ((item["image"].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            found[item["caption"]] = Image.fromarray(pixels)
    missing = set(captions) - found.keys()
    if missing:
        raise ValueError(f"not in the held-out emoji: {sorted(missing)}")
    return found


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "demo")
    args = parser.parse_args(argv)
    model, controlnet = MODEL_DIR / "model.safetensors", MODEL_DIR / "controlnet-canny.safetensors"
    lora, shapes = MODEL_DIR / "lora-fashion.safetensors", MODEL_DIR / "shapes.safetensors"
    for path in (model, controlnet, lora, shapes):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; train it with scripts/train_default_model.sh")
    check_output_folder(args.out, "--out")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    _python("generate.py", "--checkpoint", model, "--prompts-file", prompts, "--n", 4, "--sampler", "dpmpp-2m",
            "--steps", 25, "--cfg", 3, "--out", out / "text-to-image", "--overwrite")
    lora_prompts = out / "lora-prompts.txt"
    lora_prompts.write_text("\n".join(LORA_PROMPTS) + "\n")
    _python("generate.py", "--checkpoint", model, "--lora", lora, "--prompts-file", lora_prompts, "--n", 2,
            "--sampler", "dpmpp-2m", "--steps", 25, "--cfg", 3, "--out", out / "lora-fashion", "--overwrite")
    shapes_prompts = out / "shapes-prompts.txt"
    shapes_prompts.write_text("\n".join(SHAPES_PROMPTS) + "\n")
    _python("generate.py", "--checkpoint", shapes, "--prompts-file", shapes_prompts, "--n", 4, "--sampler", "dpmpp-2m",
            "--steps", 15, "--cfg", SHAPES_GUIDANCE, "--out", out / "shapes", "--overwrite")

    from conditioning.edges import canny, to_uint8_hwc
    from generate import grid

    rows = []
    for caption, image in held_out_emoji(CONTROL_EMOJI).items():
        name = caption.replace(" ", "-")
        source = out / "controlnet" / f"source-{name}.png"
        source.parent.mkdir(parents=True, exist_ok=True)
        image.save(source)
        edges = canny(to_uint8_hwc(image))
        Image.fromarray(edges).save(out / "controlnet" / f"edges-{name}.png")
        _python("generate.py", caption, "--checkpoint", model, "--controlnet", controlnet, "--control", "canny",
                "--control-image", source, "--n", 4, "--sampler", "dpmpp-2m", "--steps", 25, "--cfg", 3,
                "--out", out / "controlnet" / name, "--overwrite")
        generated = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((out / "controlnet" / name).glob("0*.png"))]
        rows.append([np.asarray(image), np.repeat(edges[..., None], 3, axis=2), *generated])
    Image.fromarray(grid(rows)).save(out / "controlnet" / "overview.png")
    print(f"demo: images in {out / 'text-to-image'}, {out / 'controlnet'}, {out / 'lora-fashion'} and {out / 'shapes'}; "
          "grids in "
          f"{out / 'text-to-image' / 'grid.png'}, {out / 'controlnet' / 'overview.png'} "
          "(per row: the held-out emoji, its Canny edges, four images drawn from the edges), "
          f"{out / 'lora-fashion' / 'grid.png'} (Fashion-MNIST prompts with the shipped LoRA) and "
          f"{out / 'shapes' / 'grid.png'} (compositional prompts, the shapes model)")


if __name__ == "__main__":
    run(main)
