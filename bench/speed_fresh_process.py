"""U-Net forward against diffusers, each side in its own fresh process with its own weights (issue 23).

An independent check of bench/speed_vs_diffusers.py's paired in-process ratio. Nothing is shared
between the sides: each child process builds its model from the same diffusers-style config
(bench/unet_speed.py's CONFIGS; diffusers' `UNet2DConditionModel` from `diffusers_config`) with its
own random initialisation (zero-initialised layers given small random values on both sides, so
that every layer works), flushes denormals, warms up, times `--calls` forwards and prints their
median. A round runs ours, diffusers NCHW and diffusers channels_last, one process after the other
(the order rotates from round to round); the round's ratio is the faster diffusers layout's median
over ours. The figure is the median of the rounds' ratios, with their range. The machine's MKL
sgemm (2048^3, fp32 and bf16, median of 10, in a fresh process) is measured before and after, so
that a day's ratios can be read against that day's machine.

    HF_HUB_OFFLINE=1 python bench/speed_fresh_process.py --configs tiny small --rounds 6 --threads 2
    HF_HUB_OFFLINE=1 python bench/speed_fresh_process.py --configs tiny small --rounds 6 --threads 1 --cpu-time
    HF_HUB_OFFLINE=1 python bench/speed_fresh_process.py --configs tiny small --rounds 6 --threads 2 --dtype bf16
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("ours", "diffusers-nchw", "diffusers-channels_last")


def child(side: str, config: str, dtype_name: str, calls: int, threads: int, cpu_time: bool) -> dict:
    """In the fresh process: build one side, time `calls` forwards, return the median in ms."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    sys.path.insert(0, str(ROOT))
    from unet_speed import CONFIGS, diffusers_config, randomize_zero_init

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    params, batch, size, context_len = CONFIGS[config]
    torch.manual_seed(1 if side == "ours" else 2)
    if side == "ours":
        from ldm.precision import cast_for_inference
        from ldm.unet import UNetModel

        model = UNetModel(**params).eval()
        randomize_zero_init(model)
        cast_for_inference([model], dtype)
        run = lambda x, t, c: model(x, t, c)  # noqa: E731
    else:
        from diffusers import UNet2DConditionModel

        model = UNet2DConditionModel(**diffusers_config(params)).eval()
        randomize_zero_init(model)
        model.to(dtype)
        if side == "diffusers-channels_last":
            model.to(memory_format=torch.channels_last)
        run = lambda x, t, c: model(x, t, c).sample  # noqa: E731
    x = torch.randn(batch, params["in_channels"], size, size, dtype=dtype)
    if side == "diffusers-channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (batch,))
    context = torch.randn(batch, context_len, params["context_dim"], dtype=dtype)
    clock = time.thread_time if cpu_time else time.perf_counter
    times = []
    with torch.inference_mode():
        for _ in range(2):  # warm-up: oneDNN builds its kernels on the first calls per shape
            run(x, t, context)
        for _ in range(calls):
            start = clock()
            run(x, t, context)
            times.append((clock() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times)}


def sgemm(threads: int) -> dict:
    """GFLOP/s of a 2048^3 matmul in fp32 and bf16, median of 10 after a warm-up."""
    import torch

    torch.set_num_threads(threads)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        a @ b
        times = []
        for _ in range(10):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        out[name] = 2 * 2048**3 / statistics.median(times) / 1e9
    return out


def run_child(args: list[str]) -> dict:
    result = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=["tiny", "small", "sd1"])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=11, help="timed forwards per process (sd1: 3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-time", action="store_true", help="time with the main thread's CPU clock")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "CONFIG"), help=argparse.SUPPRESS)
    parser.add_argument("--sgemm", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.dtype, args.calls, args.threads, args.cpu_time)))
        return
    if args.sgemm:
        print(json.dumps(sgemm(args.threads)))
        return

    common = ["--threads", str(args.threads), "--dtype", args.dtype, "--calls", str(args.calls)]
    common += ["--cpu-time"] if args.cpu_time else []
    before = run_child(["--sgemm", "--threads", str(args.threads)])
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC; {args.threads} threads, "
          f"{'CPU' if args.cpu_time else 'wall'} time, {args.dtype}; sgemm before: fp32 {before['fp32']:.0f}, "
          f"bf16 {before['bf16']:.0f} GFLOP/s", flush=True)
    rows = []
    for config in args.configs:
        ratios, medians = [], {side: [] for side in SIDES}
        for round_ in range(args.rounds):
            order = SIDES[round_ % 3:] + SIDES[:round_ % 3]
            result = {side: run_child(["--child", side, config, *common])["median_ms"] for side in order}
            for side in SIDES:
                medians[side].append(result[side])
            ratios.append(min(result["diffusers-nchw"], result["diffusers-channels_last"]) / result["ours"])
            print(f"  {config} round {round_ + 1}: ours {result['ours']:.1f} ms, diffusers NCHW "
                  f"{result['diffusers-nchw']:.1f}, channels_last {result['diffusers-channels_last']:.1f}: "
                  f"{ratios[-1]:.2f}x", flush=True)
        rows.append((config, {side: statistics.median(v) for side, v in medians.items()}, ratios))
    after = run_child(["--sgemm", "--threads", str(args.threads)])
    print(f"sgemm after: fp32 {after['fp32']:.0f}, bf16 {after['bf16']:.0f} GFLOP/s")
    print("| config | dtype | ours ms | diffusers NCHW ms | diffusers channels_last ms | speed-up (median of rounds) | range |")
    print("|---|---|---:|---:|---:|---:|---|")
    for config, med, ratios in rows:
        print(f"| {config} | {args.dtype} | {med['ours']:.1f} | {med['diffusers-nchw']:.1f} | "
              f"{med['diffusers-channels_last']:.1f} | {statistics.median(ratios):.2f}x | "
              f"{min(ratios):.2f}-{max(ratios):.2f}x |")


if __name__ == "__main__":
    main()
