"""Evaluate a text-to-image model on held-out captions.

    python -m ldm.evaluate --checkpoint model.safetensors --data shapes [--n 500] [--sampler dpmpp-2m]
        [--steps 25] [--cfg 3] [--seed 0] [--out results.json]

For n captions of the data's test split (or the prompts of --prompts), generates one image each
and reports, as JSON:

  fid             generated images vs the n held-out images of those captions;
  fid_data_floor  n train-split images (or --train-data) vs the same held-out images: what a
                  perfect model of the training data would score with this many images (FID is
                  biased upwards at small n, so compare fid with this floor, not with zero);
  shapes          per-attribute prompt adherence from metrics.shapes_judge (data "shapes" only);
  clip_score      mean CLIP score when open_clip weights are available (else null and a note);
  model_evaluations  U-Net calls per image (one per evaluation: guidance batches both halves).

Image i is generated with seed + i, so results do not depend on --batch-size. The sampling defaults
are generate.py's (DPM-Solver++ 2M, 25 steps, guidance 3), so the numbers describe what it draws. A
progress bar per phase (held-out references, data floor, generation) counts images on stderr.

In Python, `Evaluator` scores many settings (samplers, step counts, guidance scales, checkpoints
of one architecture) against references it computes once; bench/quality_sweep.py drives it.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from data import build_dataset
from ldm.diffusion import Diffusion
from ldm.generation import SAMPLERS, SizeLimits, generate_latents, read_prompt_lines
from ldm.latent_diffusion import LatentDiffusion
from ldm.sampling_options import MAX_SEED, OptionError, SamplingOptions
from metrics.clip_score import DEFAULT_ARCH, DEFAULT_WEIGHTS, try_load_clip_scorer
from metrics.eval_data import data_config, iterate_batches, subset_size
from metrics.fid import FeatureStatistics, InceptionFeatures, fid_from_statistics
from metrics.shapes_judge import ShapesJudge, adherence, parse_shapes_prompt
from common.weights import write_text_atomic
from common.cli import ArgumentParser, check_output_file, check_output_folder, run

log = logging.getLogger("ldm.evaluate")
HELD_OUT_CAPTIONS = "held-out captions (test split)"
# The flag of each sampling setting the command line sets, so that an error names what the user typed.
FLAGS = {"sampler": "--sampler", "steps": "--steps", "guidance": "--cfg", "seed": "--seed", "height": "--size",
         "width": "--size"}
# generate.py's documented defaults (a script, so not importable from here; tests/test_evaluate.py checks
# that both command lines agree).
DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_GUIDANCE = "dpmpp-2m", 25, 3.0


class Evaluator:
    """Scores generation settings of a model against references computed once.

    The held-out subset (its images' Inception statistics, captions and labels) and the data floor
    are computed on first use and shared by every `run`, so a sweep pays for them once; `run` then
    generates the n images of one setting and scores them. `set_model` swaps in another model (e.g.
    an earlier training checkpoint) that is scored against the same references.

    Args:
        model: a `LatentDiffusion` already on `device` (put in eval mode).
        data: source name (shapes, emoji, fashion-mnist) or folder / shard pattern; its test split
            gives the held-out images and captions.
        n: images per set (capped at the data set's size).
        seed: picks the held-out and train subsets; image i is generated with seed + i.
        size: image side in pixels (default: the model's training size, else 64).
        prompts: used cyclically instead of the held-out captions: a list, or a text file with one
            prompt per line.
        train_data: training images for the data floor when they are not `data`'s train split.
        clip: (open_clip architecture, weights tag or file) for the CLIP score, or None to skip it.
        checkpoint: the name results give the model, e.g. its file.
    """

    def __init__(self, model: LatentDiffusion, data: str, *, n: int = 500, batch_size: int = 16, seed: int = 0,
                 device: str | torch.device = "cpu", size: int | None = None,
                 prompts: Sequence[str] | Path | None = None, train_data: str | None = None,
                 clip: tuple[str, str] | None = (DEFAULT_ARCH, DEFAULT_WEIGHTS), checkpoint: str | None = None):
        for name, value in (("n", n), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        self.model, self.checkpoint = model.eval(), checkpoint
        self.data, self.train_data, self.seed, self.batch_size = data, train_data, seed, batch_size
        self.size = _image_size(model, size)
        self.test_set = build_dataset(data_config(data, self.size, "test"))
        self.train_set, self.floor_note = None, None
        if self.test_set.cfg.source == "webdataset" and not train_data:
            self.floor_note = ("skipped: webdataset shards have no train/test split; "
                               "pass the training shards as --train-data")
            log.warning("data floor %s", self.floor_note)
        else:
            self.train_set = build_dataset(data_config(train_data or data, self.size, "train"))
        self.n = min(subset_size(self.test_set, n),
                     subset_size(self.train_set, n) if self.train_set is not None else n)
        if isinstance(prompts, (str, Path)):
            self.prompts_source, self.override = str(prompts), read_prompt_lines(prompts, "--prompts file")
        elif prompts is not None:
            self.override = [str(p) for p in prompts]
            if not self.override:
                raise ValueError("prompts: the list is empty")
            self.prompts_source = f"{len(self.override)} given prompts"
        else:
            self.prompts_source, self.override = HELD_OUT_CAPTIONS, None
        shapes = self.test_set.cfg.source == "shapes"
        if self.override and shapes:
            for prompt in self.override:
                parse_shapes_prompt(prompt)  # fail before generating, not after

        self.features = InceptionFeatures(device, batch_size=batch_size)
        self.judge = ShapesJudge.load(device=device) if shapes else None
        self.clip, self.clip_note = (None, "skipped (--no-clip)") if clip is None else try_load_clip_scorer(
            *clip, device)
        if self.clip_note:
            log.warning("CLIP score not computed: %s", self.clip_note)
        self._held_out: FeatureStatistics | None = None
        self._floor: float | None = None
        self.prompt_list: list[str] = []  # the prompt of image i, once the references exist
        self.requested: list[dict] | None = None  # shapes labels the prompts ask for

    def set_model(self, model: LatentDiffusion, checkpoint: str | None = None) -> None:
        """Score `model` (same image size and data) from now on, against the same references."""
        self.model, self.checkpoint = model.eval(), checkpoint

    def held_out_statistics(self) -> FeatureStatistics:
        """Inception statistics of the n held-out images; computed on first call (also fixes the prompts)."""
        if self._held_out is None:
            started, stats, captions, labels = time.time(), FeatureStatistics(), [], []
            for batch in self._counted(iterate_batches(self.test_set, self.n, self.batch_size, self.seed),
                                       "held-out references"):
                stats.update(self.features(batch.images))
                captions += batch.captions
                labels += batch.labels or []
            self.n = stats.count  # an iterable data set may run out early
            self.prompt_list = ([self.override[i % len(self.override)] for i in range(self.n)]
                                if self.override else captions)
            if self.judge is not None:
                self.requested = [parse_shapes_prompt(p) for p in self.prompt_list] if self.override else labels
            self._held_out = stats
            log.info("held-out references: %d images (%.0f s)", self.n, time.time() - started)
        return self._held_out

    def data_floor(self) -> float | None:
        """FID of n training images against the held-out ones (None without a training set); cached."""
        if self._floor is None and self.train_set is not None:
            held_out, train_images = self.held_out_statistics(), FeatureStatistics()
            for batch in self._counted(iterate_batches(self.train_set, self.n, self.batch_size, self.seed),
                                       "data floor"):
                train_images.update(self.features(batch.images))
            self._floor = fid_from_statistics(train_images, held_out)
            log.info("data floor: FID %.2f at n=%d", self._floor, self.n)
        return self._floor

    def _counted(self, batches, phase: str):
        """Yield `batches` (with `.images`) while a bar on stderr counts their images up to n."""
        with tqdm(total=self.n, desc=phase, unit="image", dynamic_ncols=True, leave=False) as bar:
            for batch in batches:
                yield batch
                bar.update(len(batch.images))

    def run(self, sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS, cfg: float = DEFAULT_GUIDANCE,
            eta: float = 0.0, save_images: Path | None = None) -> dict:
        """Generate the n images of one setting and score them; returns the results dict (module docstring)."""
        options = SamplingOptions(sampler=sampler, steps=steps, guidance=cfg, eta=eta, height=self.size, width=self.size)
        started = time.time()
        held_out, floor = self.held_out_statistics(), self.data_floor()
        generated, predicted, clip_scores = FeatureStatistics(), [], []
        unet_calls, sampling_cpu = [0], 0.0
        hook = self.model.unet.register_forward_hook(lambda *_: unet_calls.__setitem__(0, unet_calls[0] + 1))
        generation_started = time.time()
        total_batches = math.ceil(self.n / self.batch_size)
        bar = tqdm(total=self.n, desc=f"{sampler} {steps} steps, cfg {cfg:g}", unit="image", dynamic_ncols=True,
                   leave=False)
        try:
            for first in range(0, self.n, self.batch_size):
                prompts = self.prompt_list[first:first + self.batch_size]
                cpu = time.process_time()
                latents = generate_latents(self.model, prompts, options, seed=self.seed + first)
                sampling_cpu += time.process_time() - cpu
                images = self.model.decode_latents(latents).float().clamp(-1, 1).cpu()
                generated.update(self.features(images))
                if self.judge is not None:
                    predicted += self.judge.predict(images)
                if self.clip is not None:
                    clip_scores.append(self.clip.scores(images, prompts))
                if save_images:
                    _save_pngs(images, save_images, first)
                bar.update(len(prompts))
        finally:
            bar.close()
            hook.remove()
        log.info("%s %d steps, cfg %g: %d images generated and scored (%.0f s)", sampler, steps, cfg, self.n,
                 time.time() - generation_started)
        generation_seconds = time.time() - generation_started

        return {
            "checkpoint": self.checkpoint,
            "data": self.data,
            "train_data": self.train_data or self.data,
            "prompts": self.prompts_source,
            "n": self.n,
            "size": self.size,
            "sampler": sampler,
            "steps": steps,
            "cfg": cfg,
            "eta": eta,
            "seed": self.seed,
            "model_evaluations": _per_batch(unet_calls[0], total_batches),
            "fid": fid_from_statistics(generated, held_out),
            "fid_data_floor": floor,
            "fid_data_floor_note": self.floor_note,
            "shapes": adherence(predicted, self.requested) if self.judge is not None else None,
            "clip_score": float(torch.cat(clip_scores).mean()) if self.clip is not None else None,
            "clip_note": self.clip_note,
            "seconds": {"sampling_cpu": round(sampling_cpu, 1),
                        "generation_and_features": round(generation_seconds, 1),
                        "total": round(time.time() - started, 1)},
        }


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m ldm.evaluate",
                            description="FID, data floor, prompt adherence and CLIP score of a stage-2 model.")
    parser.add_argument("--checkpoint", required=True, help="model.safetensors written by train_stage2.py")
    parser.add_argument("--data", required=True,
                        help="source name (shapes, emoji, fashion-mnist) or folder / shard pattern")
    parser.add_argument("--train-data", help="training images for the data floor when they are not --data's train "
                                              "split (needed for webdataset shards, which have no splits)")
    parser.add_argument("--prompts", type=Path, help="text file, one prompt per line, used (cyclically) instead of "
                                                     "the held-out captions")
    parser.add_argument("--n", type=int, default=500, help="images per set, at least 2 (default 500)")
    parser.add_argument("--size", type=int, help="image size, a multiple of the model's downsampling up to 8x its "
                                                 "training size (default: from the model config, else 64)")
    parser.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=sorted(SAMPLERS),
                        help=f"(default {DEFAULT_SAMPLER}, as generate.py)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"(default {DEFAULT_STEPS}, as generate.py)")
    parser.add_argument("--cfg", type=float, default=DEFAULT_GUIDANCE,
                        help=f"classifier-free guidance scale (default {DEFAULT_GUIDANCE:g}, as generate.py)")
    parser.add_argument("--seed", type=int, default=0, help="0 .. 2**64 - 1; image i uses --seed + i")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--clip-arch", default=DEFAULT_ARCH)
    parser.add_argument("--clip-weights", default=DEFAULT_WEIGHTS, help="open_clip tag (must be cached) or file")
    parser.add_argument("--no-clip", action="store_true", help="skip the CLIP score")
    parser.add_argument("--save-images", type=Path, help="also write the generated images as PNGs here")
    parser.add_argument("--out", type=Path, default=Path("results.json"))
    return parser


def _per_batch(count: int, batches: int) -> int | float:
    per_batch = count / batches
    return int(per_batch) if per_batch.is_integer() else per_batch


def _image_size(model: LatentDiffusion, requested: int | None) -> int:
    if requested:
        return requested
    return _default_size(model.cfg.unet.image_size, model.latent_factor)


def _default_size(latent_size: int | None, latent_factor: int) -> int:
    """The model's training size (its U-Net's image_size in latent pixels), else 64."""
    return latent_size * latent_factor if latent_size else 64


def _save_pngs(images: torch.Tensor, directory: Path, first_index: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    for offset, picture in enumerate(pixels):
        Image.fromarray(picture).save(directory / f"{first_index + offset:05d}.png")


def check_args(args: argparse.Namespace) -> int:
    """Everything about the command line that can be checked before the model, data and Inception load;
    returns the image size. Each problem is a one-line error naming its flag."""
    if args.n < 2:
        raise ValueError(f"--n must be at least 2 (FID needs a covariance), got {args.n}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if args.size is not None and args.size < 1:
        raise ValueError(f"--size must be positive, got {args.size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device available")
    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    check_output_file(args.out, "--out")
    if args.save_images:
        check_output_folder(args.save_images, "--save-images")
    if args.prompts:
        read_prompt_lines(args.prompts, "--prompts file")
    data_config(args.data, args.size or 64, "test")  # an unknown source or a missing folder
    cfg, autoencoder_cfg, _ = LatentDiffusion.read_configs(args.checkpoint)
    limits = SizeLimits.of(cfg, autoencoder_cfg)
    size = args.size or _default_size(cfg.unet.image_size, limits.latent_factor)
    limits.check(size, "--size")
    try:
        options = SamplingOptions(sampler=args.sampler, steps=args.steps, guidance=args.cfg, seed=args.seed,
                                  height=size, width=size)
        options.resolve(Diffusion.from_config(cfg.diffusion).schedule)
    except OptionError as e:
        raise e.for_flags(FLAGS) from None
    if args.seed + args.n - 1 > MAX_SEED:
        raise ValueError(f"--seed {args.seed} with --n {args.n}: the last image's seed would be past 2**64 - 1")
    return size


def evaluate(args: argparse.Namespace) -> dict:
    """Run the evaluation `args` describes (see `build_parser`) and return the results dict."""
    size = check_args(args)
    model = LatentDiffusion.load(args.checkpoint, device=args.device)
    evaluator = Evaluator(model, args.data, n=args.n, batch_size=args.batch_size, seed=args.seed, device=args.device,
                          size=size, prompts=args.prompts, train_data=args.train_data,
                          clip=None if args.no_clip else (args.clip_arch, args.clip_weights),
                          checkpoint=str(args.checkpoint))
    return evaluator.run(args.sampler, args.steps, args.cfg, save_images=args.save_images)


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    results = evaluate(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k in ("n", "fid", "fid_data_floor", "shapes", "clip_score")},
                     indent=2))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    run(main)
