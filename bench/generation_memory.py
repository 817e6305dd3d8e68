"""Peak memory of generating one SD 1.x image at 512 pixels, against the weights' size (issue 23 item 4).

    python bench/generation_memory.py                          # fp32 file, --dtype fp32
    python bench/generation_memory.py --file-dtype fp16 --dtype bf16
    python bench/generation_memory.py --keep --extra --vae-tiling

1. Writes an original-format SD 1.x `.safetensors` with random weights (bench/load_memory.py's writer) in
   a subprocess, unless it is already there.
2. Runs the real command a user runs, `generate.py "<prompt>" --checkpoint FILE --config
   configs/sd/v1-inference.yaml --size 512 --steps 25 --n 1 --dtype D`, in a fresh process, and reports its
   peak RSS (`ru_maxrss` from wait4) and its peak anonymous memory (RssAnon polled every 20 ms from
   /proc), against the bytes of the weights as the process holds them (U-Net in D; text encoder and
   autoencoder float32, as `ldm.precision` keeps them). File-backed pages of a mapped checkpoint count in
   RSS, which is the point: the weights are counted once whether they are mapped or copied.
   This orchestrating process imports no torch, so its own size does not leak into the child's figure.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from load_memory import CONFIG  # noqa: E402  (torch-free at import)

# SD 1.x parameter counts (bench/load_memory.py's table): U-Net, kl-f8 autoencoder, CLIP ViT-L/14 text.
UNET_PARAMS, AUTOENCODER_PARAMS, TEXT_PARAMS = 859_520_964, 83_653_863, 123_060_480
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def weight_bytes(dtype: str) -> int:
    """Bytes of SD 1.x's weights as `generate.py --dtype dtype` holds them (only the U-Net is cast)."""
    return UNET_PARAMS * BYTES[dtype] + (AUTOENCODER_PARAMS + TEXT_PARAMS) * 4


def rss_anon_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str], env: dict) -> dict:
    """Run `cmd`; return its wall seconds, peak RSS and peak anonymous memory in bytes."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    peak_anon, done = 0, threading.Event()

    def poll() -> None:
        nonlocal peak_anon
        while not done.is_set():
            peak_anon = max(peak_anon, rss_anon_kb(proc.pid))
            time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    poller.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"generation failed: {' '.join(cmd)}")
    return {"seconds": time.perf_counter() - start, "peak_rss": usage.ru_maxrss * 1024, "peak_anon": peak_anon * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file-dtype", choices=["fp32", "fp16"], default="fp32", help="dtype of the checkpoint file")
    parser.add_argument("--dtype", choices=sorted(BYTES), default="fp32", help="generate.py --dtype")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vae-tiling", action="store_true")
    parser.add_argument("--dir", default="/tmp")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoint for later runs")
    args = parser.parse_args()

    path = Path(args.dir) / f"sd1-random-{args.file_dtype}.safetensors"
    if not path.exists():
        start = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "bench/load_memory.py"), "--write", str(path),
                        "--dtype", args.file_dtype], check=True)
        print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - start:.0f} s", flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads))
    try:
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, str(ROOT / "generate.py"), "a watercolour lighthouse at dusk",
                   "--checkpoint", str(path), "--config", str(CONFIG), "--size", str(args.size),
                   "--steps", str(args.steps), "--n", "1", "--dtype", args.dtype, "--out", out]
            if args.vae_tiling:
                cmd.append("--vae-tiling")
            result = run_measured(cmd, env)
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
    weights = weight_bytes(args.dtype)
    gib = 2**30
    print(f"| {args.file_dtype} file, --dtype {args.dtype}{', --vae-tiling' if args.vae_tiling else ''} | "
          f"{args.size} px, {args.steps} steps | {weights / gib:.2f} GiB | {result['peak_rss'] / gib:.2f} GiB "
          f"({result['peak_rss'] / weights:.2f}x) | {result['peak_anon'] / gib:.2f} GiB | {result['seconds']:.0f} s |")


if __name__ == "__main__":
    main()
