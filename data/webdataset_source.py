"""Image-caption pairs streamed from tar shards, as img2dataset writes them.

A sample is the group of files sharing a key: `000123.jpg` (or .jpeg/.png/.webp) with
`000123.txt`, or `000123.json` holding a "caption" or "text" field. Shards are read with the
`webdataset` package (local paths, `pipe:` commands and URLs alike).

Each epoch the shard list is shuffled with (seed, epoch), identically on every process; shards
are then dealt out round-robin over (distributed rank, DataLoader worker), and each worker runs a
shuffle buffer seeded with (seed, epoch, rank, worker). Crops and flips are seeded by (seed,
epoch, sample key). So an epoch is reproducible, and `skip(n)` can fast-forward a resumed run
past the samples it already trained on without decoding them.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import os
import random
import zlib
from itertools import islice

import torch
import webdataset
from PIL import Image

from data.config import DataConfig
from data.keyed import UNREADABLE_ERRORS
from data.transforms import augmentation_rng, make_item, resize_crop_flip

log = logging.getLogger(__name__)

# Slots of WebDatasetSource._state. It is a tensor in shared memory so that set_epoch() and skip()
# in the main process reach DataLoader workers even when they are persistent (they keep their
# own copy of the dataset object between epochs).
_EPOCH, _EPOCH_WAS_SET, _SKIP_SAMPLES, _SKIP_BATCH_SIZE, _SKIP_EPOCH = range(5)
_UNBOUND = -1  # a skip() not yet tied to an epoch

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")


def expand_shards(pattern: str) -> list[str]:
    """Shard URLs from a brace pattern ("a/{000..009}.tar"), a glob, a directory of .tar files,
    or several of these joined with "::". Local shards must exist."""
    shards: list[str] = []
    missing: list[str] = []
    for url in webdataset.shardlists.expand_urls(pattern):
        if url.startswith(REMOTE_PREFIXES):
            shards.append(url)
        elif os.path.isdir(url):
            shards.extend(sorted(glob.glob(os.path.join(url, "*.tar"))))
        elif glob.has_magic(url):
            matches = sorted(glob.glob(os.path.expanduser(url)))
            if not matches:
                raise FileNotFoundError(f"no shards match {url}")
            shards.extend(matches)
        elif os.path.isfile(os.path.expanduser(url)):
            shards.append(os.path.expanduser(url))
        else:
            missing.append(url)
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} shard(s) of data.path {pattern!r} do not exist, the first being {missing[0]}"
        )
    if not shards:
        raise FileNotFoundError(f"no .tar shards found for data.path {pattern!r}")
    return shards


def distributed_rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def worker_id_and_count() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def caption_of(sample: dict) -> str:
    if "txt" in sample:
        return sample["txt"].decode("utf-8").strip()
    if "json" in sample:
        meta = json.loads(sample["json"])
        return str(meta.get("caption") or meta.get("text") or "").strip()
    return ""


class WebDatasetSource(torch.utils.data.IterableDataset):
    """Streams items ({"image", "caption"[, "hint"]}) from tar shards; see the module docstring.

    Call `set_epoch(e)` before each epoch (like DistributedSampler) and, when resuming inside an
    epoch, `skip(n)` with the number of samples this rank's loader already delivered in it. Both
    reach DataLoader workers, persistent ones included.
    """

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.shards = expand_shards(cfg.path)
        self._state = torch.tensor([0, 0, 0, 1, _UNBOUND], dtype=torch.int64).share_memory_()
        self.num_skipped = 0  # distinct unreadable samples met by this process
        self._reported: set[str] = set()
        _, world = distributed_rank_and_world()
        if len(self.shards) < world:
            raise ValueError(f"{len(self.shards)} shards cannot feed {world} distributed ranks: write more, smaller shards")

    @property
    def epoch(self) -> int:
        return int(self._state[_EPOCH])

    def set_epoch(self, epoch: int) -> None:
        """Choose the shard order and shuffle seeds of the next iteration."""
        state = self._state
        state[_EPOCH] = int(epoch)
        if state[_SKIP_EPOCH] == _UNBOUND and state[_SKIP_SAMPLES] and not state[_EPOCH_WAS_SET]:
            state[_SKIP_EPOCH] = int(epoch)  # skip() came first: it belongs to this epoch
        state[_EPOCH_WAS_SET] = 1

    def skip(self, n: int, batch_size: int = 1) -> None:
        """Leave out the first `n` samples this rank would yield in the current (or, if
        set_epoch was not called yet, the first set) epoch.

        With DataLoader workers, batches come round-robin from the workers; giving the loader's
        `batch_size` makes each worker skip exactly the batches it had already delivered.
        """
        if n < 0 or batch_size < 1:
            raise ValueError(f"skip needs n >= 0 and batch_size >= 1, got n={n}, batch_size={batch_size}")
        state = self._state
        state[_SKIP_SAMPLES], state[_SKIP_BATCH_SIZE] = int(n), int(batch_size)
        state[_SKIP_EPOCH] = self.epoch if state[_EPOCH_WAS_SET] else _UNBOUND

    def _samples_to_skip(self, worker: int, workers: int) -> int:
        samples, batch_size, skip_epoch = (int(self._state[k]) for k in (_SKIP_SAMPLES, _SKIP_BATCH_SIZE, _SKIP_EPOCH))
        if not samples or skip_epoch not in (_UNBOUND, self.epoch):
            return 0
        batches, remainder = divmod(samples, batch_size)
        # Batch b came from worker b % workers; the partial batch (if any) from the next one.
        mine = batches // workers + int(worker < batches % workers)
        return mine * batch_size + (remainder if worker == batches % workers else 0)

    def shards_for(self, rank: int, world: int, worker: int, workers: int) -> list[str]:
        """The shards one (rank, worker) reads this epoch."""
        order = list(self.shards)
        if self.cfg.split == "train":
            random.Random(f"{self.cfg.seed}/{self.epoch}").shuffle(order)
        return order[rank * workers + worker :: world * workers]

    def __iter__(self):
        rank, world = distributed_rank_and_world()
        worker, workers = worker_id_and_count()
        shards = self.shards_for(rank, world, worker, workers)
        if not shards:
            log.warning("worker %d of rank %d has no shard (%d shards for %d readers): it yields nothing",
                        worker, rank, len(self.shards), world * workers)
            return
        raw = webdataset.tarfile_samples(iter([{"url": url} for url in shards]), handler=self._report_broken_shard)
        if self.cfg.split == "train" and self.cfg.shuffle_buffer > 0:
            rng = random.Random(f"{self.cfg.seed}/{self.epoch}/{rank}/{worker}")
            raw = webdataset.shuffle(self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer, rng=rng)(raw)
        raw = islice(raw, self._samples_to_skip(worker, workers), None)
        if torch.utils.data.get_worker_info() is None:
            self._state[_SKIP_SAMPLES] = 0  # iterating this very object (no workers): the skip is used up
        seen = yielded = 0
        for sample in raw:
            seen += 1
            item = self._decode(sample)
            if item is not None:
                yielded += 1
                yield item
        if seen and not yielded:
            raise ValueError(f"no readable image in {seen} samples of shards {shards[0]} .. {shards[-1]}")

    def _decode(self, sample: dict) -> dict | None:
        where = f"{sample.get('__url__')}:{sample.get('__key__')}"
        extension = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        try:
            if extension is None:
                raise ValueError(f"no image file (.{', .'.join(IMAGE_EXTENSIONS)}) in the sample")
            with Image.open(io.BytesIO(sample[extension])) as file:
                image = file.convert("RGB")
            caption = caption_of(sample)
        except UNREADABLE_ERRORS as error:
            if where not in self._reported:
                self._reported.add(where)
                self.num_skipped += 1
                log.warning("skipping unreadable sample %s: %s", where, error)
            return None
        key_hash = zlib.crc32(where.encode("utf-8"))
        rng = augmentation_rng(self.cfg.seed, self.epoch, key_hash)
        image, _ = resize_crop_flip(image, self.cfg.size, self.cfg.crop, self.cfg.flip, rng)
        return make_item(image, caption, self.cfg)

    def _report_broken_shard(self, error: Exception) -> bool:
        if str(error) not in self._reported:
            self._reported.add(str(error))
            log.warning("skipping the rest of a broken shard: %s", error)
        return True  # keep going with the next shard
