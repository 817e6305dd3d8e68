"""What encoding each distinct prompt alone (`ldm.generation.encode_each`, for batch invariance) costs
against one batched call of the text encoder, next to a whole draw of the same prompts for scale.

    HF_HUB_OFFLINE=1 python bench/text_encoding_cost.py --batch 32 --threads 1

Prints CPU time per call (median of --runs) for: the batched encode, the per-prompt encode, and
`generate_latents` of the batch (DPM-Solver++ 2M, --steps, guidance 3).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm.generation import encode_each, generate_latents  # noqa: E402
from ldm.latent_diffusion import LatentDiffusion  # noqa: E402


def cpu_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.process_time()
        fn()
        times.append((time.process_time() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="models/default/model.safetensors")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = LatentDiffusion.load(args.checkpoint).eval()
    prompts = [f"emoji number {i}, a red apple" for i in range(args.batch)]
    with torch.no_grad():
        batched = cpu_ms(lambda: model.encode_text(prompts), args.runs)
        each = cpu_ms(lambda: encode_each(model, prompts), args.runs)
        draw = cpu_ms(lambda: generate_latents(model, prompts, sampler="dpmpp-2m", steps=args.steps, guidance=3.0,
                                               height=64, width=64), max(1, args.runs // 2))
    print(f"{args.batch} distinct prompts, {args.threads} thread(s), CPU ms: batched encode {batched:.1f}, "
          f"each alone {each:.1f} (+{each - batched:.1f}); generate_latents ({args.steps} steps) {draw:.1f}: "
          f"the difference is {100 * (each - batched) / draw:.1f}% of a draw")


if __name__ == "__main__":
    main()
