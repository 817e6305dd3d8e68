"""DreamBooth on the shipped default model, measured (issue 21 item 4; bench/RESULTS.md).

    HF_HUB_OFFLINE=1 python bench/dreambooth_default.py run --out runs/bench/dreambooth [--n 64] [--threads 2]
    ... run --out runs/bench/dreambooth --variant lr3e-4 --set optim.lr=3e-4 [--set key=value ...] [--runs prior]
    python bench/dreambooth_default.py subject --out runs/dreambooth-default/subject   # the pictures alone

The subject is one held-out emoji the model never saw (SUBJECT, checked to be in the test split of
data/emoji.py's fixed hash split): five pictures of it, random crops (75-100% of the side) with a
colour jitter, written as 64 px PNGs. `run` then trains configs/ldm/dreambooth-default.yaml twice on
them, with the same steps and batch of subject pictures: without prior preservation
(`dreambooth.prior_loss_weight=0`) and with it (lambda 1, 100 class pictures of "cat face" drawn by the
base model first into <out>/class_images: the prior run's recorded seconds include drawing them, which
its log shows apart), and scores, DPM-Solver++ 2M, 15 steps, guidance 3, image i from seed i:

  subject  n samples of the instance prompt ("a sks cat face") against the subject: PSNR and SSIM
           to its plain 64 px picture (as the held-out set holds it), and the cosine similarity of
           their Inception pool3 features (the FID network) to that picture's; for the base model too
           (the "before" figure), for the base model with the subject's own name, and for the five
           training pictures themselves (what a copy of the subject scores); and the share of samples
           with the subject's blue tear (`tear_share`), which the base's cat faces rarely have;
  class    n samples of the class prompt ("cat face"): FID against the 192 held-out emoji (the issue's
           figure: the class prompt's distance to emoji it never saw), FID against the base model's
           own n class samples (the drift itself: 0 would be no change), their mean Inception cosine
           to the subject and their tear share (whether "cat face" has moved to the subject).

The base model's class samples from seeds n..2n-1 are scored the same way: their FID against its own
seeds 0..n-1 is what "no drift" reads at this n (FID of 64 images is far from 0 for the same model).
Samples are kept in <out>/samples/, so a re-run scores without drawing again.

Each training run's LoRA is merged into a copy of the base (`ldm.lora.merge_lora`). Results go to
<out>/results.json, a Markdown table to stdout, a small before/after grid to --grid.

A recipe variant: `--set key=value` (repeatable) overrides the config in both training runs (the no-prior
run keeps lambda 0), `--runs` picks which of them to train and score, and `--variant NAME` puts the runs,
their samples and results.json in <out>/NAME/, while the subject, the class pictures and the base model's
samples stay in <out>, shared by all variants (so they are not drawn again).
"""
from __future__ import annotations

import colorsys
import copy
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.cli import ArgumentParser, run  # noqa: E402
from common.weights import read_metadata, write_text_atomic  # noqa: E402
from data import DataConfig, build_dataset  # noqa: E402
from data.emoji import find_emoji_font, is_held_out, open_emoji_font, render_emoji  # noqa: E402
from ldm.generation import generate_latents  # noqa: E402
from ldm.lora import merge_lora  # noqa: E402
from ldm.lora_files import read_lora  # noqa: E402
from ldm.original_format import load_model  # noqa: E402
from metrics.fid import InceptionFeatures, fid_from_statistics, statistics_of  # noqa: E402
from metrics.image_quality import psnr, ssim, to_unit_range  # noqa: E402

log = logging.getLogger("dreambooth_default")
SUBJECT = "crying cat face"  # held out (checked), of a class the model knows well: nine other cat faces
CONFIG = "configs/ldm/dreambooth-default.yaml"
INSTANCE_PROMPT, CLASS_PROMPT = "a sks cat face", "cat face"
PICTURES, SIZE = 5, 64
SAMPLING = dict(sampler="dpmpp-2m", steps=15, guidance=3.0)


def subject_emoji():
    """(Emoji, its 64 px held-out picture [3, 64, 64] in [-1, 1]) for SUBJECT, checked to be held out."""
    test = build_dataset(DataConfig(source="emoji", split="test", size=SIZE))
    index = next((i for i, e in enumerate(test.emoji) if e.name == SUBJECT), None)
    if index is None or not is_held_out(test.emoji[index].text):
        raise ValueError(f"{SUBJECT!r} is not in the emoji test split")
    return test.emoji[index], test[index]["image"]


