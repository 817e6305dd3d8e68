"""Quality of bf16 inference on the shipped default models (issue 23 item 1; bench/RESULTS.md).

    HF_HUB_OFFLINE=1 python bench/dtype_quality.py --n 192 --threads 1 --out runs/bench/dtype-quality.json
    HF_HUB_OFFLINE=1 python bench/dtype_quality.py --data shapes --n 384 --threads 2 \
        --out runs/bench/dtype-quality-shapes.json

With `ldm.evaluate.Evaluator` (the data's held-out captions, DPM-Solver++ 2M, 15 steps, image i from seed + i;
guidance 3 on emoji, 2 on shapes as the shapes model's sweep chose), against the same n held-out references;
on shapes also the judge's per-attribute adherence:

  fp32 / bf16   the model as loaded, and with its U-Net cast to bf16 as `Pipeline(dtype="bf16")` casts it
                (`ldm.precision.cast_for_inference`), both from seed 0: the same starting noise;
  fp32 seed S   the float32 model from other seeds (--noise-seeds): how much FID (and adherence) moves
                with the seeds alone at this n, the noise a dtype's figures are judged against.

Then per image, the fp32 and bf16 images of the same seed (0-255): largest |difference| (its median,
90th percentile and largest over the n images) and mean |difference|; and the autoencoder's decode in
bf16 and fp16 against float32 on the fp32 run's first --decode-images latents (PSNR, largest
|difference|), the figures behind keeping the autoencoder in float32 (ldm/precision.py).

A quality run, not a timing run: its seconds say nothing about speed (bench/dtype_speed.py does).
"""
from __future__ import annotations

import copy
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import ArgumentParser, run  # noqa: E402
from common.weights import write_text_atomic  # noqa: E402
from ldm.evaluate import Evaluator  # noqa: E402
from ldm.generation import generate_latents  # noqa: E402
from ldm.original_format import load_model  # noqa: E402
from ldm.precision import cast_for_inference  # noqa: E402
from ldm.sampling_options import SamplingOptions  # noqa: E402

from demo import SHAPES_GUIDANCE  # noqa: E402

# The shipped model of each data set and the guidance its sweep chose (models/default/RECIPE.md).
DEFAULTS = {"emoji": {"checkpoint": "models/default/model.safetensors", "cfg": 3.0},
            "shapes": {"checkpoint": "models/default/shapes.safetensors", "cfg": SHAPES_GUIDANCE}}


def read_pngs(folder: Path, n: int) -> np.ndarray:
    """The Evaluator's saved images 00000.png ... as [n, H, W, 3] int16."""
    paths = sorted(folder.glob("*.png"))[:n]
    return np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in paths])


def image_differences(fp32: np.ndarray, bf16: np.ndarray) -> dict:
    """Per-image largest and mean |difference| (0-255) of images at the same seeds."""
    difference = np.abs(fp32 - bf16).reshape(len(fp32), -1)
    largest = difference.max(axis=1)
    return {"images": len(fp32), "max_diff_median": float(np.median(largest)),
            "max_diff_p90": float(np.percentile(largest, 90)), "max_diff_largest": int(largest.max()),
            "mean_diff": round(float(difference.mean()), 3),
            "max_diff_histogram": {str(k): int(v) for k, v in zip(*np.unique(largest, return_counts=True))}}


