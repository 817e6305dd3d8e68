"""What encoding training's new captions in fixed chunks (`ContextCache(chunk=16)`, for exact resumes on
CPUs whose batched text encoder follows the batch size) costs against one call per batch's new captions.

    HF_HUB_OFFLINE=1 python bench/context_cache_cost.py --batches 150 --threads 1

Replays the first --batches batches of 32 of the shapes stage 2 (its 20,000 scenes in a seeded random order)
through both caches, each from empty, alternating --rounds times, and prints CPU seconds for the text
encoding of each, the captions encoded and the encoder calls.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conditioning.context_cache import ContextCache  # noqa: E402
from data.config import DataConfig  # noqa: E402
from data.shapes import sample_scene, scene_caption  # noqa: E402
from ldm.latent_diffusion import LatentDiffusion  # noqa: E402


class PerBatchCache(ContextCache):
    """The cache before chunking: all of a batch's new captions in one call, whatever their number."""

    def _encode_in_chunks(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return dict(zip(captions, self.encode(captions)))


def replay(cache: ContextCache, batches: list[list[str]]) -> float:
    start = time.process_time()
    for captions in batches:
        cache(captions)
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="models/default/shapes.safetensors")
    parser.add_argument("--batches", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--scenes", type=int, default=20000)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = LatentDiffusion.load(args.checkpoint).eval()
    order = torch.randperm(args.scenes, generator=torch.Generator().manual_seed(0))[:args.batches * args.batch_size]
    data = DataConfig(source="shapes")  # the shapes stage 2's data: its seed, split and objects per scene
    captions = [scene_caption(sample_scene(data.seed, data.split, int(i), data.shapes_max_objects)) for i in order]
    batches = [captions[i:i + args.batch_size] for i in range(0, len(captions), args.batch_size)]

    calls = {"per batch": [], "chunked": []}
    def counting(name):
        return lambda prompts: calls[name].append(len(prompts)) or model.encode_text(prompts)
    seconds = {"per batch": [], "chunked": []}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name in seconds:
                calls[name].clear()
                kind = ContextCache if name == "chunked" else PerBatchCache
                seconds[name].append(replay(kind(counting(name), chunk=args.chunk), batches))
    for name in seconds:
        print(f"{name}: {statistics.median(seconds[name]):.2f} s CPU (rounds {', '.join(f'{s:.2f}' for s in seconds[name])}), "
              f"{sum(calls[name])} captions encoded in {len(calls[name])} calls")
    distinct = len(set(captions))
    print(f"{args.batches} batches of {args.batch_size}, {distinct} distinct captions, {args.threads} thread(s); "
          f"chunked / per batch: {statistics.median(seconds['chunked']) / statistics.median(seconds['per batch']):.2f}x")


if __name__ == "__main__":
    main()