def write_subject(folder: Path, seed: int = 0) -> list[Path]:
    """PICTURES augmented 64 px pictures of SUBJECT: a random square crop of 75-100% of the side at a
    random place, brightness / contrast / saturation x U(0.85, 1.15) and a hue turn of U(-0.04, 0.04) on the
    emoji (its white background stays white, as in the data set)."""
    emoji, _ = subject_emoji()
    full = render_emoji(open_emoji_font(find_emoji_font(None)), emoji.text, (255, 255, 255))
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(PICTURES):
        side = int(full.width * rng.uniform(0.75, 1.0))
        left, top = rng.integers(0, full.width - side + 1, size=2)
        picture = full.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.Resampling.BICUBIC,
                                                                         reducing_gap=3.0)
        jittered = picture
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            jittered = enhance(jittered).enhance(rng.uniform(0.85, 1.15))
        jittered = np.asarray(_turn_hue(jittered, rng.uniform(-0.04, 0.04)))
        white = (np.asarray(picture) == 255).all(-1, keepdims=True)  # the background stays white, as in the data
        picture = Image.fromarray(np.where(white, np.uint8(255), jittered))
        paths.append(folder / f"{k:02d}.png")
        picture.save(paths[-1])
    return paths


def _turn_hue(image: Image.Image, turn: float) -> Image.Image:
    rgb = np.asarray(image, dtype=np.float64) / 255
    hsv = np.vectorize(colorsys.rgb_to_hsv)(rgb[..., 0], rgb[..., 1], rgb[..., 2])
    turned = np.vectorize(colorsys.hsv_to_rgb)((hsv[0] + turn) % 1.0, hsv[1], hsv[2])
    return Image.fromarray((np.stack(turned, -1) * 255).round().astype(np.uint8))


def read_pictures(paths: list[Path]) -> torch.Tensor:
    """PNG files -> [N, 3, H, W] in [-1, 1]."""
    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


def train(out: Path, name: str, base: str, subject: Path, class_dir: Path, threads: int, *overrides: str) -> dict:
    """One run of CONFIG (skipped when its lora.safetensors exists); its wall time and steps."""
    run_dir = out / name
    lora = run_dir / "lora.safetensors"
    record = run_dir / "bench-run.json"
    if not lora.is_file():
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, str(ROOT / "train_stage2.py"), "--config", CONFIG, "--init-from", base,
                   f"train.output_dir={run_dir}", f"dreambooth.instance_dir={subject}",
                   f"dreambooth.class_dir={class_dir}", *overrides]
        print(" ".join(command[1:]), flush=True)
        started = time.time()
        subprocess.run(command, check=True, cwd=ROOT, env=env)
        write_text_atomic(record, json.dumps({"seconds": round(time.time() - started, 1), "command": command[1:]}))
    meta = read_metadata(lora).get("ldm_lora")
    meta = json.loads(meta) if isinstance(meta, str) else meta
    return {**json.loads(record.read_text()), "steps": meta["steps"], "lora": str(lora)}


@torch.no_grad()
def samples(model, prompt: str, n: int, batch: int = 16, first_seed: int = 0) -> torch.Tensor:
    """n images [n, 3, 64, 64] in [-1, 1] of `prompt`, image i from seed first_seed + i."""
    chunks = []
    for start in range(0, n, batch):
        count = min(batch, n - start)
        latents = generate_latents(model, [prompt] * count, seed=first_seed + start, height=SIZE, width=SIZE,
                                   **SAMPLING)
        chunks.append(model.decode_latents(latents).float().clamp(-1, 1))
    return torch.cat(chunks)


