"""Encode a dataset through the frozen autoencoder once, then train stage 2 on the cached latents.

On a CPU the autoencoder's encoder costs as much as the U-Net step, so caching makes stage-2
training several times faster. The cache keeps each sample's posterior mean and std, so training
still draws a fresh z = mean + std * eps every time (as LDM does), and it is keyed by a fingerprint
of the stage-1 file and the data config: a changed autoencoder or data set never reuses stale latents.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm import tqdm

from common.weights import file_sha256, load_weights, read_metadata, save_weights

log = logging.getLogger(__name__)


class LatentCache(Dataset):
    """Cached posteriors: items {"latent_mean", "latent_std": [C, h, w], "caption": str}; any int key (key % N)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, captions: list[str]):
        self.mean, self.std, self.captions = mean, std, captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, key: int) -> dict:
        i = key % len(self)
        return {"latent_mean": self.mean[i], "latent_std": self.std[i], "caption": self.captions[i]}


def fingerprint(stage1_file: str | Path, data_cfg, dataset: Dataset | None = None) -> str:
    """sha256 over the stage-1 file's bytes, the data config and, when given, the data set's
    samples (their `content_key`: for a folder, each file's path, size, time and caption), so that
    adding or changing images builds a new cache instead of reusing a stale one."""
    h = hashlib.sha256(file_sha256(stage1_file).encode())
    h.update(json.dumps(asdict(data_cfg), sort_keys=True).encode())
    if dataset is not None and hasattr(dataset, "content_key"):
        for index in range(len(dataset)):
            h.update(dataset.content_key(index).encode() + b"\0")
    return h.hexdigest()


@torch.no_grad()
def latent_cache(dataset: Dataset, autoencoder: torch.nn.Module, key: str, cache_dir: str | Path,
                 batch_size: int = 32, num_workers: int = 0) -> LatentCache:
    """The cache for `key` (see `fingerprint`), loading it when present, else encoding `dataset`."""
    if isinstance(dataset, IterableDataset):
        raise ValueError("latent_cache needs a map-style dataset; streamed WebDataset shards cannot be cached")
    if getattr(dataset, "cfg", None) is not None and (dataset.cfg.crop == "random" or dataset.cfg.flip):
        raise ValueError("latent_cache stores one view per image: set data.crop=center and data.flip=false, "
                         "or turn latent_cache off")
    path = Path(cache_dir) / f"latents-{key[:16]}.safetensors"
    if path.is_file() and read_metadata(path).get("fingerprint") == key:
        tensors = load_weights(path)
        log.info("latent cache: %s (%d samples)", path, len(tensors["mean"]))
        return LatentCache(tensors["mean"], tensors["std"], read_metadata(path)["captions"])

    device = next(autoencoder.parameters()).device
    means, stds, captions = [], [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for batch in tqdm(loader, desc="encoding latent cache", dynamic_ncols=True):
        mean, std = posterior_mean_std(autoencoder, batch["image"].to(device))
        means.append(mean.cpu())
        stds.append(std.cpu())
        captions.extend(batch["caption"])
    mean, std = torch.cat(means), torch.cat(stds)
    save_weights({"mean": mean, "std": std}, path, {"fingerprint": key, "captions": captions})
    log.info("latent cache: wrote %s (%d samples)", path, len(captions))
    return LatentCache(mean, std, captions)


def posterior_mean_std(autoencoder: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the latent posterior [B, C, h, w]; a VQ model's latents are exact (std 0)."""
    posterior = autoencoder.encode(images)
    if hasattr(posterior, "std"):
        return posterior.mean, posterior.std
    mean = autoencoder.encode_latents(images, sample=False)
    return mean, torch.zeros_like(mean)
