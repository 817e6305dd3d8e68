"""Inpainting quality against RePaint's resampling (issue 24): what the jumps buy, and at what cost.

    python bench/inpainting_sweep.py --checkpoint models/default/shapes.safetensors --data shapes --n 384 \
        --mask right --cfg 2 --settings "ddpm:50;ddpm:50:10:5;ddpm:20:5:5;ddpm:80" --out runs/bench/inpaint-shapes.json

For n held-out images of the data's test split, a fixed mask (--mask: the right half, or the centre
square of half the side) is repainted from the image's own caption. A setting is
`sampler:steps[:jump:resamples]` (RePaint's jump length and its r, the `repaint_jump` and
`repaint_resamples` options); without the last two it is plain inpainting (the known part re-noised
before every step). Each setting, and first the autoencoder's round trip of the originals (nothing
repainted: the ceiling every setting shares), is scored on the decoded outputs, as a user gets them:

  fid          against the n originals (they share the kept part, so this is lower than a
               text-to-image FID: compare the settings with each other);
  hole_psnr    PSNR (dB, pixels in [0, 1]) of the repainted region against the original: on shapes the
               caption pins the scene down (shape, colour, size, cell), so the original is nearly the
               only right answer;
  kept_psnr    PSNR of the kept region: the round trip, plus what repainting bleeds into it;
  shapes       the shapes judge's adherence to the caption (shapes only);
  model_evaluations  U-Net calls per image (guidance batches both halves into one call).

Image i is drawn with seed + i. Results go to --out as JSON after every setting; settings already in
it are skipped, so an interrupted sweep continues. A markdown table goes to stdout and beside --out.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import ArgumentParser, run  # noqa: E402
from common.weights import file_sha256, write_text_atomic  # noqa: E402
from data import build_dataset  # noqa: E402
from ldm.generation import generate_latents  # noqa: E402
from ldm.latent_diffusion import LatentDiffusion  # noqa: E402
from ldm.sampling_options import SamplingOptions  # noqa: E402
from ldm.samplers import SAMPLERS, samplers_with  # noqa: E402
from metrics.eval_data import data_config, iterate_batches, subset_size  # noqa: E402
from metrics.fid import FeatureStatistics, InceptionFeatures, fid_from_statistics  # noqa: E402
from metrics.shapes_judge import ShapesJudge, adherence  # noqa: E402

log = logging.getLogger("inpainting_sweep")
ROUND_TRIP = "autoencoder round trip"
Setting = tuple[str, int, int, int]  # sampler, steps, jump, resamples (1 = no RePaint)


def parse_settings(text: str) -> list[Setting]:
    """"ddpm:50;ddim:20:5:5" -> [("ddpm", 50, 1, 1), ("ddim", 20, 5, 5)]."""
    settings: list[Setting] = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        fields = [f.strip() for f in part.split(":")]
        if fields[0] not in SAMPLERS:
            raise ValueError(f"--settings: unknown sampler {fields[0]!r} in {part!r}")
        if len(fields) not in (2, 4) or not all(f.isdigit() and int(f) >= 1 for f in fields[1:]):
            raise ValueError(f"--settings: {part!r} is not sampler:steps or sampler:steps:jump:resamples "
                             f"with positive integers")
        steps, jump, resamples = (int(f) for f in (*fields[1:], "1", "1")[:3])
        if resamples > 1 and fields[0] not in samplers_with("resampling"):
            raise ValueError(f"--settings: RePaint ({part!r}) needs one of {', '.join(samplers_with('resampling'))}")
        settings.append((fields[0], steps, jump, resamples))
    if not settings:
        raise ValueError(f"--settings {text!r} lists no settings; write e.g. 'ddpm:50;ddpm:20:5:5'")
    return settings


def label(setting: Setting | None) -> str:
    """A setting's row name; None is the autoencoder's round trip."""
    if setting is None:
        return ROUND_TRIP
    sampler, steps, jump, resamples = setting
    return f"{sampler} {steps}" + (f", jump {jump} x {resamples}" if resamples > 1 else "")


def make_mask(kind: str, size: int) -> torch.Tensor:
    """[1, 1, size, size], 1 = repaint: the right half, or the centre square of half the side."""
    mask = torch.zeros(1, 1, size, size)
    if kind == "right":
        mask[..., size // 2:] = 1
    elif kind == "center":
        mask[..., size // 4:size - size // 4, size // 4:size - size // 4] = 1
    else:
        raise ValueError(f"--mask {kind!r}: expected right or center")
    return mask


def region_psnr(x: torch.Tensor, y: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """PSNR [N] (dB) of images x, y [N, 3, H, W] in [-1, 1] over the pixels where region [1, 1, H, W] is 1."""
    squared = ((x.double() - y.double()) / 2).pow(2) * region  # /2: pixels in [0, 1]
    return 10 * torch.log10(region.sum() * x.shape[1] / squared.flatten(1).sum(1))


class InpaintingBench:
    """The held-out originals, their captions and Inception statistics, computed once for every setting."""

    def __init__(self, model: LatentDiffusion, data: str, n: int, mask: str, batch_size: int, seed: int,
                 device: str, size: int):
        self.model, self.seed, self.device, self.size = model.eval(), seed, device, size
        test_set = build_dataset(data_config(data, self.size, "test"))
        self.batches = list(iterate_batches(test_set, subset_size(test_set, n), batch_size, seed))
        self.n = sum(len(b.images) for b in self.batches)
        self.mask = make_mask(mask, self.size)
        self.features = InceptionFeatures(device, batch_size=batch_size)
        self.judge = ShapesJudge.load(device=device) if test_set.cfg.source == "shapes" else None
        self.originals = FeatureStatistics()
        for batch in tqdm(self.batches, desc="originals", leave=False):
            self.originals.update(self.features(batch.images))

    def run(self, setting: Setting | None, guidance: float) -> dict:
        """Repaint the n images with `setting` (None: the autoencoder's round trip) and score them."""
        stats, predicted, wanted, hole, kept, calls = FeatureStatistics(), [], [], [], [], [0]
        hook = self.model.unet.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        started, cpu = time.time(), time.process_time()
        try:
            first = 0
            for batch in tqdm(self.batches, desc=label(setting), leave=False):
                images = batch.images.to(self.device)
                if setting is None:
                    latents = self.model.encode_images(images, sample=False)
                else:
                    sampler, steps, jump, resamples = setting
                    options = SamplingOptions(sampler=sampler, steps=steps, guidance=guidance, seed=self.seed + first,
                                              height=self.size, width=self.size, repaint_jump=jump,
                                              repaint_resamples=resamples)
                    latents = generate_latents(self.model, batch.captions, options, init_image=images,
                                               mask=self.mask.expand(len(images), -1, -1, -1))
                out = self.model.decode_latents(latents).float().clamp(-1, 1).cpu()
                stats.update(self.features(out))
                hole.append(region_psnr(out, batch.images, self.mask))
                kept.append(region_psnr(out, batch.images, 1 - self.mask))
                if self.judge is not None:
                    predicted += self.judge.predict(out)
                    wanted += batch.labels
                first += len(images)
        finally:
            hook.remove()
        return {"setting": label(setting), "guidance": guidance,
                "model_evaluations": calls[0] / len(self.batches) if setting else 0,
                "fid": fid_from_statistics(stats, self.originals),
                "hole_psnr": float(torch.cat(hole).mean()), "kept_psnr": float(torch.cat(kept).mean()),
                "shapes": adherence(predicted, wanted) if self.judge is not None else None,
                "seconds": {"cpu": round(time.process_time() - cpu, 1), "wall": round(time.time() - started, 1)}}


def markdown(results: list[dict]) -> str:
    shapes = any(r["shapes"] for r in results)
    header = ["setting", "evaluations", "FID", "hole PSNR", "kept PSNR"]
    header += ["shape", "colour", "position", "all correct"] if shapes else []
    header += ["CPU s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [r["setting"], f"{r['model_evaluations']:g}", f"{r['fid']:.2f}", f"{r['hole_psnr']:.2f}",
                 f"{r['kept_psnr']:.2f}"]
        if shapes:
            cells += [f"{100 * r['shapes'][k]:.1f}%" for k in ("shape", "color", "position", "all_attributes")]
        lines.append("| " + " | ".join(cells + [f"{r['seconds']['cpu']:.0f}"]) + " |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="model.safetensors")
    parser.add_argument("--data", required=True, help="shapes, emoji, fashion-mnist, or a folder / shard pattern")
    parser.add_argument("--n", type=int, default=192, help="held-out images (default 192)")
    parser.add_argument("--mask", default="right", choices=["right", "center"])
    parser.add_argument("--settings", default="ddpm:50;ddpm:50:10:5;ddpm:20:5:5;ddpm:80",
                        help="sampler:steps[:jump:resamples];... (default: plain 50, RePaint 50 / 10 x 5, "
                             "RePaint 20 / 5 x 5, plain 80 at RePaint 20's cost)")
    parser.add_argument("--cfg", type=float, default=3.0, help="guidance scale (default 3)")
    parser.add_argument("--size", type=int, help="image side (default: the model's training size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True, help="results JSON (the table goes beside it as .md)")
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = parse_settings(args.settings)
    if not args.checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    identity = {"checkpoint": str(args.checkpoint), "sha256": file_sha256(args.checkpoint)[:12], "data": args.data,
                "n": args.n, "size": args.size, "mask": args.mask, "cfg": args.cfg, "seed": args.seed,
                "batch_size": args.batch_size}
    results: list[dict] = []
    if args.out.is_file():
        saved = json.loads(args.out.read_text(encoding="utf-8"))
        if saved.get("config") != identity:
            raise ValueError(f"--out {args.out} holds another sweep ({saved.get('config')}); pass another --out")
        results = saved["results"]
    finished = {r["setting"] for r in results}
    todo = [s for s in [None, *settings] if label(s) not in finished]
    if todo:
        model = LatentDiffusion.load(args.checkpoint, device=args.device)
        bench = InpaintingBench(model, args.data, args.n, args.mask, args.batch_size, args.seed, args.device,
                                args.size or model.default_image_size)
    for setting in todo:
        with torch.inference_mode():
            results.append(bench.run(setting, args.cfg))
        log.info("%s: FID %.2f, hole PSNR %.2f dB (%.0f s)", results[-1]["setting"], results[-1]["fid"],
                 results[-1]["hole_psnr"], results[-1]["seconds"]["wall"])
        write_text_atomic(args.out, json.dumps({"config": identity, "results": results}, indent=2) + "\n")
    text = markdown(results)
    print(text)
    write_text_atomic(args.out.with_suffix(".md"), text)
    return results


if __name__ == "__main__":
    run(main)