@torch.no_grad()
def decode_check(model, prompts: list[str], options: SamplingOptions) -> dict:
    """The autoencoder decoding float32 latents in bf16 / fp16 against its float32 decode (0-255)."""
    latents = generate_latents(model, prompts, options, seed=0)

    def to_uint8(images: torch.Tensor) -> torch.Tensor:
        return ((images.float().clamp(-1, 1) + 1) * 127.5).round()

    reference = to_uint8(model.decode_latents(latents))
    rows = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        low = copy.deepcopy(model.autoencoder).to(dtype)
        images = to_uint8(low.decode_latents((latents / model.scale_factor).to(dtype)))
        mse = ((images - reference) ** 2).flatten(1).mean(1)
        psnr = 10 * torch.log10(255**2 / mse)
        rows[name] = {"images": len(prompts), "psnr_mean_db": round(float(psnr.mean()), 1),
                      "psnr_min_db": round(float(psnr.min()), 1),
                      "max_diff_largest": int((images - reference).abs().max())}
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python bench/dtype_quality.py", description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=sorted(DEFAULTS), default="emoji")
    parser.add_argument("--checkpoint", help="default: the shipped model of --data")
    parser.add_argument("--n", type=int, default=192)
    parser.add_argument("--sampler", default="dpmpp-2m")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--cfg", type=float, help="default: the guidance shipped for --data")
    parser.add_argument("--noise-seeds", type=int, nargs="*", default=[10000, 20000],
                        help="seeds of the extra fp32 runs that measure the seed-to-seed FID noise")
    parser.add_argument("--decode-images", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/dtype-quality.json"))
    args = parser.parse_args(argv)
    args.checkpoint = args.checkpoint or DEFAULTS[args.data]["checkpoint"]
    args.cfg = DEFAULTS[args.data]["cfg"] if args.cfg is None else args.cfg
    torch.set_num_threads(args.threads)

    fp32 = load_model(args.checkpoint).eval()
    bf16 = copy.deepcopy(fp32)
    cast_for_inference([bf16.unet], torch.bfloat16)
    options = dict(sampler=args.sampler, steps=args.steps, cfg=args.cfg)
    results = {"data": args.data, "checkpoint": args.checkpoint, "n": args.n, **options, "threads": args.threads,
               "rows": []}
    evaluator = Evaluator(fp32, args.data, n=args.n, clip=None, checkpoint=args.checkpoint)
    started = time.time()
    with tempfile.TemporaryDirectory() as folder:
        saved = {}
        for name, model, seed in [("fp32", fp32, 0), ("bf16", bf16, 0),
                                  *((f"fp32 seed {s}", fp32, s) for s in args.noise_seeds)]:
            evaluator.set_model(model, f"{args.checkpoint} {name}")
            # The generation's seeds only: the first run drew (and cached) the references at seed 0.
            evaluator.seed = seed
            images = Path(folder) / name.replace(" ", "-")
            result = evaluator.run(**options, save_images=images if seed == 0 else None)
            saved[name] = images
            row = {"run": name, "dtype": name.split()[0], "seed": seed, "fid": round(result["fid"], 2),
                   "fid_data_floor": round(result["fid_data_floor"], 2), "seconds": result["seconds"]["total"]}
            if result["shapes"] is not None:
                row["shapes"] = {attribute: round(value, 4) for attribute, value in result["shapes"].items()}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
        results["image_differences"] = image_differences(read_pngs(saved["fp32"], args.n),
                                                         read_pngs(saved["bf16"], args.n))
    print(json.dumps(results["image_differences"]), flush=True)
    prompts = evaluator.prompt_list[:args.decode_images]
    results["decode"] = decode_check(fp32, prompts, SamplingOptions(sampler=args.sampler, steps=args.steps,
                                                                    guidance=args.cfg, height=evaluator.size,
                                                                    width=evaluator.size))
    print(json.dumps(results["decode"]), flush=True)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(results, indent=1) + "\n")
    print(f"{time.time() - started:.0f} s; wrote {args.out}")
    print(f"\n| run ({args.data} held-out, n={args.n}) | FID | data floor | all attributes right |")
    print("|---|---:|---:|---:|")
    for row in results["rows"]:
        right = f"{100 * row['shapes']['all_attributes']:.1f}%" if "shapes" in row else "-"
        print(f"| {row['run']} | {row['fid']:.2f} | {row['fid_data_floor']:.2f} | {right} |")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    run(lambda: main(sys.argv[1:]))
