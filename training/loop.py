"""The one training loop shared by stage 1, stage 2 and ControlNet.

A model plugs in as a `TrainingTask`: it owns its modules and optimizers and yields one loss per
optimizer for each batch. The loop does the rest: accelerate (devices, processes, autocast, gradient
accumulation), gradient averaging across processes, clipping, EMA, logging, image grids, atomic
checkpoints and exact resume.

Modules are not wrapped in DistributedDataParallel: a GAN's generator and discriminator losses call
into modules through methods other than `forward`, which DDP does not see. Instead the loop averages
each optimizer's gradients across processes before it steps, which works for any task.

With `train.shard=fsdp` the task's trained modules are sharded over the processes instead (FSDP2, see
`training.sharding`): FSDP averages their gradients, and checkpoints hold full tensors as before.
"""
from __future__ import annotations

import itertools
import logging
import math
import random
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch
import torch.distributed as dist
import torchvision
import yaml
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm import tqdm

from common.cli import Interrupted
from common.config import ConfigError, at_least, check_range
from common.weights import write_text_atomic
from training.checkpoint import CheckpointDir, Position, load_checkpoint, save_checkpoint
from training.ema import EMA
from training.finite import NonFiniteLossError, NonFiniteStateError, nonfinite
from training.interrupt import InterruptFlag
from training.precision import resolve_mixed_precision
from training.sharding import is_sharded, local_views, shard_task, shardable_modules

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    batch_size: int = 8
    max_steps: int = 1000
    max_minutes: float | None = None  # also stop (and save) after this much wall time, e.g. for benchmarks
    grad_accum: int = 1
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = "no"  # auto: training.precision
    grad_clip: float | None = 1.0
    ema_decay: float | None = None
    seed: int = 0
    num_workers: int = 0
    log_every: int = 10
    image_every: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    shard: Literal["none", "fsdp"] = "none"  # fsdp: the trained modules' weights, gradients and optimizer
    # state split over the processes (torch FSDP2), for models whose training does not fit one device

    def __post_init__(self):
        for name in ("batch_size", "max_steps", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints"):
            at_least(name, getattr(self, name), 1)
        for name in ("image_every", "num_workers", "seed"):
            at_least(name, getattr(self, name), 0)
        if self.max_minutes is not None:
            check_range("max_minutes", self.max_minutes, low=0, low_inclusive=False)
        if self.grad_clip is not None:
            check_range("grad_clip", self.grad_clip, low=0, low_inclusive=False)
        if self.ema_decay is not None:
            check_range("ema_decay", self.ema_decay, low=0, high=1, high_inclusive=False)
        if self.shard == "fsdp" and self.mixed_precision == "fp16":
            raise ValueError("train.shard=fsdp does not support mixed_precision=fp16 (its loss scaler would see "
                             "one process's shards only); use bf16")


class TrainingTask:
    """What a model contributes to the loop. Subclasses set the attributes in `setup`.

    modules:    everything saved in a checkpoint, by name, on `accelerator.device`
    optimizers: by name, passed through `accelerator.prepare`; `training_step` yields losses under these names
    schedulers: optional LR schedulers, by optimizer name
    ema_target: the module whose weights the EMA follows (or None)
    shardable:  names of `modules` that train.shard=fsdp may shard: modules the task calls through their
                `forward` only (FSDP gathers a module's weights in its forward); the default, none, refuses it
    """

    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler]
    ema_target: nn.Module | None = None
    shardable: tuple[str, ...] = ()

    def setup(self, accelerator) -> None:
        raise NotImplementedError

    def training_step(self, batch: dict, step: int) -> Iterator[tuple[str, torch.Tensor, dict[str, float]]]:
        """Yield (optimizer name, scalar loss, scalars to log) once per optimizer, in update order.

        The loop steps that optimizer before resuming the generator, so a later loss sees updated
        weights (the discriminator update after the generator's, as in taming/LDM).
        """
        raise NotImplementedError

    def images(self, batch: dict, ema: EMA | None) -> dict[str, torch.Tensor]:
        """Image grids to log, {name: [N, 3, H, W] in [-1, 1]}. Optional."""
        return {}

    def extra_state(self) -> dict:
        """Further state to resume exactly (e.g. a timestep sampler's loss history)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass


def train(task: TrainingTask, dataset: Dataset, cfg: TrainConfig, resume: bool = False,
          run_config: dict | None = None) -> Path:
    """Train until `cfg.max_steps`; return the folder of the last checkpoint.

    `run_config` (the whole run's config) is written to `<output_dir>/config.yaml` once the run has
    really started: after its model is built and a --resume has loaded, never for a rejected config.
    A Ctrl-C or SIGTERM saves the step reached and raises `Interrupted`.
    """
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_mixed_precision(cfg.mixed_precision, device_type)
    if cfg.mixed_precision == "auto":
        log.info("train.mixed_precision=auto: %s on %s", "bf16" if precision == "bf16" else "float32", device_type)
    accelerator = Accelerator(
        cpu=device_type == "cpu",  # several CPU processes (torchrun) then join over gloo
        gradient_accumulation_steps=cfg.grad_accum,
        mixed_precision=precision,
        step_scheduler_with_optimizer=False,
    )
    if precision == "fp16" and accelerator.scaler is None:
        log.warning("train.mixed_precision=fp16 runs in fp32 on %s (accelerate has no fp16 loss scaling there); "
                    "bf16 is the low-precision setting for CPUs", accelerator.device)
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ConfigError(f"accelerate's {accelerator.distributed_type.value} config is not used by these trainers "
                          "(they do not hand their models to accelerate): launch with a multi-GPU config, e.g. "
                          "configs/accelerate/fsdp-8gpu.yaml, and set train.shard=fsdp to shard the model")
    seed_everything(cfg.seed + accelerator.process_index)
    task.setup(accelerator)
    ema = EMA(task.ema_target, cfg.ema_decay) if cfg.ema_decay and task.ema_target else None
    if cfg.shard == "fsdp":
        names = shardable_modules(task)  # a task that cannot be sharded is refused on any number of processes
        if accelerator.num_processes > 1:
            shard_task(task, names, ema, accelerator)
        else:
            log.warning("train.shard=fsdp with one process: nothing to split it over; the modules stay whole")
    checkpoints = CheckpointDir(Path(cfg.output_dir) / "checkpoints", keep=cfg.keep_checkpoints)
    pos = _resume(checkpoints, task, ema, accelerator) if resume else Position()
    if run_config is not None and accelerator.is_main_process:
        write_text_atomic(Path(cfg.output_dir) / "config.yaml", yaml.safe_dump(run_config, sort_keys=False))
    try:
        _Run(task, ema, cfg, accelerator, checkpoints, pos, last_saved=pos.step if resume else -1).run(dataset)
    except Interrupted:  # every process agreed on the stop
        _leave_process_group(accelerator)
        raise
    _leave_process_group(accelerator)
    return checkpoints.latest()


def _leave_process_group(accelerator) -> None:
    """All processes done with each other: leave the group together. A process that exits while the main
    one still exports, its gloo group alive, can abort in teardown ('terminate called without an active
    exception', exit -6)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()


def _resume(checkpoints: CheckpointDir, task: TrainingTask, ema: EMA | None, accelerator) -> Position:
    latest = checkpoints.latest()
    if latest is None:
        log.warning("--resume: no checkpoint in %s; starting from scratch", checkpoints.root)
        return Position()
    pos = load_checkpoint(latest, task, ema, accelerator)
    log.info("resumed from %s (step %d)", latest, pos.step)
    return pos


class _Meter:
    """Loss sums and throughput since the last log line."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.tic, self.samples, self.micro = time.perf_counter(), 0, 0

    def add(self, logs: dict[str, float]) -> None:
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def count(self, samples: int) -> None:
        self.samples += samples
        self.micro += 1

    def means(self) -> dict[str, float]:
        return {k: v / self.micro for k, v in self.sums.items()}

    def rate(self) -> float:
        return self.samples / (time.perf_counter() - self.tic)


class _Run:
    """One call of `train` from its (resumed) position on: the epochs, steps, logs and saves."""

    def __init__(self, task: TrainingTask, ema: EMA | None, cfg: TrainConfig, accelerator,
                 checkpoints: CheckpointDir, pos: Position, last_saved: int):
        self.task, self.ema, self.cfg, self.accelerator = task, ema, cfg, accelerator
        self.checkpoints, self.pos, self.last_saved = checkpoints, pos, last_saved
        self.out = Path(cfg.output_dir)
        main = accelerator.is_main_process
        self.writer = _tensorboard(self.out) if main else None
        self.bar = tqdm(total=cfg.max_steps, initial=pos.step, disable=not main, dynamic_ncols=True)
        self.interrupted = InterruptFlag()
        self.param_names = {id(p): f"{m}.{n}" for m, module in task.modules.items()
                            for n, p in module.named_parameters()}
        self.sharded = any(is_sharded(module) for module in task.modules.values())
        self.meter = _Meter()
        self.started, self.out_of_time = self.meter.tic, False

    def run(self, dataset: Dataset) -> None:
        """Epochs until max_steps, the time limit or a Ctrl-C; an interrupted run saves where it stopped."""
        try:
            while self.pos.step < self.cfg.max_steps and not self.interrupted and not self.out_of_time:
                self.epoch(dataset)
        finally:
            self.bar.close()
            if self.writer:
                self.writer.close()
            self.interrupted.restore()
        if self.interrupted:
            if self.pos.step != self.last_saved:
                self.save()
            raise Interrupted(f"{self.interrupted.name} at step {self.pos.step}: saved {self.checkpoints.latest()}; "
                              f"no model exported; continue with --resume", self.interrupted.signal_number)

    def epoch(self, dataset: Dataset) -> None:
        """The rest of the current epoch, or up to a stop; a finished epoch moves the position to the next."""
        for batch in _epoch_batches(dataset, self.cfg, self.pos, self.accelerator):
            self.pos.batch_in_epoch += 1
            self.micro_step(batch)
            if self.accelerator.sync_gradients and self.finish_step(batch):
                return
        self.pos.epoch += 1
        self.pos.batch_in_epoch = 0

    def micro_step(self, batch: dict) -> None:
        """Forward and backward of each of the task's losses on one batch; optimizers step once accumulation is done."""
        accelerator = self.accelerator
        with accelerator.accumulate():
            for name, loss, logs in _autocast_steps(self.task.training_step(batch, self.pos.step), accelerator):
                if not self.agree(bool(torch.isfinite(loss.detach()).all()), all_of=True):  # every rank stops
                    raise NonFiniteLossError(
                        f"loss '{name}' is {loss.item()} at step {self.pos.step}; stopping without saving "
                        f"(last good checkpoint: {self.checkpoints.latest() or 'none'})"
                    )
                accelerator.backward(loss)
                _optimizer_step(self.task, name, accelerator, self.cfg.grad_clip)
                if accelerator.sync_gradients:
                    self.check_finite(name)
                self.meter.add(logs)
            if accelerator.sync_gradients and accelerator.scaler is not None:
                accelerator.scaler.update()  # once per step, after every optimizer's: see _optimizer_step
        self.meter.count(_batch_size(batch) * accelerator.num_processes)

    def check_finite(self, name: str) -> None:
        """Stop when optimizer `name`'s step left a parameter NaN or infinite (e.g. an infinite learning rate)."""
        params = [(self.param_names.get(id(p), "?"), p)
                  for g in self.task.optimizers[name].param_groups for p in g["params"]]
        if self.sharded:  # each process checks its shards; every process stops when one finds a bad value
            bad = nonfinite(local_views(params))
            if self.agree(bool(bad)) and not bad:
                bad = ["a shard of another process"]
        else:
            bad = nonfinite(params)
        if bad:
            raise NonFiniteStateError(
                f"optimizer '{name}' made {len(bad)} weights NaN or infinite at step {self.pos.step + 1} "
                f"(e.g. {bad[0]}; check optim.lr); stopping without saving "
                f"(last good checkpoint: {self.checkpoints.latest() or 'none'})")

    def finish_step(self, batch: dict) -> bool:
        """EMA, logs, images and checkpoints after an optimizer step; True when the run is to stop."""
        pos, cfg = self.pos, self.cfg
        pos.step += 1
        if self.ema is not None:
            self.ema.update(self.task.ema_target)
        self.bar.update(1)
        if pos.step % cfg.log_every == 0 or pos.step == cfg.max_steps:
            self.log_scalars()
        main = self.accelerator.is_main_process
        if cfg.image_every and pos.step % cfg.image_every == 0 and (main or self.sharded):
            # A sharded model runs on every process (each lends its shards); the main one writes.
            _write_images(self.task, batch, self.ema, self.out, pos.step, self.writer, write=main)
        if pos.step % cfg.checkpoint_every == 0 or pos.step == cfg.max_steps:
            self.save()
        out_of_time = cfg.max_minutes is not None and time.perf_counter() - self.started > 60 * cfg.max_minutes
        # Every rank stops at the same step: when one of them is signalled or out of time.
        self.out_of_time = self.agree(out_of_time)
        if self.agree(bool(self.interrupted)):
            self.interrupted.set()
        stop = pos.step >= cfg.max_steps or bool(self.interrupted) or self.out_of_time
        if stop and self.out_of_time and pos.step != self.last_saved:
            self.save()
        return stop

    def agree(self, flag: bool, all_of: bool = False) -> bool:
        """`flag` of every process combined: any of them (all of them with `all_of`); one collective."""
        if self.accelerator.num_processes == 1:
            return flag
        value = torch.tensor([float(flag != all_of)], device=self.accelerator.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item()) != all_of

    def log_scalars(self) -> None:
        """Mean losses over every process's batches and samples per second since the last call, to the bar
        and TensorBoard."""
        rate, means = self.meter.rate(), self.meter.means()
        if self.accelerator.num_processes > 1 and means:
            values = torch.tensor(list(means.values()), dtype=torch.float64, device=self.accelerator.device)
            dist.all_reduce(values)
            means = dict(zip(means, (values / self.accelerator.num_processes).tolist()))
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in list(means.items())[:4]} | {"img/s": f"{rate:.1f}"})
        if self.writer:
            for k, v in means.items():
                self.writer.add_scalar(k, v, self.pos.step)
            self.writer.add_scalar("samples_per_second", rate, self.pos.step)
        self.meter.reset()

    def save(self) -> None:
        """A checkpoint of the current step."""
        save_checkpoint(self.checkpoints, self.pos, self.task, self.ema, self.accelerator)
        self.last_saved = self.pos.step


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and random. Call it before building models too, so their init is reproducible."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _autocast_steps(steps: Iterator, accelerator) -> Iterator:
    """Run each piece of the task's step under autocast, but not the backward passes between them."""
    while True:
        with accelerator.autocast():
            item = next(steps, None)
        if item is None:
            return
        yield item


