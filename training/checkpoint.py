"""A training run's checkpoints: folders `step_XXXXXXXX/`, each complete or absent, and what goes in them.

Each holds the task's modules and EMA (safetensors), its optimizer, scheduler and extra state, fp16's
GradScaler state, and the position and RNG states (`torch.save`, read back with weights_only=True).
`trainer_state.pt` is written last, so a folder with it is complete; a save killed half-way leaves a
`.step_*` temporary folder, removed at the next start.

Sharded modules (train.shard=fsdp) are saved as full tensors, gathered by every process for the main one,
so a checkpoint is the same whether its run was sharded or not, and loads into either.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from common.cli import RunFailed
from common.config import ConfigError
from common.disk import check_free_space, write_errors_explained
from common.weights import (load_state_dict_strict, load_torch, load_weights, read_metadata, save_torch, save_weights,
                            shared_mode)
from training.finite import NonFiniteStateError, nonfinite, state_tensors
from training.sharding import gather, is_sharded, local_shards, local_views, optimizer_shards

if TYPE_CHECKING:
    from training.ema import EMA
    from training.loop import TrainingTask

log = logging.getLogger(__name__)

SAVE_MARGIN = 1 << 20  # bytes a checkpoint needs beyond its tensors (file headers, RNG and task state)


class CheckpointDir:
    """`<run>/checkpoints/step_XXXXXXXX/` folders, each complete or absent; keeps the last `keep`."""

    def __init__(self, root: str | Path, keep: int = 3):
        self.root = Path(root)
        self.keep = keep

    def steps(self) -> list[int]:
        """The steps with a complete folder, in increasing order."""
        if not self.root.is_dir():
            return []
        found = []
        for d in self.root.iterdir():
            if d.is_dir() and d.name.startswith("step_") and (d / "trainer_state.pt").is_file():
                found.append(int(d.name[len("step_"):]))
        return sorted(found)

    def latest(self) -> Path | None:
        """The folder of the last complete step, or None."""
        steps = self.steps()
        return self.path(steps[-1]) if steps else None

    def remove_leftovers(self) -> list[Path]:
        """Delete the temporary folders of saves that were killed half-way; return what was removed.

        Only call it while holding the run's lock: a live save's temporary folder looks the same."""
        if not self.root.is_dir():
            return []
        leftovers = sorted(d for d in self.root.iterdir() if d.name.startswith(".step_"))
        for d in leftovers:
            if d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
            else:
                d.unlink(missing_ok=True)
        if leftovers:
            log.info("removed %d unfinished checkpoint(s) left by interrupted saves: %s",
                     len(leftovers), ", ".join(d.name for d in leftovers))
        return leftovers

    def path(self, step: int) -> Path:
        """Where `step`'s folder is (or would be)."""
        return self.root / f"step_{step:08d}"

    def write(self, step: int, fill) -> Path:
        """Call `fill(folder)` on a temporary folder, then rename it to step_XXXXXXXX and prune old ones."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path(step)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".step_{step:08d}."))
        try:
            fill(tmp)
            os.chmod(tmp, shared_mode(directory=True))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.steps()[: -self.keep]:
            shutil.rmtree(self.path(old), ignore_errors=True)
        return final


@dataclass
class Position:
    """Where a run is: what a checkpoint records beside the weights, so a resume sees the same data."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed



