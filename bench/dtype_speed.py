"""Speed of bf16 inference on CPU against float32 (issue 23 item 1; bench/RESULTS.md). Run it on a quiet
machine only.

    HF_HUB_OFFLINE=1 python bench/dtype_speed.py --configs tiny small default --threads 2
    HF_HUB_OFFLINE=1 python bench/dtype_speed.py --pipeline --threads 2
    HF_HUB_OFFLINE=1 python bench/dtype_speed.py --threads 1 --cpu-time     # per-thread CPU time

U-Net forwards (--configs): bench/unet_speed.py's tiny and small U-Nets (random weights) and the shipped
default model's ("default": batch 8, 4 images with guidance, at its 16x16 latents), once float32 and once
cast as `Pipeline(dtype="bf16")` casts them (`ldm.precision.cast_for_inference`), called alternately in
one process, so drift of a shared machine falls on both; the figures are medians of per-call times and
of the paired ratios bf16 / fp32.

Whole draws (--pipeline): `Pipeline.from_file(--checkpoint, dtype=...)` drawing --images images of one
prompt at --steps steps (DPM-Solver++ 2M, guidance 3), fp32 and bf16 alternately, --rounds rounds:
seconds per image, and the share of it the autoencoder's float32 decode takes (timed apart), which is
what decoding in bf16 could save at most.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm.original_format import load_model  # noqa: E402
from ldm.pipeline import Pipeline  # noqa: E402
from ldm.precision import cast_for_inference  # noqa: E402
from ldm.unet import UNetModel  # noqa: E402
from unet_speed import CONFIGS, randomize_zero_init  # noqa: E402

DEFAULT_MODEL = "models/default/model.safetensors"


def unet_and_inputs(name: str, checkpoint: str) -> tuple[UNetModel, tuple, dict]:
    """A float32 U-Net and its forward's (x, t) and keywords for config `name` ("default": the shipped one)."""
    generator = torch.Generator().manual_seed(0)
    if name == "default":
        model = load_model(checkpoint)
        unet, batch, size = model.unet, 8, model.cfg.unet.image_size
        context = model.encode_text(["grinning face"] * batch)
    else:
        params, batch, size, length = CONFIGS[name]
        unet = UNetModel(**params)
        randomize_zero_init(unet)
        context = torch.randn(batch, length, params["context_dim"], generator=generator)
    x = torch.randn(batch, unet.config.in_channels, size, size, generator=generator)
    return unet.eval(), (x, torch.full((batch,), 500.0)), {"context": context}


def time_unets(name: str, checkpoint: str, runs: int, clock=time.perf_counter) -> dict:
    fp32, args, kwargs = unet_and_inputs(name, checkpoint)
    bf16 = copy.deepcopy(fp32)
    cast_for_inference([bf16], torch.bfloat16)
    times = {"fp32": [], "bf16": []}
    with torch.inference_mode():
        outputs = {key: net(*args, **kwargs) for key, net in (("fp32", fp32), ("bf16", bf16))}  # warm-up
        for _ in range(runs):
            for key, net in (("fp32", fp32), ("bf16", bf16)):
                started = clock()
                net(*args, **kwargs)
                times[key].append(clock() - started)
    ratios = [b / f for f, b in zip(times["fp32"], times["bf16"])]
    return {"config": name, "fp32_ms": 1000 * statistics.median(times["fp32"]),
            "bf16_ms": 1000 * statistics.median(times["bf16"]), "ratio": statistics.median(ratios),
            "max_rel_diff": float((outputs["bf16"] - outputs["fp32"]).abs().max() / outputs["fp32"].abs().max())}


def time_pipelines(checkpoint: str, images: int, steps: int, rounds: int, clock=time.perf_counter) -> dict:
    pipes = {dtype: Pipeline.from_file(checkpoint, dtype=dtype) for dtype in ("fp32", "bf16")}
    keywords = dict(sampler="dpmpp-2m", steps=steps, guidance=3.0, num_images=images)
    times = {"fp32": [], "bf16": []}
    for pipe in pipes.values():
        pipe("grinning face", **{**keywords, "steps": 2})  # warm-up
    for round_ in range(rounds):
        for dtype, pipe in pipes.items():
            started = clock()
            pipe("grinning face", seed=round_ * images, **keywords)
            times[dtype].append((clock() - started) / images)
    model = pipes["fp32"].model
    latents = torch.randn(images, model.latent_channels, model.cfg.unet.image_size, model.cfg.unet.image_size)
    decode = []
    with torch.inference_mode():
        for _ in range(rounds):
            started = clock()
            model.decode_latents(latents)
            decode.append((clock() - started) / images)
    ratios = [b / f for f, b in zip(times["fp32"], times["bf16"])]
    fp32 = statistics.median(times["fp32"])
    return {"images": images, "steps": steps, "fp32_s_per_image": fp32,
            "bf16_s_per_image": statistics.median(times["bf16"]), "ratio": statistics.median(ratios),
            "decode_s_per_image": statistics.median(decode), "decode_share_fp32": statistics.median(decode) / fp32}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=["tiny", "small", "default"],
                        choices=[*CONFIGS, "default"])
    parser.add_argument("--runs", type=int, default=20, help="timed forwards per dtype and config")
    parser.add_argument("--pipeline", action="store_true", help="time whole draws instead of U-Net forwards")
    parser.add_argument("--checkpoint", default=DEFAULT_MODEL)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--cpu-time", action="store_true", help="time with the main thread's CPU clock (with "
                        "--threads 1: what other processes on the machine disturb least)")
    args = parser.parse_args()
    clock = time.thread_time if args.cpu_time else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, {'CPU' if args.cpu_time else 'wall'} time, oneDNN bf16 kernels: "
          f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    if args.pipeline:
        row = time_pipelines(args.checkpoint, args.images, args.steps, args.rounds, clock)
        print("| images x steps | fp32 s/image | bf16 s/image | bf16 / fp32 | decode s/image (share of fp32) |")
        print("|---|---:|---:|---:|---:|")
        print(f"| {row['images']} x {row['steps']} | {row['fp32_s_per_image']:.3f} | {row['bf16_s_per_image']:.3f} "
              f"| {row['ratio']:.2f} | {row['decode_s_per_image']:.4f} ({100 * row['decode_share_fp32']:.1f}%) |")
        return
    print("| U-Net | fp32 ms | bf16 ms | bf16 / fp32 | max rel. diff |\n|---|---:|---:|---:|---:|")
    for name in args.configs:
        row = time_unets(name, args.checkpoint, args.runs, clock)
        print(f"| {name} | {row['fp32_ms']:.1f} | {row['bf16_ms']:.1f} | {row['ratio']:.2f} | "
              f"{row['max_rel_diff']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