def _optimizer_step(task: TrainingTask, name: str, accelerator, grad_clip: float | None) -> None:
    """Average, clip and step optimizer `name` when an accumulation ends (AcceleratedOptimizer skips the others).

    With fp16's GradScaler only this optimizer's gradients are unscaled, and the scale is left for
    `micro_step` to update once every optimizer has stepped: accelerate's clip_grad_norm_ unscales all
    prepared optimizers and AcceleratedOptimizer.step updates the scale after each, so a later optimizer's
    earlier micro-batches were unscaled twice, or with another scale than its last (issue 24).
    """
    optimizer, scaler = task.optimizers[name], accelerator.scaler
    inner = optimizer.optimizer if isinstance(optimizer, AcceleratedOptimizer) else optimizer
    if accelerator.sync_gradients:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if accelerator.num_processes > 1:  # (FSDP has averaged sharded parameters' gradients)
            _average_gradients([p for p in params if not isinstance(p.grad, DTensor)], accelerator.num_processes)
        if grad_clip:
            if scaler is not None:
                scaler.unscale_(inner)  # the scaler records it, so its step does not unscale again
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if scaler is not None and accelerator.sync_gradients:
        scaler.step(inner)
    else:
        optimizer.step()
    if name in task.schedulers and accelerator.sync_gradients:
        with warnings.catch_warnings():
            # The schedule follows the step count, also past a step the fp16 scaler skipped (an inf
            # gradient): torch's "scheduler before optimizer" warning is expected there.
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            task.schedulers[name].step()
    optimizer.zero_grad(set_to_none=True)


