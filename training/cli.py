"""What the three trainers' command lines share: their arguments and the start of a run."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TypeVar

import torch
from accelerate import PartialState

from common.cli import ArgumentParser
from common.config import ConfigError, check_range, load_config
from common.disk import write_errors_explained
from training.checkpoint import CheckpointDir
from training.loop import seed_everything
from training.run_lock import lock_run_folder

T = TypeVar("T")

log = logging.getLogger(__name__)


class TrainArgumentParser(ArgumentParser):
    """Options may come between the key=value overrides (`... train.max_steps=10 --resume lr=1e-4`)."""

    def parse_args(self, args=None, namespace=None):
        return self.parse_intermixed_args(args, namespace)


def train_parser(description: str) -> ArgumentParser:
    """--config, --resume and trailing key=value overrides, as all three trainers take them."""
    parser = TrainArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML file under configs/")
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    return parser


def start_run(args: argparse.Namespace, schema: type[T]) -> T:
    """The run's config from --config and overrides, its output folder locked for this process, and
    everything seeded (before any model is built, so initial weights are reproducible).

    A folder that already holds checkpoints is only continued (--resume), never silently trained
    over; partial writes left there by a killed run are removed. The config is recorded in the
    folder by `train`, once the run has really started.
    """
    cfg = load_config(args.config, schema, args.overrides)
    out = Path(cfg.train.output_dir)
    join_processes()
    if is_main_process():
        lock_run_folder(out)
        checkpoints = CheckpointDir(out / "checkpoints")
        if not args.resume and checkpoints.steps():
            # A fresh run there would be pruned against the old run's later steps and export its weights.
            raise ConfigError(f"{out} already holds a run's checkpoints: pass --resume to continue it, or choose "
                              f"another train.output_dir")
        checkpoints.remove_leftovers()
        for partial in out.glob(".*.tmp"):  # a model export killed half-way (see common.weights.atomic_write)
            log.info("removed %s, left by an interrupted write", partial.name)
            partial.unlink(missing_ok=True)
    seed_everything(cfg.train.seed)
    return cfg


def join_processes() -> PartialState:
    """Join this run's processes (torch.distributed: gloo on CPUs, nccl on GPUs) before any work, so
    that e.g. a latent cache is built once; a launch that asked for several processes and started one,
    or started several that cannot form one group, is a ConfigError naming the fix."""
    if "ACCELERATE_USE_CPU" in os.environ and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        # accelerate's simple launcher: it prepared a rendezvous for several processes, then ran one.
        raise ConfigError("accelerate launch started one process although several were asked for: its --cpu / "
                          "multi-CPU launcher needs MPI. Use `accelerate launch --multi_gpu --num_processes N ...` "
                          "(on CPUs it runs N processes over gloo) or `torchrun --nproc_per_node N ...`")
    state = PartialState(cpu=not torch.cuda.is_available())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    launched_by_accelerate = "ACCELERATE_USE_CPU" in os.environ
    if launched_by_accelerate and state.device.type == "cpu" and torch.get_num_threads() * state.num_processes < cores:
        log.warning("torch uses %d thread(s) per process on %d cores: accelerate launch set OMP_NUM_THREADS=%s; "
                    "pass --num_cpu_threads_per_process %d", torch.get_num_threads(), cores,
                    os.environ.get("OMP_NUM_THREADS"), cores // state.num_processes)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != launched:
        raise ConfigError(f"{launched} processes were launched but {state.num_processes} joined the run "
                          f"({state.distributed_type}); on a machine without GPUs launch with torchrun or "
                          "accelerate launch --multi_gpu")
    return state


def main_process_first():
    """A context in which the main process runs first and the others wait for it (e.g. to build a cache)."""
    return PartialState().main_process_first()


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch (or a single process), before accelerate is set up."""
    return int(os.environ.get("RANK", "0")) == 0


def export_errors(out: Path):
    """A full disk or a refused write while exporting the final model, as a one-line error."""
    return write_errors_explained("writing the final model", out,
                                  "free space there, then run the same command with --resume to export again")


def check_adam(lr: float, betas: list[float]) -> None:
    """The trainers' optimizer settings in range (for their configs' `__post_init__`): an lr above 1 or
    an infinite one only turns the weights non-finite, and torch cannot even hold one above 3.4e38."""
    check_range("lr", lr, low=0, high=1, low_inclusive=False)
    if len(betas) != 2:
        raise ValueError(f"betas must be two numbers, got {betas!r}")
    for beta in betas:
        check_range("betas", beta, low=0, high=1, high_inclusive=False)
