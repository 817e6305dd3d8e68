"""Canny edge maps as ControlNet hints.

ControlNet's canny model was trained on `cv2.Canny(rgb_uint8, low, high)` run directly on the RGB
image (OpenCV takes the strongest gradient over the channels), with the single-channel result
repeated to three channels and scaled to [0, 1]. These helpers reproduce exactly that.

    python -m conditioning.edges photos/ edges/ [--low 100 --high 200]

writes the edge map of every image in a folder (see `edges_of_folder`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from common.cli import run


def canny(image: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """Edges of an image.

    Args:
        image: uint8 array [H, W, 3] (RGB) or [H, W] (grey).
        low, high: hysteresis thresholds of cv2.Canny (gradient magnitudes, L1 norm).
    Returns:
        uint8 array [H, W] with 255 on edges and 0 elsewhere.
    """
    if image.dtype != np.uint8:
        raise ValueError(f"canny expects a uint8 image, got dtype {image.dtype}")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"canny expects an [H, W] or [H, W, 3] image, got shape {image.shape}")
    if not 0 <= low <= high:
        raise ValueError(f"canny thresholds must satisfy 0 <= low <= high, got low={low}, high={high}")
    return cv2.Canny(np.ascontiguousarray(image), low, high)


def edges_to_hint(edges: np.ndarray) -> torch.Tensor:
    """A uint8 [H, W] map (0 or 255) as a float hint tensor [3, H, W] in [0, 1]."""
    hint = np.asarray(edges, dtype=np.float32) / np.float32(255.0)  # numpy: see data.transforms.image_to_tensor
    return torch.from_numpy(np.ascontiguousarray(np.broadcast_to(hint, (3, *hint.shape))))


def to_uint8_hwc(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    """A PIL image, a uint8 [H, W, 3] array or a float tensor [3, H, W] in [-1, 1] as uint8 [H, W, 3]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 [H, W, 3] array, got {image.dtype} {image.shape}")
        return image
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a tensor [3, H, W] in [-1, 1], got shape {tuple(image.shape)}")
        pixels = ((image.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return pixels.permute(1, 2, 0).numpy()
    raise TypeError(f"expected a PIL image, numpy array or tensor, got {type(image).__name__}")


def canny_hint(image: Image.Image | np.ndarray | torch.Tensor, low: int = 100, high: int = 200) -> torch.Tensor:
    """The ControlNet canny hint of an image.

    Args:
        image: PIL image, uint8 [H, W, 3] array, float tensor [3, H, W] in [-1, 1], or a batch
            [B, 3, H, W] of such tensors.
    Returns:
        float tensor [3, H, W] (or [B, 3, H, W]) in [0, 1], on the input tensor's device.
    """
    if isinstance(image, torch.Tensor) and image.ndim == 4:
        return torch.stack([canny_hint(one, low, high) for one in image])
    hint = edges_to_hint(canny(to_uint8_hwc(image), low, high))
    return hint.to(image.device) if isinstance(image, torch.Tensor) else hint


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def edges_of_folder(in_dir: str | Path, out_dir: str | Path, low: int = 100, high: int = 200) -> list[Path]:
    """Write the Canny edge map of every image under `in_dir` (recursively) to `out_dir` as PNG.

    The folder layout is kept and every file becomes `<name>.png` (0 / 255, one channel), ready for
    `generate.py --control none --control-image ...`. Returns the written paths.
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise FileNotFoundError(f"input folder not found: {in_dir}")
    sources = sorted(p for p in in_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not sources:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {in_dir}")
    written = []
    for source in sources:
        try:
            with Image.open(source) as image:
                edges = canny(to_uint8_hwc(image), low, high)
        except OSError as e:
            raise ValueError(f"cannot read image {source}: {e}") from None
        target = (out_dir / source.relative_to(in_dir)).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(edges).save(target)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Turn a folder of images into Canny condition images for ControlNet.")
    parser.add_argument("in_dir", help="folder of images (searched recursively)")
    parser.add_argument("out_dir", help="where the edge maps go (same layout, .png)")
    parser.add_argument("--low", type=int, default=100, help="low hysteresis threshold of cv2.Canny")
    parser.add_argument("--high", type=int, default=200, help="high hysteresis threshold of cv2.Canny")
    args = parser.parse_args(argv)
    written = edges_of_folder(args.in_dir, args.out_dir, args.low, args.high)
    print(f"wrote {len(written)} edge maps to {args.out_dir}")


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]))