def _average_gradients(params: list[nn.Parameter], world: int) -> None:
    """All-reduce gradients in one flat buffer per dtype (one collective instead of one per tensor)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()


def _epoch_batches(dataset: Dataset, cfg: TrainConfig, pos: Position, accelerator) -> Iterator[dict]:
    """This epoch's batches from `pos.batch_in_epoch` on, on the accelerator's device, each with the
    keys of its samples as "sample_key" [B] (what their random draws are seeded by).

    A fresh DataLoader with its own seeded generator each epoch, so making one (at a resume,
    mid-epoch) does not draw from the global RNG that the training step uses.
    """
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + pos.epoch)
    rank, world, size = accelerator.process_index, accelerator.num_processes, cfg.batch_size
    if isinstance(dataset, IterableDataset):
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(pos.epoch)
        if hasattr(dataset, "skip"):
            dataset.skip(pos.batch_in_epoch * size, batch_size=size)
        loader = DataLoader(dataset, batch_size=size, num_workers=cfg.num_workers, generator=generator)
        # A stream has no keys: number its samples by position in the epoch's global batches.
        keys = (torch.arange(size) + (b * world + rank) * size + (pos.epoch << 40)
                for b in itertools.count(pos.batch_in_epoch))
    else:
        sampler = EpochKeySampler(len(dataset), size, pos.epoch, cfg.seed, rank, world, pos.batch_in_epoch)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers, generator=generator,
                            persistent_workers=False, pin_memory=accelerator.device.type == "cuda")
        keys = (torch.tensor(batch) for batch in sampler)
    for batch, sample_keys in zip(loader, keys):
        batch = _to_device(batch, accelerator.device)
        batch["sample_key"] = sample_keys
        yield batch


class EpochKeySampler(torch.utils.data.Sampler):
    """Batches of dataset keys for one epoch: key = epoch * N + permuted index.

    The permutation depends only on (seed, epoch); datasets derive augmentation randomness from the
    key, so a resumed run sees exactly the data an uninterrupted one would. Each process takes
    every world-th batch; the last incomplete batch is dropped.
    """

    def __init__(self, n: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        if n < batch_size * world:
            raise ValueError(f"dataset has {n} samples, fewer than one global batch ({batch_size} x {world})")
        self.n, self.batch_size, self.epoch, self.seed = n, batch_size, epoch, seed
        self.rank, self.world, self.start = rank, world, start

    def _all_batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 7_919 + self.epoch)
        keys = (torch.randperm(self.n, generator=g) + self.epoch * self.n).tolist()
        per_step = self.batch_size * self.world
        full = [keys[i: i + per_step] for i in range(0, self.n - per_step + 1, per_step)]
        return [b[self.rank * self.batch_size: (self.rank + 1) * self.batch_size] for b in full]

    def __iter__(self):
        return iter(self._all_batches()[self.start:])

    def __len__(self) -> int:
        return self.n // (self.batch_size * self.world) - self.start


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list) and batch and isinstance(batch[0], torch.Tensor):
        return [_to_device(v, device) for v in batch]
    return batch


def _batch_size(batch: dict) -> int:
    for v in batch.values():
        if isinstance(v, torch.Tensor):
            return v.shape[0]
        if isinstance(v, list):
            return len(v)
    return 0


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but a broken install should not stop training
        log.warning("tensorboard not importable; scalars go to the progress bar only")
        return None
    return SummaryWriter(str(out / "tensorboard"))


@torch.no_grad()
def _write_images(task: TrainingTask, batch: dict, ema: EMA | None, out: Path, step: int, writer,
                  write: bool = True) -> None:
    for name, images in task.images(batch, ema).items():
        if not write:
            continue
        grid = torchvision.utils.make_grid(images.float().clamp(-1, 1).cpu(), nrow=int(math.sqrt(len(images))) or 1,
                                           normalize=True, value_range=(-1, 1))
        path = out / "images" / f"{name}_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        torchvision.utils.save_image(grid, path)
        if writer:
            writer.add_image(name, grid, step)