def save_checkpoint(checkpoints: CheckpointDir, pos: Position, task: TrainingTask, ema: EMA | None,
                    accelerator) -> None:
    """Write step `pos.step`'s checkpoint, if the whole state is finite and the disk has room for it.
    The main process writes (sharded modules' tensors gathered from every process, one file at a time);
    when it fails, every process raises, so none waits for it forever."""
    accelerator.wait_for_everyone()
    rngs = [_rng_state()]
    if accelerator.num_processes > 1:  # every process's streams, so that each resumes its own
        rngs = [None] * accelerator.num_processes
        dist.all_gather_object(rngs, _rng_state())
    sharded = any(is_sharded(module) for module in task.modules.values())
    failure = None
    if accelerator.is_main_process or sharded:
        try:
            _write_checkpoint(checkpoints, pos, task, ema, accelerator, dict(enumerate(rngs)), sharded)
        except (RunFailed, ConfigError) as error:
            failure = error
    if accelerator.num_processes > 1:
        failed = torch.tensor([float(failure is not None)], device=accelerator.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item() and failure is None:
            raise RunFailed(f"the main process could not save the checkpoint of step {pos.step} (its error says why)")
    if failure is not None:
        raise failure
    accelerator.wait_for_everyone()


def _write_checkpoint(checkpoints: CheckpointDir, pos: Position, task: TrainingTask, ema: EMA | None, accelerator,
                      rngs: dict[int, dict], sharded: bool = False) -> None:
    """The main process writes the checkpoint; with `sharded` every process runs this, to check its
    shards and lend them to the main process's files."""
    modules = {name: module.state_dict() for name, module in task.modules.items()}
    optimizers = {k: o.state_dict() for k, o in task.optimizers.items()}
    ema_state = ema.state_dict() if ema is not None else {}
    tensors = [*state_tensors("", modules), *state_tensors("ema", ema_state), *state_tensors("optimizer", optimizers)]
    bad = nonfinite(local_views(tensors) if sharded else tensors)
    if sharded:  # every process checks its shards, and all of them refuse when one finds a bad value
        flag = torch.tensor([float(bool(bad))], device=accelerator.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not bad:
            bad = ["a shard of another process"]
    if bad:
        raise NonFiniteStateError(f"{len(bad)} tensors are NaN or infinite at step {pos.step} (e.g. {bad[0]}); "
                                  f"not saved (last good checkpoint: {checkpoints.latest() or 'none'})")
    main = accelerator.is_main_process
    parts = _files(modules, ema_state if ema is not None else None, optimizers, sharded, keep=main)
    if not main:
        for _ in parts:  # lend the shards of each file in turn
            pass
        return

    def fill(folder: Path) -> None:
        for kind, name, state in parts:
            if kind == "module":
                save_weights(state, folder / f"{name}.safetensors")
            elif kind == "ema":
                save_weights(state, folder / "ema.safetensors", {"num_updates": ema.num_updates})
            else:
                save_torch({
                    "optimizers": state,
                    "schedulers": {k: s.state_dict() for k, s in task.schedulers.items()},
                    "task": task.extra_state(),
                    "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else {},
                }, folder / "optimizers.pt")
            del state  # (a gathered file's tensors go before the next file's come)
        save_torch({"step": pos.step, "epoch": pos.epoch, "batch_in_epoch": pos.batch_in_epoch,
                    "rng": rngs}, folder / "trainer_state.pt")

    what = f"checkpoint of step {pos.step}"
    advice = (f"free space there or lower train.keep_checkpoints ({checkpoints.keep}), then --resume "
              f"(last good checkpoint: {checkpoints.latest() or 'none'})")
    needed = sum(t.numel() * t.element_size() for _, t in tensors) + SAVE_MARGIN  # (a DTensor's: its full size)
    try:
        checkpoints.root.mkdir(parents=True, exist_ok=True)
        with write_errors_explained(what, checkpoints.root, advice):
            check_free_space(checkpoints.root, needed, what, advice)
            checkpoints.write(pos.step, fill)
    finally:
        for _ in parts:  # a failed save still takes part in the gathers the other processes wait in
            pass


def _files(modules: dict, ema_state: dict | None, optimizers: dict, sharded: bool, keep: bool) -> Iterator:
    """(kind, name, state) of each file in writing order: the modules', the EMA's, the optimizers'. With
    `sharded`, each state is gathered from every process's shards when its turn comes (kept by `keep`)."""
    files = [("module", name, state) for name, state in modules.items()]
    if ema_state is not None:
        files.append(("ema", "ema", ema_state))
    files.append(("optimizers", "optimizers", optimizers))
    for kind, name, state in files:
        yield kind, name, gather(state, keep) if sharded else state


def load_checkpoint(folder: Path, task: TrainingTask, ema: EMA | None, accelerator) -> Position:
    """Load a checkpoint folder into the task, EMA and this process's RNGs; return where it stopped."""
    for name, module in task.modules.items():
        path = folder / f"{name}.safetensors"
        weights = load_weights(path)
        if is_sharded(module):  # every process reads the full tensors and keeps its shards
            weights = local_shards(weights, module.state_dict())
        load_state_dict_strict(module, weights, path, what=f"the task's module '{name}'")
    if ema is not None:
        path = folder / "ema.safetensors"
        weights = load_weights(path)
        if is_sharded(ema.shadow):
            weights = local_shards(weights, ema.state_dict())
        ema.load_state_dict(weights, int(read_metadata(path).get("num_updates", 0)), source=path)
    states = load_torch(folder / "optimizers.pt")
    for k, o in task.optimizers.items():
        saved = states["optimizers"][k]
        if any(isinstance(p, DTensor) for group in o.param_groups for p in group["params"]):
            saved = optimizer_shards(o, saved)
        o.load_state_dict(saved)
    for k, s in task.schedulers.items():
        s.load_state_dict(states["schedulers"][k])
    task.load_extra_state(states.get("task", {}))
    # Absent from checkpoints written before it was saved, and from bf16 / fp32 runs: the scaler starts fresh.
    if accelerator.scaler is not None and states.get("scaler"):
        accelerator.scaler.load_state_dict(states["scaler"])
    trainer = load_torch(folder / "trainer_state.pt")
    rng = trainer["rng"].get(accelerator.process_index)
    if rng is not None:
        _set_rng_state(rng)
    return Position(trainer["step"], trainer["epoch"], trainer["batch_in_epoch"])


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(random.getstate()[1]) + [random.getstate()[0]] + [random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, key, *rest = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), *rest))
    py = state["python"]
    random.setstate((py[-2], tuple(py[:-2]), py[-1]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
