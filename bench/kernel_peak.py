"""The practical peak of this CPU for SD 1.x's work: GFLOP/s of the U-Net's own heaviest kernels run alone
(its 3x3 convolutions at each level and its largest GEMMs, batch 2 at 64x64 latents), in fp32 and bf16,
beside MKL's 2048^3 matmul. Issue 23 item 3 reads SD 1.x's whole-forward GFLOP/s against the best of these.

    HF_HUB_OFFLINE=1 python bench/kernel_peak.py --threads 2

Each kernel: two warm-up calls, then the median of --runs, wall time, denormals flushed.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

# (name, input [B, C, H, W], output channels): the 3x3 convs of SD 1.x's four levels at batch 2.
CONVS = [("conv 320->320 at 64x64", (2, 320, 64, 64), 320), ("conv 640->640 at 32x32", (2, 640, 32, 32), 640),
         ("conv 1280->1280 at 16x16", (2, 1280, 16, 16), 1280), ("conv 1280->1280 at 8x8", (2, 1280, 8, 8), 1280)]
# (name, M, K, N): the feed-forward GEMMs of the 64x64 and 32x32 transformers, and MKL's square reference.
GEMMS = [("GEMM 8192x320 @ 320x2560 (GEGLU in, 64x64)", 8192, 320, 2560),
         ("GEMM 2048x640 @ 640x5120 (GEGLU in, 32x32)", 2048, 640, 5120), ("GEMM 2048^3", 2048, 2048, 2048)]


def median_seconds(fn, runs: int) -> float:
    fn(), fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    print(f"torch {torch.__version__}, {args.threads} threads, wall time, median of {args.runs}\n")
    print("| kernel | GFLOP | fp32 GFLOP/s | bf16 GFLOP/s |\n|---|---:|---:|---:|")
    with torch.no_grad():
        for name, shape, out_channels in CONVS:
            b, c, h, w = shape
            flops = 2 * b * h * w * out_channels * c * 9
            rates = []
            for dtype in (torch.float32, torch.bfloat16):
                x, weight = torch.randn(shape, dtype=dtype), torch.randn(out_channels, c, 3, 3, dtype=dtype) * 0.02
                rates.append(flops / median_seconds(lambda: F.conv2d(x, weight, padding=1), args.runs) / 1e9)
            print(f"| {name} | {flops / 1e9:.2f} | {rates[0]:.0f} | {rates[1]:.0f} |")
        for name, m, k, n in GEMMS:
            flops = 2 * m * k * n
            rates = []
            for dtype in (torch.float32, torch.bfloat16):
                a, b_ = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
                rates.append(flops / median_seconds(lambda: a @ b_, args.runs) / 1e9)
            print(f"| {name} | {flops / 1e9:.2f} | {rates[0]:.0f} | {rates[1]:.0f} |")


if __name__ == "__main__":
    main()
