"""A LoRA's effect on the shipped default model (issue 21 item 5; bench/RESULTS.md).

    HF_HUB_OFFLINE=1 python bench/lora_default.py --lora runs/lora-default/lora.safetensors \
        --n 192 --out runs/bench/lora-default.json [--grid before-after.png]

Scores, with `ldm.evaluate.Evaluator` (DPM-Solver++ 2M, 15 steps, guidance 3, as the project's sweeps;
image i from seed i, prompts the held-out captions):

  fashion-mnist  the base model, then the base with the LoRA merged at scale 1 (`ldm.lora.merge_lora`,
                 what `python -m ldm.lora merge` writes), against the same n held-out Fashion-MNIST
                 images (test split: never trained on);
  emoji          the base, the base with the LoRA merged at scale 0 (whose weights are also checked to
                 equal the base's bit for bit) and at scale 1: what the LoRA costs the model's own domain.

--runs picks some of these; rows already in --out (same base, n and sampling) are kept, so the base's
scores can be taken while the LoRA trains and the rest added later.

Also checks that the file's kohya metadata names the base's sha256 and every key matches a layer.
--grid writes a before / after image: the prompts in columns, the base above the merged model, same seeds.
"""
from __future__ import annotations

import copy
import json
import logging
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import ArgumentParser, run  # noqa: E402
from common.weights import file_sha256, read_metadata, write_text_atomic  # noqa: E402
from ldm.evaluate import Evaluator  # noqa: E402
from ldm.generation import generate_latents  # noqa: E402
from ldm.lora import merge_lora  # noqa: E402
from ldm.lora_files import read_lora  # noqa: E402
from ldm.original_format import load_model  # noqa: E402
from ldm.sampling_options import SamplingOptions  # noqa: E402

log = logging.getLogger("lora_default")
GRID_PROMPTS = ["sneaker", "dress", "bag", "ankle boot"]
# name -> (data, LoRA scale merged into the base; None: the base itself)
RUNS = {"fashion-base": ("fashion-mnist", None), "fashion-lora": ("fashion-mnist", 1.0),
        "emoji-base": ("emoji", None), "emoji-scale0": ("emoji", 0.0), "emoji-scale1": ("emoji", 1.0)}


def merged(base, lora, scale: float):
    model = copy.deepcopy(base)
    merge_lora(model, lora, scale)
    return model.eval()


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def lora_metadata(path: Path) -> dict:
    meta = read_metadata(path).get("ldm_lora")
    return json.loads(meta) if isinstance(meta, str) else (meta or {})


@torch.no_grad()
def grid(base, tuned, prompts: list[str], options: SamplingOptions, seed: int, path: Path, scale: int = 2) -> None:
    rows = []
    for model in (base, tuned):
        latents = generate_latents(model, prompts, options, seed=seed)
        images = model.decode_latents(latents).float().clamp(-1, 1)
        rows.append(((images + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    side, label_w, label_h = options.height * scale, 52, 14
    canvas = Image.new("RGB", (label_w + side * len(prompts), label_h + 2 * side), "white")
    draw = ImageDraw.Draw(canvas)
    for column, prompt in enumerate(prompts):
        draw.text((label_w + column * side + 2, 1), prompt, fill="black")
    for row, (name, pixels) in enumerate(zip(("base", "+ LoRA"), rows)):
        draw.text((2, label_h + row * side + side // 2 - 5), name, fill="black")
        for column, picture in enumerate(pixels):
            tile = Image.fromarray(picture).resize((side, side), Image.NEAREST)
            canvas.paste(tile, (label_w + column * side, label_h + row * side))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)
    print(f"wrote {path} ({path.stat().st_size / 1000:.1f} KB)")


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python bench/lora_default.py", description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="models/default/model.safetensors")
    parser.add_argument("--lora", help="needed unless --runs names only base runs")
    parser.add_argument("--n", type=int, default=192)
    parser.add_argument("--sampler", default="dpmpp-2m")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", nargs="*", choices=list(RUNS), default=list(RUNS),
                        help="which scores (default all); rows already in --out are kept, not redone")
    parser.add_argument("--grid", type=Path)
    parser.add_argument("--grid-seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/lora-default.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    base = load_model(args.base).eval()
    options = dict(sampler=args.sampler, steps=args.steps, cfg=args.cfg)
    results = {"base": args.base, "lora": args.lora, "n": args.n, **options, "threads": args.threads, "rows": []}
    lora = tuned = None
    if args.lora:
        lora = read_lora(args.lora, base)  # every key must match a layer
        meta = lora_metadata(Path(args.lora))
        checks = {"layers": len(lora.layers), "file_bytes": Path(args.lora).stat().st_size, "metadata": meta,
                  "base_sha256_matches": meta.get("base_sha256") == file_sha256(args.base),
                  "scale0_weights_equal_base": same_weights(base, merged(base, lora, 0.0))}
        print(json.dumps(checks, indent=1))
        results["checks"] = checks
        tuned = merged(base, lora, 1.0)
    elif any(RUNS[name][1] is not None for name in args.runs) or args.grid:
        parser.error("--lora is needed for runs with the LoRA and for --grid")
    if args.grid:
        grid(base, tuned, GRID_PROMPTS, SamplingOptions(sampler=args.sampler, steps=args.steps, guidance=args.cfg,
                                                         height=64, width=64), args.grid_seed, args.grid)
    if args.out.is_file():  # rows of an earlier invocation with the same settings are kept, not redone
        earlier = json.loads(args.out.read_text())
        if all(earlier.get(k) == results[k] for k in ("base", "n", "sampler", "steps", "cfg")):
            results["rows"] = [row for row in earlier["rows"] if row["run"] in RUNS]
    done = {row["run"] for row in results["rows"]}
    evaluators: dict[str, Evaluator] = {}
    started = time.time()
    for name in args.runs:
        if name in done:
            continue
        data, scale = RUNS[name]
        model = base if scale is None else tuned if scale == 1 else merged(base, lora, scale)
        label = args.base if scale is None else f"base + LoRA (scale {scale:g})"
        if data not in evaluators:
            evaluators[data] = Evaluator(model, data, n=args.n, clip=None, checkpoint=label)
        evaluators[data].set_model(model, label)
        result = evaluators[data].run(**options)
        row = {"run": name, "data": data, "model": label, "fid": round(result["fid"], 2),
               "fid_data_floor": round(result["fid_data_floor"], 2), "seconds": result["seconds"]["total"],
               "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out, json.dumps(results, indent=1) + "\n")
    print(f"this invocation: {time.time() - started:.0f} s")
    print(f"\n| data (held-out, n={args.n}) | model | FID | data floor |\n|---|---|---:|---:|")
    for row in sorted(results["rows"], key=lambda r: list(RUNS).index(r["run"])):
        print(f"| {row['data']} | {row['model']} | {row['fid']:.2f} | {row['fid_data_floor']:.2f} |")

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    run(lambda: main(sys.argv[1:]))
