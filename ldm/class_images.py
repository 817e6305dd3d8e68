"""DreamBooth's class images: drawn once from the base model for the class prompt, kept on disk.

Prior preservation trains on the base model's own pictures of the class ("a teapot") beside the
subject's, so the fine-tuned model keeps drawing the class as it did. They are drawn before any
training step, from the unchanged base, and written as PNGs with a `metadata.jsonl` of captions (a
folder `data.folder.FolderDataset` reads) into `<class_dir>/<key>/`, where the key is a hash of
everything that decides the pictures: the base model file's sha256, the prompt, the count, the size
and the sampling settings. A resumed or second run with the same key reuses them; change any of
these and a new folder is drawn. `manifest.json` is written last: a folder without it is unfinished,
and a new run draws only its missing images (image i depends on seed + i alone, not on its batch).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from common.weights import atomic_write, write_text_atomic
from ldm.generation import generate_latents

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ClassImageSpec:
    """What decides a set of class images (all of it goes into the cache key)."""

    model_sha256: str  # of the base model file
    prompt: str
    count: int
    size: int  # pixels, square
    sampler: str
    steps: int
    guidance: float
    seed: int  # image i is drawn with seed + i

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.__dict__, sort_keys=True).encode()).hexdigest()

    def folder(self, root: str | Path) -> Path:
        """`<root>/<prompt slug>-<16 hex digits of the key>`."""
        slug = re.sub(r"[^a-z0-9]+", "-", self.prompt.lower()).strip("-")[:40] or "class"
        return Path(root) / f"{slug}-{self.key()[:16]}"


def image_name(index: int) -> str:
    return f"{index:05d}.png"


def cached_class_images(spec: ClassImageSpec, root: str | Path) -> Path | None:
    """The finished folder of `spec` under `root`, or None when it has not been drawn (completely)."""
    folder = spec.folder(root)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    complete = all((folder / image_name(i)).is_file() for i in range(spec.count))
    return folder if manifest.get("key") == spec.key() and complete else None


@torch.no_grad()
def class_images(model, spec: ClassImageSpec, root: str | Path, batch_size: int = 16) -> Path:
    """The folder of `spec`'s class images under `root`: reused when finished, else drawn with `model`
    (the base model of `spec.model_sha256`, in eval mode), missing images only, with a progress bar."""
    folder = cached_class_images(spec, root)
    if folder is not None:
        log.info("class images: reusing %s (%d images of %r)", folder, spec.count, spec.prompt)
        return folder
    folder = spec.folder(root)
    folder.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(spec.count) if not (folder / image_name(i)).is_file()]
    log.info("class images: drawing %d of %d images of %r into %s", len(missing), spec.count, spec.prompt, folder)
    bar = tqdm(total=spec.count, initial=spec.count - len(missing), desc="class images", dynamic_ncols=True)
    for start in range(0, len(missing), batch_size):
        # Consecutive runs of missing indices share a batch; each image still gets its own seed + i.
        for run in _consecutive(missing[start:start + batch_size]):
            latents = generate_latents(model, [spec.prompt] * len(run), seed=spec.seed + run[0], sampler=spec.sampler,
                                       steps=spec.steps, guidance=spec.guidance, height=spec.size, width=spec.size)
            pixels = ((model.decode_latents(latents).float().clamp(-1, 1) + 1) * 127.5).round().byte()
            for index, image in zip(run, pixels.permute(0, 2, 3, 1).cpu().numpy()):
                _save_png(image, folder / image_name(index))
            bar.update(len(run))
    bar.close()
    lines = [json.dumps({"file_name": image_name(i), "text": spec.prompt}) for i in range(spec.count)]
    write_text_atomic(folder / "metadata.jsonl", "\n".join(lines) + "\n")
    write_text_atomic(folder / MANIFEST, json.dumps({"key": spec.key(), **spec.__dict__}, indent=1) + "\n")
    return folder


def _consecutive(indices: list[int]) -> list[list[int]]:
    """[0, 1, 2, 5, 6] -> [[0, 1, 2], [5, 6]]."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _save_png(pixels: np.ndarray, path: Path) -> None:
    """uint8 [H, W, 3] -> PNG at `path`, atomically (a killed run leaves no half-written image)."""
    atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))
