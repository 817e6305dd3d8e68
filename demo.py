"""The main job: text-to-image from a few prompts on the shipped default model, plus a ControlNet example.

    python demo.py [--out outputs/demo]      (what `make demo` runs)

Uses `models/default/` (trained by scripts/train_default_model.sh on the built-in emoji; see
models/default/RECIPE.md). Writes `text-to-image/grid.png` (four prompts, four seeds each) and, for a
few held-out emoji (`controlnet/source-*.png`), their Canny edges (`controlnet/edges-*.png`), the
images the Canny ControlNet draws from them (`controlnet/<name>/`) and `controlnet/overview.png`
with all of them side by side; `lora-fashion/grid.png`: Fashion-MNIST prompts drawn with the
shipped LoRA (`models/default/lora-fashion.safetensors`, generate.py --lora), a domain the model never
saw; `shapes/grid.png`: compositional prompts (shape, colour, size, position, background) drawn by
the shipped shapes model (`models/default/shapes.safetensors`, DATA=shapes scripts/train_default_model.sh);
and `shapes-controlnet/overview.png`: for a few held-out scenes, the scene, its exact outlines and what
the outline ControlNet (`controlnet-shapes-edges.safetensors`) draws from outlines and caption.
Under a minute on 2 CPU cores (47 s on an AMD EPYC, 2026-12-05, quiet but a slow day: sgemm 141
GFLOP/s; the demo before the outline ControlNet, which ran every ControlNet example as its own
generate.py process, took 59 s in the same conditions).

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
CONTROL_SCENES = [0, 1]  # held-out shapes scenes (test split) for the outline ControlNet
SHAPES_PROMPTS = [  # captions in the shapes data's grammar, none of them a training caption's exact words
    "a large red circle at the center on a white background",
    "a small blue square at the top left on a black background",
    "a large yellow star on the right on a gray background",
    "a small green triangle at the top and a large purple hexagon at the bottom right on a white background",
]
# The shapes model's guidance, by the sweep at n = 384 (bench/RESULTS.md): 80.5% of images fully right at 2,
# 81.0% at 3 (within noise) for FID 58.4 against 63.9; 73.7% at 1.
SHAPES_GUIDANCE = 2.0
# The outline ControlNet's strength, by the sweep at n = 384 (bench/RESULTS.md): edge F1 (1 px) 0.930 at 1,
# 0.943 at 1.25, every attribute >= 98.5% at both; on the previous base, 2 cost size and shape.
SHAPES_CONTROL_SCALE = 1.25
# The Canny ControlNet's guidance and strength, by the sweep at n = 192 held-out emoji (bench/RESULTS.md): edge
# F1 (1 px) 0.813 at guidance 1 and strength 2, FID 184.6 with it and without; 0.690 at guidance 3 and strength
# 1, where strength 2 costs 12.8 FID.
EMOJI_CONTROL_GUIDANCE = 1.0
EMOJI_CONTROL_SCALE = 2.0


def _python(*args) -> None:
    """Run a script of this repository; its failure (it printed its one-line error) ends the demo."""
    code = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT).returncode
    if code:
        sys.exit(code)


def _pixels(image) -> np.ndarray:
    """[C, H, W] in [-1, 1] -> [H, W, C] uint8."""
    return ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def held_out_emoji(captions: list[str]) -> dict[str, Image.Image]:
    """The 64x64 held-out emoji with these captions, as RGB images."""
    from data import DataConfig, build_dataset

    test = build_dataset(DataConfig(source="emoji", size=64, split="test"))
    found = {}
    for key in range(len(test)):
        item = test[key]
        if item["caption"] in captions:
            found[item["caption"]] = Image.fromarray(_pixels(item["image"]))
    missing = set(captions) - found.keys()
    if missing:
        raise ValueError(f"not in the held-out emoji: {sorted(missing)}")
    return found


def held_out_scenes(keys: list[int]) -> list[tuple[str, Image.Image, Image.Image]]:
    """(caption, scene, exact outlines) of these 64x64 held-out shapes scenes."""
    from data import DataConfig, build_dataset

    test = build_dataset(DataConfig(source="shapes", size=64, split="test", condition="shapes-edges"))
    return [(item["caption"], Image.fromarray(_pixels(item["image"])),
             Image.fromarray((item["hint"][0] * 255).round().byte().numpy()))
            for item in (test[key] for key in keys)]


def draw_controlled(checkpoint: Path, controlnet: Path, items: list[tuple[str, Image.Image, Path]], control: str,
                    guidance: float, steps: int, scale: float = 1.0) -> list[list[np.ndarray]]:
    """Four images per (caption, control image, folder) with one ControlNet, saved into the folder as
    generate.py --overwrite names them (000-seed0.png ...); returns them per item as [H, W, 3] arrays."""
    from ldm.pipeline import Pipeline
    from ldm.png_metadata import save_image

    pipeline, drawn = Pipeline.from_file(checkpoint, controlnets=[controlnet]), []
    for caption, condition, folder in items:
        images = pipeline(caption, sampler="dpmpp-2m", steps=steps, guidance=guidance, num_images=4,
                          control_image=condition.convert("RGB"), control=control, control_scale=scale)
        folder.mkdir(parents=True, exist_ok=True)
        for seed, image in enumerate(images):
            save_image(image, folder / f"000-seed{seed}.png")
        drawn.append([np.asarray(image) for image in images])
    return drawn


def _as_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "demo")
    args = parser.parse_args(argv)
    model, controlnet = MODEL_DIR / "model.safetensors", MODEL_DIR / "controlnet-canny.safetensors"
    lora, shapes = MODEL_DIR / "lora-fashion.safetensors", MODEL_DIR / "shapes.safetensors"
    shapes_controlnet = MODEL_DIR / "controlnet-shapes-edges.safetensors"
    for path in (model, controlnet, lora, shapes, shapes_controlnet):
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

    # The ControlNet examples in this process, through the Python API (what generate.py --controlnet does,
    # one model load for all images of a net).
    from conditioning.edges import canny, to_uint8_hwc
    from generate import grid

    emoji = [(caption, image, Image.fromarray(canny(to_uint8_hwc(image))),
              out / "controlnet" / caption.replace(" ", "-"))
             for caption, image in held_out_emoji(CONTROL_EMOJI).items()]
    for caption, image, edges, folder in emoji:
        folder.parent.mkdir(parents=True, exist_ok=True)
        image.save(folder.parent / f"source-{folder.name}.png")
        edges.save(folder.parent / f"edges-{folder.name}.png")
    rows = draw_controlled(model, controlnet, [(caption, image, folder) for caption, image, _, folder in emoji],
                           "canny", guidance=EMOJI_CONTROL_GUIDANCE, steps=15, scale=EMOJI_CONTROL_SCALE)
    overview = grid([[np.asarray(image), _as_rgb(np.asarray(edges)), *drawn]
                     for (_, image, edges, _), drawn in zip(emoji, rows)])
    Image.fromarray(overview).save(out / "controlnet" / "overview.png")

    scenes = [(caption, scene, outlines, out / "shapes-controlnet" / f"scene-{index}")
              for index, (caption, scene, outlines) in enumerate(held_out_scenes(CONTROL_SCENES))]
    for _, scene, outlines, folder in scenes:
        folder.mkdir(parents=True, exist_ok=True)
        scene.save(folder / "source.png")
        outlines.save(folder / "outlines.png")
    rows = draw_controlled(shapes, shapes_controlnet, [(caption, outlines, folder)
                                                        for caption, _, outlines, folder in scenes],
                           "map", guidance=SHAPES_GUIDANCE, steps=15, scale=SHAPES_CONTROL_SCALE)
    overview = grid([[np.asarray(scene), _as_rgb(np.asarray(outlines)), *drawn]
                     for (_, scene, outlines, _), drawn in zip(scenes, rows)])
    Image.fromarray(overview).save(out / "shapes-controlnet" / "overview.png")
    print(f"demo: images in {out / 'text-to-image'}, {out / 'controlnet'}, {out / 'lora-fashion'}, {out / 'shapes'} "
          f"and {out / 'shapes-controlnet'}; grids in "
          f"{out / 'text-to-image' / 'grid.png'}, {out / 'controlnet' / 'overview.png'} "
          "(per row: the held-out emoji, its Canny edges, four images drawn from the edges), "
          f"{out / 'lora-fashion' / 'grid.png'} (Fashion-MNIST prompts with the shipped LoRA), "
          f"{out / 'shapes' / 'grid.png'} (compositional prompts, the shapes model) and "
          f"{out / 'shapes-controlnet' / 'overview.png'} (per row: a held-out scene, its outlines, four images "
          "drawn from outlines and caption)")


if __name__ == "__main__":
    run(main)