def cosine_to(features: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine similarity of feature rows [N, D] to one reference vector [D]."""
    return float(torch.nn.functional.cosine_similarity(features.double(), reference.double()[None], dim=1).mean())


def tear_share(images: torch.Tensor, min_pixels: int = 20) -> float:
    """Share of images [N, 3, H, W] in [-1, 1] with a blue tear: at least `min_pixels` clearly blue pixels.

    The tear is the subject's mark: the five subject pictures hold 26-153 such pixels, the base model's
    "cat face" samples 0 in the median. It reads what Inception features of 64 px samples blur."""
    r, g, b = to_unit_range(images).unbind(1)
    blue = (b > 0.55) & (b > r + 0.25) & (b > g + 0.1)
    return round(float((blue.flatten(1).sum(1) >= min_pixels).double().mean()), 4)


def subject_scores(images: torch.Tensor, reference: torch.Tensor, features: InceptionFeatures) -> dict:
    """PSNR / SSIM of each image to the subject's picture [3, H, W], Inception cosine (means over images), tears."""
    x, y = to_unit_range(images), to_unit_range(reference)[None].expand_as(images)
    return {"psnr": round(float(psnr(x, y).mean()), 2), "ssim": round(float(ssim(x, y).mean()), 4),
            "inception_cosine": round(cosine_to(features(images), features(reference[None])[0]), 4),
            "tear_share": tear_share(images)}


def merged(base, lora_file: str):
    model = copy.deepcopy(base)
    merge_lora(model, read_lora(lora_file, base), 1.0)
    return model.eval()


def grid(rows: dict[str, torch.Tensor], path: Path, columns: int = 6) -> None:
    """A labelled grid: one row per entry, its first `columns` images at 64 px."""
    label_w = 96
    canvas = Image.new("RGB", (label_w + SIZE * columns, SIZE * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows.items()):
        draw.text((2, r * SIZE + SIZE // 2 - 12), label, fill="black")
        pixels = ((images[:columns] + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        for c, picture in enumerate(pixels):
            canvas.paste(Image.fromarray(picture), (label_w + c * SIZE, r * SIZE))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)
    print(f"wrote {path} ({path.stat().st_size / 1000:.1f} KB)")


class Samples:
    """`samples` kept in <out>/samples/ by model, prompt, first seed and n, so a re-run scores without redrawing."""

    def __init__(self, folder: Path, n: int):
        self.folder, self.n = folder, n

    def __call__(self, name: str, model, prompt: str, first_seed: int = 0) -> torch.Tensor:
        path = self.folder / f"{name}-{prompt.replace(' ', '-')}-seed{first_seed}-n{self.n}.pt"
        if path.is_file():
            return torch.load(path, weights_only=True)
        images = samples(model, prompt, self.n, first_seed=first_seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(images, path)
        return images


RUNS = {"no-prior": ["dreambooth.prior_loss_weight=0"], "prior": []}  # each run's own overrides, after --set


def measure(args) -> None:
    torch.set_num_threads(args.threads)
    shared = args.out
    out = shared / args.variant if args.variant else shared
    subject_dir = shared / "subject"
    paths = sorted(subject_dir.glob("*.png")) or write_subject(subject_dir)
    class_dir = shared / "class_images"
    results = {"subject": SUBJECT, "n": args.n, "sampling": SAMPLING, "threads": args.threads, "set": args.set,
               "runs": {}}
    for name in args.runs:
        results["runs"][name] = train(out, name, args.base, subject_dir, class_dir, args.threads,
                                      *args.set, *RUNS[name])
    print(json.dumps(results["runs"], indent=1), flush=True)

    base = load_model(args.base).eval()
    features = InceptionFeatures(batch_size=32)
    _, reference = subject_emoji()
    subject_feature = features(reference[None])[0]
    pictures = read_pictures(paths)
    held_out = build_dataset(DataConfig(source="emoji", split="test", size=SIZE))
    held_out_stats = statistics_of([torch.stack([held_out[i]["image"] for i in range(len(held_out))])], features)
    draw = Samples(out / "samples", args.n)
    draw_base = Samples(shared / "samples", args.n)
    base_class = draw_base("base", base, CLASS_PROMPT)

    def class_scores(cls: torch.Tensor) -> dict:
        stats = statistics_of([cls], features)
        return {"class_fid_vs_held_out": round(fid_from_statistics(stats, held_out_stats), 2),
                "class_fid_vs_base_class": round(fid_from_statistics(stats, statistics_of([base_class], features)), 2),
                "class_inception_cosine_to_subject": round(cosine_to(features(cls), subject_feature), 4),
                "class_tear_share": tear_share(cls)}

    rows, shown = [], {}
    rows.append({"images": f"the {PICTURES} training pictures", **subject_scores(pictures, reference, features)})
    named = draw_base("base", base, SUBJECT)
    rows.append({"images": f"base, '{SUBJECT}'", **subject_scores(named, reference, features)})
    # No drift at all: the base's class samples from the next n seeds (the floor of 'class FID vs base's').
    rows.append({"images": f"base, seeds {args.n}-{2 * args.n - 1} (floor)",
                 **class_scores(draw_base("base", base, CLASS_PROMPT, first_seed=args.n))})
    for name in ("base", *args.runs):
        model = base if name == "base" else merged(base, results["runs"][name]["lora"])
        sampler = draw_base if name == "base" else draw
        sks, cls = sampler(name, model, INSTANCE_PROMPT), sampler(name, model, CLASS_PROMPT)
        rows.append({"images": f"{name}, '{INSTANCE_PROMPT}'", **subject_scores(sks, reference, features),
                     **class_scores(cls)})
        print(json.dumps(rows[-1]), flush=True)
        shown[f"{name}: sks"], shown[f"{name}: class"] = sks, cls
    results["rows"] = rows
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    write_text_atomic(out / "results.json", json.dumps(results, indent=1) + "\n")
    if args.grid:
        grid({"subject": pictures, **shown}, args.grid)
    print(f"\n| images (n={args.n}) | PSNR | SSIM | Inception cos | tears | class FID vs held-out "
          f"| class FID vs base's | class cos to subject | class tears |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        cells = [row.get(k, "") for k in ("psnr", "ssim", "inception_cosine", "tear_share", "class_fid_vs_held_out",
                                          "class_fid_vs_base_class", "class_inception_cosine_to_subject",
                                          "class_tear_share")]
        print(f"| {row['images']} | " + " | ".join(str(c) for c in cells) + " |")


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python bench/dreambooth_default.py", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["subject", "run"])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/dreambooth"))
    parser.add_argument("--base", default="models/default/model.safetensors")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grid", type=Path)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for both training runs, e.g. optim.lr=3e-4 (repeatable)")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--variant", help="put the runs, their samples and results.json in <out>/VARIANT/")
    args = parser.parse_args(argv)
    if args.action == "subject":
        for path in write_subject(args.out):
            print(path)
        return
    measure(args)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    run(lambda: main(sys.argv[1:]))
