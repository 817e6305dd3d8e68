"""Pieces the training loop's kill tests share (tests/test_mutation_kills_loop*.py): a logging task on a
stand-in clock, a stand-in progress bar and processes, the run config, TensorBoard events read back."""
import random
import signal
import types
from dataclasses import replace

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import training.loop as loop
from training import TrainConfig, TrainingTask


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """A _Run a test makes installs its Ctrl-C/SIGTERM handlers; no test leaves them to the next one."""
    saved = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    yield
    for number, handler in saved.items():
        signal.signal(number, handler)


class Clock:
    """A stand-in for the loop's clock: it moves only when the task says so."""

    def __init__(self, start: float = 100.0):
        self.now = start

    def perf_counter(self) -> float:
        return self.now


class Bar:
    """A stand-in progress bar that keeps what the loop shows on it."""

    made: list["Bar"] = []

    def __init__(self, **kwargs):
        self.kwargs, self.updates, self.postfixes, self.closed = kwargs, 0, [], False
        Bar.made.append(self)

    def update(self, n):
        self.updates += n

    def set_postfix(self, postfix):
        self.postfixes.append(postfix)

    def close(self):
        self.closed = True


class LoggingTask(TrainingTask):
    """One linear layer on SGD; each micro-batch logs its running number and constants, and takes
    `seconds` on the stand-in clock. images() gives fixed grids and notes what it was given."""

    def __init__(self, clock: Clock | None = None, seconds: float = 0.5, images: dict | None = None):
        torch.manual_seed(0)
        self.net = nn.Linear(6, 2)
        self.clock, self.seconds, self.calls, self.grids, self.seen = clock, seconds, 0, images or {}, []

    def setup(self, accelerator):
        self.modules = {"net": self.net}
        self.optimizers = {"net": accelerator.prepare(torch.optim.SGD(self.net.parameters(), lr=0.01))}
        self.schedulers = {}
        self.ema_target = self.net
        self.setup_seed = torch.initial_seed()
        self.setup_draws = (np.random.random(), random.random())

    def training_step(self, batch, step):
        self.calls += 1
        if self.clock is not None:
            self.clock.now += self.seconds
        loss = (self.net(batch["x"]) - batch["y"]).pow(2).mean()
        yield "net", loss, {"calls": float(self.calls), "one": 1.0, "two": 2.0, "three": 3.0, "four": 4.0}

    def images(self, batch, ema):
        self.seen.append((batch, ema))
        return self.grids


def run_config(tmp_path, **kw):
    base = TrainConfig(output_dir=str(tmp_path / "run"), batch_size=4, max_steps=5, grad_accum=2, log_every=2,
                       checkpoint_every=100, grad_clip=None, ema_decay=0.9)
    return replace(base, **kw)


def read_events(folder) -> EventAccumulator:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def constant_images(values, size=2):
    return torch.stack([torch.full((3, size, size), float(v)) for v in values])
MID = [-0.5, 0.0, 0.25, 0.5]  # four, 2 x 2: inside [-1, 1], so not stretched to their own min and max


def accelerator_as(monkeypatch, **properties):
    """Make train() build an Accelerator whose process properties (num_processes, process_index,
    distributed_type) are the given stand-ins."""
    made = []

    class StandIn(Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    for name, value in properties.items():
        setattr(StandIn, name, property(lambda self, value=value: value))
    monkeypatch.setattr(loop, "Accelerator", StandIn)
    return made


class ShardableTask(LoggingTask):
    shardable = ("net",)


def stand_in_process(rank=0, world=1):
    """A stand-in accelerator for process `rank` of `world`, on the CPU."""
    return types.SimpleNamespace(process_index=rank, num_processes=world, is_main_process=rank == 0,
                                 device=torch.device("cpu"))
