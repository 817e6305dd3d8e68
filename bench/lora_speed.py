"""Cost of a LoRA at sampling time: the U-Net forward pass without a LoRA (base), with one applied as
forward hooks (unmerged, generate.py's default) and merged into the weights (--lora-merge).

The LoRA is random, of rank --rank, on the layers sd-scripts adapts: `attention` (its default network:
every linear / 1x1 conv of the spatial transformers) or `all` (LoCon: also the ResBlocks' and resamplers'
convs and time projections). In one process the three variants alternate call by call (merged is a copy
of the U-Net with the LoRA merged in); the figures are medians of per-call times and of the paired
ratios unmerged / base and merged / base, so drift of a shared machine cancels.

    HF_HUB_OFFLINE=1 python bench/lora_speed.py --configs tiny small --targets attention all --threads 1 --cpu-time
    HF_HUB_OFFLINE=1 python bench/lora_speed.py --write-lora /tmp/lora.safetensors \
        --checkpoint models/default/model.safetensors --ranks 16 --targets all    # for whole generate.py runs
"""
from __future__ import annotations

import argparse
import copy
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm.latent_diffusion import LatentDiffusion  # noqa: E402
from ldm.lora import LoRA, LoRALayer, apply_lora, merge_lora, model_parts, write_lora  # noqa: E402
from ldm.lora_keys import TargetTable  # noqa: E402
from ldm.unet import UNetModel  # noqa: E402
from unet_speed import CONFIGS, randomize_zero_init  # noqa: E402

# sd-scripts' targets by kohya name: Transformer2DModel's layers; with conv_dim also ResnetBlock2D's,
# Downsample2D's and Upsample2D's. Never conv_in, conv_out or the time embedding.
TARGETS = {"attention": re.compile(r"lora_unet_(down|mid|up)_blocks?_.*attentions_"),
           "all": re.compile(r"lora_unet_(down|mid|up)_blocks?_.*(attentions|resnets|downsamplers|upsamplers)_")}


def random_lora(unet: UNetModel, rank: int, targets: str, seed: int = 0) -> LoRA:
    """A rank-`rank` LoRA (alpha = rank, small random weights) on `targets` of `unet`."""
    g = torch.Generator().manual_seed(seed)
    lora = LoRA(source=f"random rank {rank} ({targets})")
    for name, target in TargetTable(model_parts(unet)).targets.items():
        if TARGETS[targets].match(target.kohya):
            w = target.module.weight
            down = torch.randn(rank, *w.shape[1:], generator=g) * 0.02
            up = torch.randn(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.02
            lora.layers[name] = LoRALayer(down, up, float(rank))
    return lora


def bench(name: str, rank: int, targets: str, runs: int, clock) -> dict[str, list[float]]:
    """Per-call ms of base, unmerged and merged on config `name`, alternating, plus the layer count."""
    params, batch, size, context_len = CONFIGS[name]
    torch.manual_seed(0)
    unet = UNetModel(**params).eval()
    randomize_zero_init(unet)
    lora = random_lora(unet, rank, targets)
    merged = copy.deepcopy(unet)
    merge_lora(merged, lora)
    x = torch.randn(batch, params["in_channels"], size, size)
    t = torch.randint(0, 1000, (batch,))
    context = torch.randn(batch, context_len, params["context_dim"])

    def call(model) -> float:
        start = clock()
        model(x, t, context)
        return (clock() - start) * 1e3

    times = {"base": [], "unmerged": [], "merged": []}
    with torch.inference_mode():
        with apply_lora(unet, lora):
            diff = (unet(x, t, context) - merged(x, t, context)).abs().max().item()
        for _ in range(runs + 1):  # the first round warms oneDNN's kernels up and is dropped
            with apply_lora(unet, lora):
                times["unmerged"].append(call(unet))
            times["base"].append(call(unet))
            times["merged"].append(call(merged))
    for values in times.values():
        del values[0]
    times["max|unmerged - merged|"] = [diff]
    times["layers"] = [len(lora.layers)]
    return times


def write_default_lora(checkpoint: str, path: str, rank: int, targets: str) -> None:
    """A random LoRA for a model file's U-Net, written in kohya format (for timing whole generate.py runs)."""
    model = LatentDiffusion.load(checkpoint)
    lora = random_lora(model.unet, rank, targets)
    write_lora(lora, path, model.unet, "kohya")
    print(f"wrote {path}: {len(lora.layers)} layers of {checkpoint}'s U-Net, rank {rank}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=sorted(CONFIGS))
    parser.add_argument("--targets", nargs="+", default=["attention", "all"], choices=sorted(TARGETS))
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--runs", type=int, default=20, help="timed rounds (each: base, unmerged, merged)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--cpu-time", action="store_true", help="time with the main thread's CPU clock")
    parser.add_argument("--write-lora", metavar="PATH", help="only write a random LoRA for --checkpoint's U-Net")
    parser.add_argument("--checkpoint", default="models/default/model.safetensors")
    args = parser.parse_args()
    if args.write_lora:
        write_default_lora(args.checkpoint, args.write_lora, args.ranks[0], args.targets[0])
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {'CPU' if args.cpu_time else 'wall'} "
          f"time, {args.runs} rounds")
    print(f"{'config':7} {'targets':9} {'rank':>4} {'layers':>6} {'base ms':>8} {'unmerged':>9} {'merged':>8} "
          f"{'unmerged/base':>14} {'merged/base':>12} {'max|diff|':>9}")
    for name, targets, rank in ((n, t, r) for n in args.configs for t in args.targets for r in args.ranks):
        times = bench(name, rank, targets, args.runs, clock)
        median = {key: statistics.median(times[key]) for key in ("base", "unmerged", "merged")}
        ratio = {key: statistics.median(a / b for a, b in zip(times[key], times["base"]))
                 for key in ("unmerged", "merged")}
        print(f"{name:7} {targets:9} {rank:4d} {times['layers'][0]:6d} {median['base']:8.1f} "
              f"{median['unmerged']:9.1f} {median['merged']:8.1f} {ratio['unmerged']:14.3f} "
              f"{ratio['merged']:12.3f} {times['max|unmerged - merged|'][0]:9.1e}", flush=True)

if __name__ == "__main__":
    main()
