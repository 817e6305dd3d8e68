"""Tiled decoding on the shipped default model (issue 23 item 4; bench/RESULTS.md): how far the tiled
decode is from the whole one, and the decode's peak memory, against the tile size.

    HF_HUB_OFFLINE=1 python bench/vae_tiling.py --threads 1

Quality: --prompts drawn at --size pixels (DPM-Solver++ 2M, --steps steps, guidance 3, seed 0), decoded
whole and in tiles of each --tiles size (`LatentDiffusion.decode_latents(tile=)`): PSNR against the
whole decode per image, and the largest |difference| (0-255). Memory: a fresh process per tile size
decodes one --memory-size image from random latents (`decode_latents` itself takes any size); the
peak resident memory while decoding (Linux's VmHWM, reset just before through /proc/self/clear_refs)
less the resident memory before is the decode's.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm.generation import generate_latents  # noqa: E402
from ldm.original_format import load_model  # noqa: E402

DEFAULT_MODEL = "models/default/model.safetensors"


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round()


def quality(args) -> list[dict]:
    model = load_model(args.checkpoint).eval()
    latents = generate_latents(model, args.prompts, sampler="dpmpp-2m", steps=args.steps, guidance=3.0,
                               height=args.size, width=args.size, seed=0)
    whole = to_uint8(model.decode_latents(latents))
    rows = []
    for tile in args.tiles:
        tiled = to_uint8(model.decode_latents(latents, tile=tile))
        psnr = 10 * torch.log10(255**2 / ((tiled - whole) ** 2).flatten(1).mean(1))
        rows.append({"tile": tile, "psnr_db": [round(float(p), 1) for p in psnr],
                     "max_diff": int((tiled - whole).abs().max())})
    return rows


def resident_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_memory(checkpoint: str, size: int, tile: int | None) -> float:
    """MiB the decode of one size x size image adds at its peak to the process's resident memory."""
    model = load_model(checkpoint).eval()
    latents = torch.randn(1, model.latent_channels, size // model.latent_factor, size // model.latent_factor,
                          generator=torch.Generator().manual_seed(0))
    Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from the resident memory now
    before = resident_mib("VmRSS")
    model.decode_latents(latents, tile=tile)
    return resident_mib("VmHWM") - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=DEFAULT_MODEL)
    parser.add_argument("--prompts", nargs="+", default=["grinning face", "fire", "cat face", "purple heart"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--tiles", type=int, nargs="+", default=[64, 128, 192])
    parser.add_argument("--memory-size", type=int, default=2048)
    parser.add_argument("--memory-tiles", type=int, nargs="+", default=[512, 128],
                        help="tile sizes whose decode memory is measured (512: generate.py --vae-tiling's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-of", type=int, help=argparse.SUPPRESS)  # the child process: 0 = whole
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_of is not None:
        print(peak_memory(args.checkpoint, args.memory_size, args.memory_of or None))
        return
    print(f"| tile (pixels) | PSNR against the whole decode, dB ({', '.join(args.prompts)}) | largest diff |")
    print("|---:|---|---:|")
    for row in quality(args):
        print(f"| {row['tile']} | {', '.join(map(str, row['psnr_db']))} | {row['max_diff']} |", flush=True)
    print(f"\n| decode of one {args.memory_size}-pixel image | peak memory added, MiB |\n|---|---:|")
    for tile in [0, *args.memory_tiles]:
        child = subprocess.run([sys.executable, __file__, "--checkpoint", args.checkpoint, "--memory-size",
                                str(args.memory_size), "--threads", str(args.threads), "--memory-of", str(tile)],
                               capture_output=True, text=True, check=True)
        print(f"| {'whole' if tile == 0 else f'tiles of {tile}'} | {json.loads(child.stdout.strip()):.0f} |", flush=True)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
