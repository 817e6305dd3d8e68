"""Evaluate a text-to-image model on held-out captions.

    python -m ldm.evaluate --checkpoint model.safetensors --data shapes [--n 500] [--sampler ddim]
        [--steps 50] [--cfg 5] [--seed 0] [--out results.json]

For n captions of the data's test split (or the prompts of --prompts), generates one image each
and reports, as JSON:

  fid             generated images vs the n held-out images of those captions;
  fid_data_floor  n train-split images (or --train-data) vs the same held-out images: what a
                  perfect model of the training data would score with this many images (FID is
                  biased upwards at small n, so compare fid with this floor, not with zero);
  shapes          per-attribute prompt adherence from metrics.shapes_judge (data "shapes" only);
  clip_score      mean CLIP score when open_clip weights are available (else null and a note).

Image i is generated with seed + i, so results do not depend on --batch-size.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from data import build_dataset
from ldm.generation import SAMPLERS, generate_latents
from ldm.latent_diffusion import LatentDiffusion
from metrics.clip_score import DEFAULT_ARCH, DEFAULT_WEIGHTS, try_load_clip_scorer
from metrics.eval_data import data_config, iterate_batches, subset_size
from metrics.fid import FeatureStatistics, InceptionFeatures, fid_from_statistics
from metrics.shapes_judge import ShapesJudge, adherence, parse_shapes_prompt
from training.cli import run

log = logging.getLogger("ldm.evaluate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ldm.evaluate",
                                     description="FID, data floor, prompt adherence and CLIP score of a stage-2 model.")
    parser.add_argument("--checkpoint", required=True, help="model.safetensors written by train_stage2.py")
    parser.add_argument("--data", required=True,
                        help="source name (shapes, emoji, fashion-mnist) or folder / shard pattern")
    parser.add_argument("--train-data", help="training images for the data floor when they are not --data's train "
                                              "split (needed for webdataset shards, which have no splits)")
    parser.add_argument("--prompts", type=Path, help="text file, one prompt per line, used (cyclically) instead of "
                                                     "the held-out captions")
    parser.add_argument("--n", type=int, default=500, help="images per set (default 500)")
    parser.add_argument("--size", type=int, help="image size (default: from the model config, else 64)")
    parser.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clip-arch", default=DEFAULT_ARCH)
    parser.add_argument("--clip-weights", default=DEFAULT_WEIGHTS, help="open_clip tag (must be cached) or file")
    parser.add_argument("--no-clip", action="store_true", help="skip the CLIP score")
    parser.add_argument("--save-images", type=Path, help="also write the generated images as PNGs here")
    parser.add_argument("--out", type=Path, default=Path("results.json"))
    return parser


def _image_size(model: LatentDiffusion, requested: int | None) -> int:
    if requested:
        return requested
    if model.cfg.unet.image_size:
        return model.cfg.unet.image_size * model.latent_factor
    return 64


def _read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"--prompts file not found: {path}")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts file {path} holds no prompts")
    return prompts


def _save_pngs(images: torch.Tensor, directory: Path, first_index: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    for offset, picture in enumerate(pixels):
        Image.fromarray(picture).save(directory / f"{first_index + offset:05d}.png")


def evaluate(args: argparse.Namespace) -> dict:
    """Run the evaluation `args` describes (see `build_parser`) and return the results dict."""
    for name in ("n", "steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    model = LatentDiffusion.load(args.checkpoint, device=args.device)
    size = _image_size(model, args.size)
    test_set = build_dataset(data_config(args.data, size, "test"))
    train_set, floor_note = None, None
    if test_set.cfg.source == "webdataset" and not args.train_data:
        floor_note = "skipped: webdataset shards have no train/test split; pass the training shards as --train-data"
        log.warning("data floor %s", floor_note)
    else:
        train_set = build_dataset(data_config(args.train_data or args.data, size, "train"))
    n = min(subset_size(test_set, args.n), subset_size(train_set, args.n) if train_set is not None else args.n)
    override = _read_prompts(args.prompts) if args.prompts else None
    shapes = test_set.cfg.source == "shapes"
    if override and shapes:
        for prompt in override:
            parse_shapes_prompt(prompt)  # fail before generating, not after

    features = InceptionFeatures(args.device, batch_size=args.batch_size)
    judge = ShapesJudge.load(device=args.device) if shapes else None
    clip, clip_note = (None, "skipped (--no-clip)") if args.no_clip else try_load_clip_scorer(
        args.clip_arch, args.clip_weights, args.device)
    if clip_note:
        log.warning("CLIP score not computed: %s", clip_note)

    generated, held_out, train_images = FeatureStatistics(), FeatureStatistics(), FeatureStatistics()
    predicted, requested, clip_scores = [], [], []
    prompt_cycle = itertools.cycle(override) if override else None
    started = time.time()
    count = 0
    total_batches = math.ceil(n / args.batch_size)
    for index, batch in enumerate(iterate_batches(test_set, n, args.batch_size, args.seed)):
        prompts = [next(prompt_cycle) for _ in batch.captions] if prompt_cycle else batch.captions
        latents = generate_latents(model, prompts, seed=args.seed + count, sampler=args.sampler, steps=args.steps,
                                   guidance=args.cfg, height=size, width=size)
        images = model.decode_latents(latents).float().clamp(-1, 1).cpu()
        generated.update(features(images))
        held_out.update(features(batch.images))
        if judge is not None:
            predicted += judge.predict(images)
            requested += [parse_shapes_prompt(p) for p in prompts] if override else batch.labels
        if clip is not None:
            clip_scores.append(clip.scores(images, prompts))
        if args.save_images:
            _save_pngs(images, args.save_images, count)
        count += len(prompts)
        log.info("batch %d/%d: %d images (%.0f s)", index + 1, total_batches, count, time.time() - started)
    generation_seconds = time.time() - started
    if train_set is not None:
        for batch in iterate_batches(train_set, n, args.batch_size, args.seed):
            train_images.update(features(batch.images))

    return {
        "checkpoint": str(args.checkpoint),
        "data": args.data,
        "train_data": args.train_data or args.data,
        "prompts": str(args.prompts) if args.prompts else "held-out captions (test split)",
        "n": count,
        "size": size,
        "sampler": args.sampler,
        "steps": args.steps,
        "cfg": args.cfg,
        "seed": args.seed,
        "fid": fid_from_statistics(generated, held_out),
        "fid_data_floor": fid_from_statistics(train_images, held_out) if train_set is not None else None,
        "fid_data_floor_note": floor_note,
        "shapes": adherence(predicted, requested) if judge is not None else None,
        "clip_score": float(torch.cat(clip_scores).mean()) if clip is not None else None,
        "clip_note": clip_note,
        "seconds": {"generation_and_features": round(generation_seconds, 1),
                    "total": round(time.time() - started, 1)},
    }


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    results = evaluate(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in results.items() if k in ("n", "fid", "fid_data_floor", "shapes", "clip_score")},
                     indent=2))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    run(main)
