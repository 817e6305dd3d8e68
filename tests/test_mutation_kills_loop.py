"""Training-loop behaviour the mutation run (make mutation) found untested."""
import concurrent.futures
import contextlib
import io
import logging
import random
import signal
import sys
import threading
import types
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_training_loop import NoisyRegression
from torch import nn

import training.loop as loop
from common.cli import Interrupted
from common.config import ConfigError
from common.weights import load_weights
from training import NonFiniteLossError, TrainConfig, TrainingTask, train
from training.checkpoint import CheckpointDir, Position
from training.ema import EMA
from training.finite import NonFiniteStateError
from training.loop import EpochKeySampler


@pytest.mark.parametrize("n, batch_size, world, start, expected", [
    (10, 3, 1, 0, 3),  # 10 keys in batches of 3: 3 full batches, the last key dropped
    (10, 3, 1, 2, 1),  # resumed after 2 batches of the epoch
    (17, 2, 2, 0, 4),  # two processes: 4 global batches of 2 x 2, each process takes 4 batches
    (17, 2, 2, 3, 1),
])
def test_sampler_length_is_the_batches_it_yields(n, batch_size, world, start, expected):
    for rank in range(world):
        sampler = EpochKeySampler(n, batch_size, epoch=1, seed=0, rank=rank, world=world, start=start)
        assert len(sampler) == expected
        assert isinstance(len(sampler), int)
        assert len(list(sampler)) == expected


# --- Shared pieces for the tests below --------------------------------------------------------------

@pytest.fixture(autouse=True)
def _signal_handlers_back():
    """A _Run made here installs its Ctrl-C/SIGTERM handlers; no test leaves them to the next one."""
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


def _cfg(tmp_path, **kw):
    base = TrainConfig(output_dir=str(tmp_path / "run"), batch_size=4, max_steps=5, grad_accum=2, log_every=2,
                       checkpoint_every=100, grad_clip=None, ema_decay=0.9)
    return replace(base, **kw)


def _events(folder) -> EventAccumulator:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


# --- Logged scalars: means over the window's micro-batches, samples per second ----------------------

def test_logged_scalars_are_window_means_and_the_sample_rate(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(loop, "time", clock)
    monkeypatch.setattr(loop, "tqdm", Bar)
    Bar.made = []
    task = LoggingTask(clock, seconds=0.5)
    train(task, NoisyRegression(), _cfg(tmp_path))
    # 5 steps of 2 micro-batches of 4 samples, logged at steps 2, 4 and 5 (the last): micro-batches
    # 1-4, 5-8 and 9-10, each 0.5 s on the stand-in clock, so 16 samples / 2 s, 16 / 2 s, 8 / 1 s.
    events = _events(tmp_path / "run" / "tensorboard")
    assert sorted(events.Tags()["scalars"]) == ["calls", "four", "one", "samples_per_second", "three", "two"]
    calls = [(e.step, e.value) for e in events.Scalars("calls")]
    assert calls == [(2, 2.5), (4, 6.5), (5, 9.5)]
    assert [(e.step, e.value) for e in events.Scalars("one")] == [(2, 1.0), (4, 1.0), (5, 1.0)]
    assert [(e.step, e.value) for e in events.Scalars("samples_per_second")] == [(2, 8.0), (4, 8.0), (5, 8.0)]
    # The bar: 5 steps from 0, the first four scalars and the rate after each log.
    (bar,) = Bar.made
    assert bar.kwargs["total"] == 5 and bar.kwargs["initial"] == 0 and not bar.kwargs["disable"]
    assert bar.kwargs["dynamic_ncols"] is True  # the bar follows the terminal's width
    assert bar.updates == 5 and bar.closed
    assert bar.postfixes == [
        {"calls": "2.5", "one": "1", "two": "2", "three": "3", "img/s": "8.0"},
        {"calls": "6.5", "one": "1", "two": "2", "three": "3", "img/s": "8.0"},
        {"calls": "9.5", "one": "1", "two": "2", "three": "3", "img/s": "8.0"},
    ]


def test_two_processes_log_the_mean_of_both_processes_in_float64(tmp_path, monkeypatch):
    """A stand-in all-reduce adds the other process's means: 1 for "one", and for "big" a value whose
    float32 sum would round (2**24 + 1 + 1 = 2**24 + 2, halved 2**23 + 1, exact in float32)."""
    reduced = []

    def all_reduce(tensor, op=dist.ReduceOp.SUM):
        reduced.append(tensor.dtype)
        tensor.add_(torch.tensor([1.0, 1.0], dtype=tensor.dtype))

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(loop, "tqdm", Bar)
    task = LoggingTask()
    task.modules = {"net": task.net}
    accelerator = types.SimpleNamespace(is_main_process=True, num_processes=2, device=torch.device("cpu"))
    run = loop._Run(task, None, _cfg(tmp_path), accelerator, CheckpointDir(tmp_path / "c"), Position(step=3), -1)
    run.meter.add({"one": 3.0, "big": 2.0 ** 24 + 1})
    run.meter.add({"one": 3.0, "big": 2.0 ** 24 + 1})
    run.meter.count(4)
    run.meter.count(4)
    run.log_scalars()
    run.writer.close()
    run.interrupted.restore()
    events = _events(tmp_path / "run" / "tensorboard")
    assert [(e.step, e.value) for e in events.Scalars("one")] == [(3, 2.0)]
    assert [(e.step, e.value) for e in events.Scalars("big")] == [(3, 2.0 ** 23 + 1)]
    assert reduced == [torch.float64]


def test_one_process_logs_its_own_means_without_a_collective(tmp_path, monkeypatch):
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: pytest.fail("no collective with one process"))
    task = LoggingTask()
    task.modules = {"net": task.net}
    accelerator = types.SimpleNamespace(is_main_process=True, num_processes=1, device=torch.device("cpu"))
    run = loop._Run(task, None, _cfg(tmp_path), accelerator, CheckpointDir(tmp_path / "c"), Position(step=7), -1)
    run.meter.add({"one": 3.0})
    run.meter.count(4)
    run.log_scalars()
    run.writer.close()
    run.interrupted.restore()
    assert [(e.step, e.value) for e in _events(tmp_path / "run" / "tensorboard").Scalars("one")] == [(7, 3.0)]


# --- Image grids --------------------------------------------------------------------------------------

def _constant_images(values, size=2):
    return torch.stack([torch.full((3, size, size), float(v)) for v in values])


def _grid_by_hand(values, nrow, size=2, pad=2, rounding=0.5):
    """make_grid's layout: nrow images a row, `pad` black pixels around each; [-1, 1] maps to 0..255
    as save_image rounds it (floor(255 * (x + 1) / 2 + 0.5); TensorBoard truncates: rounding=0),
    values outside clamped first."""
    rows = -(-len(values) // nrow)
    grid = np.zeros((rows * (size + pad) + pad, nrow * (size + pad) + pad, 3), dtype=np.uint8)
    for k, v in enumerate(values):
        v = min(max(v, -1.0), 1.0)
        r, c = divmod(k, nrow)
        grid[pad + r * (size + pad): pad + r * (size + pad) + size,
             pad + c * (size + pad): pad + c * (size + pad) + size] = int(255 * (v + 1) / 2 + rounding)
    return grid


WIDE = [-3.0, 0.25]  # two images, one a column: values outside [-1, 1] are clamped
MID = [-0.5, 0.0, 0.25, 0.5]  # four, 2 x 2: inside [-1, 1], so not stretched to their own min and max


def test_image_grids_are_written_at_the_image_steps_and_to_tensorboard(tmp_path, monkeypatch):
    task = LoggingTask(images={"wide": _constant_images(WIDE), "mid": _constant_images(MID)})
    train(task, NoisyRegression(), _cfg(tmp_path, max_steps=4, image_every=2))
    folder = tmp_path / "run" / "images"
    assert sorted(p.name for p in folder.iterdir()) == [
        "mid_00000002.png", "mid_00000004.png", "wide_00000002.png", "wide_00000004.png"]
    want = {"wide": _grid_by_hand(WIDE, nrow=1), "mid": _grid_by_hand(MID, nrow=2)}
    for name in want:
        for step in (2, 4):
            np.testing.assert_array_equal(np.asarray(Image.open(folder / f"{name}_{step:08d}.png")), want[name])
    events = _events(tmp_path / "run" / "tensorboard")
    assert sorted(events.Tags()["images"]) == ["mid", "wide"]
    for name, values, nrow in (("wide", WIDE, 1), ("mid", MID, 2)):
        logged = events.Images(name)
        assert [e.step for e in logged] == [2, 4]
        for e in logged:
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(e.encoded_image_string)))[..., :3],
                                          _grid_by_hand(values, nrow, rounding=0))
    # images() is given the step's batch and the EMA, once per image step.
    assert len(task.seen) == 2
    for batch, ema in task.seen:
        assert batch["x"].shape == (4, 6) and batch["sample_key"].shape == (4,)
        assert isinstance(ema, EMA)


def test_without_tensorboard_images_still_go_to_the_run_folder(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    task = LoggingTask(images={"mid": _constant_images(MID)})
    with caplog.at_level(logging.WARNING, logger="training.loop"):
        train(task, NoisyRegression(), _cfg(tmp_path, max_steps=2, image_every=2))
    assert "tensorboard not importable; scalars go to the progress bar only" in caplog.messages
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "run" / "images" / "mid_00000002.png")),
                                  _grid_by_hand(MID, nrow=2))
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_no_images_without_image_every(tmp_path):
    task = LoggingTask(images={"mid": _constant_images(MID)})
    train(task, NoisyRegression(), _cfg(tmp_path, max_steps=4, image_every=0))
    assert not (tmp_path / "run" / "images").exists() and task.seen == []


# --- Gradient averaging over processes ----------------------------------------------------------------

def test_gradients_are_averaged_with_the_other_process_per_dtype(monkeypatch):
    """Stand-in all-reduce: the other process's gradients are all 1 (float32) and all -2 (float64),
    one collective per dtype."""
    calls = []

    def all_reduce(tensor, op=dist.ReduceOp.SUM):
        calls.append((tensor.dtype, tensor.numel()))
        tensor.add_(1.0 if tensor.dtype == torch.float32 else -2.0)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    shapes = [((2, 3), torch.float32), ((4,), torch.float64), ((3,), torch.float32), ((2, 2), torch.float64),
              ((2,), torch.float32), ((1,), torch.float64)]
    params, mine = [], []
    for k, (shape, dtype) in enumerate(shapes):
        p = nn.Parameter(torch.zeros(shape, dtype=dtype))
        p.grad = torch.arange(p.numel(), dtype=dtype).reshape(shape) * 10 + k
        params.append(p)
        mine.append(p.grad.clone())
    loop._average_gradients(params, 2)
    assert sorted(calls, key=str) == sorted([(torch.float32, 11), (torch.float64, 9)], key=str)
    for p, g, (shape, dtype) in zip(params, mine, shapes):
        other = 1.0 if dtype == torch.float32 else -2.0
        assert p.grad.dtype == dtype and p.grad.shape == shape
        torch.testing.assert_close(p.grad, (g + other) / 2, rtol=0, atol=0)


# --- Resume messages ---------------------------------------------------------------------------------

def test_resume_says_where_it_resumed_from_or_that_it_starts_afresh(tmp_path, caplog):
    cfg = _cfg(tmp_path, max_steps=2, checkpoint_every=1)
    with caplog.at_level(logging.INFO, logger="training.loop"):
        train(LoggingTask(), NoisyRegression(), cfg, resume=True)
    root = tmp_path / "run" / "checkpoints"
    assert f"--resume: no checkpoint in {root}; starting from scratch" in caplog.messages
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="training.loop"):
        train(LoggingTask(), NoisyRegression(), replace(cfg, max_steps=3), resume=True)
    assert f"resumed from {root / 'step_00000002'} (step 2)" in caplog.messages


# --- train(): what it sets up before the steps ------------------------------------------------------

def test_a_run_without_resume_starts_afresh_beside_earlier_checkpoints(tmp_path):
    cfg = _cfg(tmp_path, max_steps=3, grad_accum=1, checkpoint_every=1)
    train(LoggingTask(), NoisyRegression(), cfg)
    again = LoggingTask()
    train(again, NoisyRegression(), cfg)
    assert again.calls == 3  # all three steps again, not resumed at step 3
    assert not (tmp_path / "run" / "config.yaml").exists()  # no run_config, nothing recorded


def test_the_run_config_is_recorded_in_its_own_key_order(tmp_path):
    train(LoggingTask(), NoisyRegression(), _cfg(tmp_path, max_steps=1), run_config={"b": 1, "a": {"d": 2, "c": 3}})
    assert (tmp_path / "run" / "config.yaml").read_text() == "b: 1\na:\n  d: 2\n  c: 3\n"


@pytest.fixture
def fresh_accelerate_state():
    AcceleratorState._reset_state(True)  # the process's accelerate state is fixed to the first precision used
    yield
    AcceleratorState._reset_state(True)


FP16_WARNING = ("train.mixed_precision=fp16 runs in fp32 on cpu (accelerate has no fp16 loss scaling there); "
                "bf16 is the low-precision setting for CPUs")


@pytest.mark.parametrize("precision, warned", [("fp16", True), ("no", False)])
def test_fp16_on_a_cpu_warns_that_it_runs_in_fp32(tmp_path, caplog, fresh_accelerate_state, precision, warned):
    with caplog.at_level(logging.WARNING, logger="training.loop"):
        train(LoggingTask(), NoisyRegression(), _cfg(tmp_path, max_steps=1, mixed_precision=precision))
    assert (FP16_WARNING in caplog.messages) == warned
    assert not any("fp16" in m for m in caplog.messages if m != FP16_WARNING)


class Stop(Exception):
    """Raised by a stand-in to end train() where a test has seen what it needs."""


def _accelerator_as(monkeypatch, **properties):
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


def test_each_process_seeds_with_the_seed_plus_its_rank(tmp_path, monkeypatch):
    _accelerator_as(monkeypatch, process_index=1)

    class StopAtSetup(LoggingTask):
        def setup(self, accelerator):
            super().setup(accelerator)
            raise Stop

    task = StopAtSetup()
    with pytest.raises(Stop):
        train(task, NoisyRegression(), _cfg(tmp_path, seed=5))
    assert task.setup_seed == 6
    # numpy's and Python's generators too: the task saw what they draw after seeding with 6.
    np.random.seed(6)
    random.seed(6)
    assert task.setup_draws == (np.random.random(), random.random())


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_an_accelerate_fsdp_or_deepspeed_config_is_refused(tmp_path, monkeypatch, kind):
    _accelerator_as(monkeypatch, distributed_type=getattr(DistributedType, kind))
    task = LoggingTask()
    with pytest.raises(ConfigError) as caught:
        train(task, NoisyRegression(), _cfg(tmp_path))
    assert str(caught.value) == (
        f"accelerate's {getattr(DistributedType, kind).value} config is not used by these trainers (they do not "
        "hand their models to accelerate): launch with a multi-GPU config, e.g. configs/accelerate/fsdp-8gpu.yaml, "
        "and set train.shard=fsdp to shard the model")
    assert task.calls == 0 and not hasattr(task, "modules")


def test_fsdp_with_two_processes_shards_the_tasks_modules_with_its_ema(tmp_path, monkeypatch):
    made = _accelerator_as(monkeypatch, num_processes=2)
    seen = []

    def shard_task(task, names, ema, accelerator):
        seen.append((task, names, ema, accelerator))
        raise Stop

    monkeypatch.setattr(loop, "shard_task", shard_task)
    task = ShardableTask()
    with pytest.raises(Stop):
        train(task, NoisyRegression(), _cfg(tmp_path, shard="fsdp"))
    ((got_task, names, ema, accelerator),) = seen
    assert got_task is task and names == ["net"] and isinstance(ema, EMA) and accelerator is made[0]


def test_fsdp_with_one_process_warns_and_trains_whole_modules(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(loop, "shard_task", lambda *a: pytest.fail("nothing to shard over with one process"))
    task = ShardableTask()
    with caplog.at_level(logging.WARNING, logger="training.loop"):
        train(task, NoisyRegression(), _cfg(tmp_path, shard="fsdp", max_steps=2))
    assert "train.shard=fsdp with one process: nothing to split it over; the modules stay whole" in caplog.messages
    assert task.calls == 4


def test_fsdp_refuses_a_task_that_cannot_be_sharded_even_with_one_process(tmp_path):
    task = LoggingTask()
    with pytest.raises(ConfigError, match=r"train.shard=fsdp: LoggingTask cannot shard its module\(s\) \['net'\]"):
        train(task, NoisyRegression(), _cfg(tmp_path, shard="fsdp"))
    assert task.calls == 0


# --- TrainConfig: values out of range are named -----------------------------------------------------

@pytest.mark.parametrize("name", ["batch_size", "max_steps", "grad_accum", "log_every", "checkpoint_every",
                                  "keep_checkpoints"])
def test_counts_must_be_at_least_one(name):
    with pytest.raises(ValueError) as caught:
        TrainConfig(**{name: 0})
    assert str(caught.value) == f"{name} must be >= 1, got 0"
    assert getattr(TrainConfig(**{name: 1}), name) == 1


@pytest.mark.parametrize("name", ["image_every", "num_workers", "seed"])
def test_zero_allowed_counts_must_not_be_negative(name):
    with pytest.raises(ValueError) as caught:
        TrainConfig(**{name: -1})
    assert str(caught.value) == f"{name} must be >= 0, got -1"
    assert getattr(TrainConfig(**{name: 0}), name) == 0


@pytest.mark.parametrize("name, bad, message, good", [
    ("max_minutes", 0, "max_minutes must be a finite number > 0, got 0", 1e-9),
    ("max_minutes", float("inf"), "max_minutes must be a finite number > 0, got inf", 5.0),
    ("grad_clip", 0.0, "grad_clip must be a finite number > 0, got 0.0", 1e-9),
    ("grad_clip", float("nan"), "grad_clip must be a finite number > 0, got nan", 100.0),
    ("ema_decay", 1.0, "ema_decay must be a finite number in [0, 1), got 1.0", 0.0),
    ("ema_decay", -0.1, "ema_decay must be a finite number in [0, 1), got -0.1", 0.999),
])
def test_optional_values_out_of_range_are_named(name, bad, message, good):
    with pytest.raises(ValueError) as caught:
        TrainConfig(**{name: bad})
    assert str(caught.value) == message
    assert getattr(TrainConfig(**{name: good}), name) == good
    assert getattr(TrainConfig(**{name: None}), name) is None


def test_fsdp_refuses_fp16_but_takes_bf16():
    with pytest.raises(ValueError) as caught:
        TrainConfig(shard="fsdp", mixed_precision="fp16")
    assert str(caught.value) == ("train.shard=fsdp does not support mixed_precision=fp16 (its loss scaler would see "
                                 "one process's shards only); use bf16")
    assert TrainConfig(shard="fsdp", mixed_precision="bf16").shard == "fsdp"
    assert TrainConfig(shard="none", mixed_precision="fp16").mixed_precision == "fp16"


def test_train_config_defaults():
    cfg = TrainConfig()
    assert (cfg.output_dir, cfg.batch_size, cfg.max_steps, cfg.max_minutes, cfg.grad_accum) == ("runs/default", 8, 1000,
                                                                                                 None, 1)
    assert (cfg.mixed_precision, cfg.grad_clip, cfg.ema_decay, cfg.seed, cfg.num_workers) == ("no", 1.0, None, 0, 0)
    assert (cfg.log_every, cfg.image_every, cfg.checkpoint_every, cfg.keep_checkpoints, cfg.shard) == (10, 0, 500, 3,
                                                                                                      "none")


# --- The epoch's batches ------------------------------------------------------------------------------

class Stream(torch.utils.data.IterableDataset):
    """A stream of `n` samples an epoch that notes set_epoch and skip, and honours skip."""

    def __init__(self, n: int = 12):
        self.n, self.calls, self.skipped, self.epoch = n, [], 0, 0

    def set_epoch(self, epoch):
        self.calls.append(("set_epoch", epoch))
        self.epoch = epoch

    def skip(self, n, batch_size=1):
        self.calls.append(("skip", n, batch_size))
        self.skipped = n

    def __iter__(self):
        for i in range(self.skipped, self.n):
            yield {"x": torch.full((2,), float(100 * self.epoch + i)), "name": f"s{i}"}
        self.skipped = 0


def _process(rank=0, world=1):
    """A stand-in accelerator for process `rank` of `world`, on the CPU."""
    return types.SimpleNamespace(process_index=rank, num_processes=world, is_main_process=rank == 0,
                                 device=torch.device("cpu"))


def test_a_stream_numbers_its_samples_by_global_batch_and_epoch(tmp_path):
    cfg = _cfg(tmp_path, batch_size=3)
    stream = Stream()
    # Process 1 of 2, epoch 2, resumed after its first batch: its batches are the global batches
    # 1 * 2 + 1 = 3, 5, 7 of the epoch, keys 3 * 3 .. 3 * 3 + 2, ... plus 2 << 40.
    batches = list(loop._epoch_batches(stream, cfg, Position(epoch=2, batch_in_epoch=1), _process(1, 2)))
    assert stream.calls == [("set_epoch", 2), ("skip", 3, 3)]
    assert [b["sample_key"].tolist() for b in batches] == [
        [(2 << 40) + k for k in range(9, 12)], [(2 << 40) + k for k in range(15, 18)],
        [(2 << 40) + k for k in range(21, 24)]]
    assert [b["x"][:, 0].tolist() for b in batches] == [[203, 204, 205], [206, 207, 208], [209, 210, 211]]
    assert batches[0]["name"] == ["s3", "s4", "s5"]
    assert all(b["sample_key"].dtype == torch.int64 for b in batches)


def test_a_stream_without_set_epoch_or_skip_is_read_as_it_is(tmp_path):
    class Plain(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([{"x": torch.tensor(float(i))} for i in range(4)])

    batches = list(loop._epoch_batches(Plain(), _cfg(tmp_path, batch_size=2), Position(), _process()))
    assert [b["x"].tolist() for b in batches] == [[0.0, 1.0], [2.0, 3.0]]
    assert [b["sample_key"].tolist() for b in batches] == [[0, 1], [2, 3]]


def test_map_batches_carry_their_keys_and_follow_rank_and_resume(tmp_path):
    class Keyed(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, key):
            return {"key": torch.tensor(key), "text": f"k{key}"}

    cfg = _cfg(tmp_path, batch_size=2, seed=3)
    whole = list(loop._epoch_batches(Keyed(), cfg, Position(epoch=1), _process(0, 1)))
    assert len(whole) == 5
    keys = [b["sample_key"].tolist() for b in whole]
    assert sorted(k for b in keys for k in b) == list(range(10, 20))  # epoch 1 of 10 samples: keys 10..19
    assert all(b["key"].tolist() == k for b, k in zip(whole, keys)) and whole[0]["text"] == [f"k{k}" for k in keys[0]]
    resumed = list(loop._epoch_batches(Keyed(), cfg, Position(epoch=1, batch_in_epoch=3), _process(0, 1)))
    assert [b["sample_key"].tolist() for b in resumed] == keys[3:]
    rank0 = [b["sample_key"].tolist() for b in loop._epoch_batches(Keyed(), cfg, Position(epoch=1), _process(0, 2))]
    rank1 = [b["sample_key"].tolist() for b in loop._epoch_batches(Keyed(), cfg, Position(epoch=1), _process(1, 2))]
    assert len(rank0) == len(rank1) == 2
    assert [k for pair in zip(rank0, rank1) for b in pair for k in b] == [k for b in keys[:4] for k in b]


@pytest.mark.parametrize("stream", [False, True])
def test_making_an_epochs_loader_leaves_the_global_rng_alone(tmp_path, stream):
    data = Stream() if stream else NoisyRegression()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    list(loop._epoch_batches(data, _cfg(tmp_path, batch_size=4), Position(epoch=1, batch_in_epoch=1), _process()))
    assert torch.equal(torch.get_rng_state(), before)


def test_to_device_keeps_structure_and_batch_size_counts_the_first_batched_value():
    cpu = torch.device("cpu")
    batch = {"x": torch.ones(3, 2), "names": ["a", "b", "c"], "parts": [torch.zeros(3), torch.ones(3)], "n": 7,
             "empty": []}
    moved = loop._to_device(batch, cpu)
    assert moved.keys() == batch.keys() and moved["names"] == ["a", "b", "c"] and moved["n"] == 7
    assert moved["empty"] == [] and len(moved["parts"]) == 2 and torch.equal(moved["parts"][1], torch.ones(3))
    assert loop._batch_size({"n": 7, "names": ["a", "b"], "x": torch.ones(5)}) == 2
    assert loop._batch_size({"n": 7, "x": torch.ones(5, 2)}) == 5
    assert loop._batch_size({"n": 7}) == 0


# --- Processes agreeing ---------------------------------------------------------------------------------

class TwoProcesses:
    """Two threads as the two processes of a run, and an all-reduce between them (SUM or MAX)."""

    def __init__(self):
        self.barrier, self.tensors = threading.Barrier(2, timeout=10), {}

    def all_reduce(self, tensor, op=dist.ReduceOp.SUM):
        self.tensors[threading.get_ident()] = tensor.clone()
        self.barrier.wait()
        a, b = self.tensors.values()
        result = {dist.ReduceOp.SUM: torch.add, dist.ReduceOp.MAX: torch.maximum}[op](a, b)
        self.barrier.wait()
        tensor.copy_(result)

    def run(self, *work):
        self.tensors = {}  # by thread: new threads each call
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            return [f.result() for f in [pool.submit(w) for w in work]]


@pytest.mark.parametrize("flags, any_of, all_of", [
    ((False, False), False, False), ((True, False), True, False), ((False, True), True, False),
    ((True, True), True, True)])
def test_two_processes_agree_on_any_or_all_of_their_flags(tmp_path, monkeypatch, flags, any_of, all_of):
    processes = TwoProcesses()
    monkeypatch.setattr(dist, "all_reduce", processes.all_reduce)
    monkeypatch.setattr(loop, "tqdm", Bar)
    runs = []
    for rank in range(2):
        task = LoggingTask()
        task.modules = {"net": task.net}
        cfg = _cfg(tmp_path / str(rank))
        runs.append(loop._Run(task, None, cfg, _process(rank, 2), CheckpointDir(tmp_path / "c"), Position(), -1))
    try:
        # Only the main process writes TensorBoard events and shows a bar.
        assert runs[0].writer is not None and runs[1].writer is None
        assert [run.bar.kwargs["disable"] for run in runs] == [False, True]
        assert processes.run(*[lambda r=r, f=f: r.agree(f) for r, f in zip(runs, flags)]) == [any_of] * 2
        assert processes.run(*[lambda r=r, f=f: r.agree(f, all_of=True) for r, f in zip(runs, flags)]) == [all_of] * 2
    finally:
        runs[0].writer.close()
        for run in runs:
            run.interrupted.restore()


def test_one_process_agrees_with_itself_without_a_collective(tmp_path, monkeypatch):
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: pytest.fail("no collective with one process"))
    task = LoggingTask()
    task.modules = {"net": task.net}
    run = loop._Run(task, None, _cfg(tmp_path), _process(0, 1), CheckpointDir(tmp_path / "c"), Position(), -1)
    try:
        assert [run.agree(True), run.agree(False), run.agree(True, all_of=True), run.agree(False, all_of=True)] == [
            True, False, True, False]
    finally:
        run.writer.close()
        run.interrupted.restore()


# --- An optimizer step over two processes -----------------------------------------------------------

@pytest.mark.parametrize("clip", [None, 1.0])
def test_two_processes_step_on_the_averaged_then_clipped_gradient(monkeypatch, clip):
    """Process 0's gradient is (4, 0), process 1's (0, 0): both step on their mean (2, 0), clipped to
    norm 1 with grad_clip 1 (clipping each process's own first would give (0.5, 0)). A frozen
    parameter without a gradient is left out; the scheduler steps once; gradients are cleared."""
    processes = TwoProcesses()
    monkeypatch.setattr(dist, "all_reduce", processes.all_reduce)

    def one_process(grad):
        weight, frozen = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.ones(3))
        weight.grad = torch.tensor(grad)
        opt = torch.optim.SGD([weight, frozen], lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
        task = types.SimpleNamespace(optimizers={"net": opt}, schedulers={"net": sched})
        accelerator = types.SimpleNamespace(sync_gradients=True, num_processes=2, scaler=None)
        loop._optimizer_step(task, "net", accelerator, clip)
        return weight.detach().clone(), weight.grad, frozen.detach().clone(), opt.param_groups[0]["lr"]

    results = processes.run(lambda: one_process([4.0, 0.0]), lambda: one_process([0.0, 0.0]))
    step = 1.0 / (1 + 1e-6) if clip else 2.0  # torch clips to max_norm / (norm + 1e-6)
    for weight, grad, frozen, lr in results:
        torch.testing.assert_close(weight, torch.tensor([-step, 0.0]), rtol=1e-6, atol=0)
        assert grad is None and torch.equal(frozen, torch.ones(3)) and lr == 0.5


def test_one_process_clips_its_own_gradient_without_a_collective(monkeypatch):
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: pytest.fail("no collective with one process"))
    weight = nn.Parameter(torch.zeros(2))
    weight.grad = torch.tensor([3.0, 4.0])
    opt = torch.optim.SGD([weight], lr=1.0)
    task = types.SimpleNamespace(optimizers={"net": opt}, schedulers={})
    loop._optimizer_step(task, "net", types.SimpleNamespace(sync_gradients=True, num_processes=1, scaler=None), 0.5)
    torch.testing.assert_close(weight.detach(), torch.tensor([-0.3, -0.4]), rtol=1e-5, atol=0)
    assert weight.grad is None


# --- Stopping on time ---------------------------------------------------------------------------------

def test_max_minutes_stops_at_the_first_step_past_the_limit_and_saves_it_once(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(loop, "time", clock)
    saved = []
    real_save = loop.save_checkpoint
    monkeypatch.setattr(loop, "save_checkpoint", lambda dir, pos, *a: (saved.append(pos.step), real_save(dir, pos, *a)))
    task = LoggingTask(clock, seconds=1.0)  # one second a step: 0.05 minutes is 3 s, passed at step 4
    last = train(task, NoisyRegression(), _cfg(tmp_path, grad_accum=1, max_steps=100, max_minutes=0.05,
                                               checkpoint_every=2))
    assert last.name == "step_00000004" and task.calls == 4
    assert saved == [2, 4]
    assert CheckpointDir(tmp_path / "run" / "checkpoints").steps() == [2, 4]


def test_max_minutes_saves_a_step_the_schedule_did_not(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(loop, "time", clock)
    task = LoggingTask(clock, seconds=0.76)  # 3.04 s after step 4: just past 0.05 minutes
    last = train(task, NoisyRegression(), _cfg(tmp_path, grad_accum=1, max_steps=100, max_minutes=0.05,
                                               checkpoint_every=3))
    assert last.name == "step_00000004" and CheckpointDir(tmp_path / "run" / "checkpoints").steps() == [3, 4]


# --- Epochs ---------------------------------------------------------------------------------------------

def test_each_epoch_sees_every_sample_once_under_its_own_keys(tmp_path):
    class KeyRecorder(LoggingTask):
        keys: list

        def training_step(self, batch, step):
            self.__dict__.setdefault("keys", []).append(batch["sample_key"].tolist())
            yield from super().training_step(batch, step)

    task = KeyRecorder()
    # 24 samples in batches of 4: 6 steps an epoch; 13 steps reach into a third epoch.
    train(task, NoisyRegression(), _cfg(tmp_path, grad_accum=1, max_steps=13))
    assert len(task.keys) == 13
    for epoch in range(2):
        assert sorted(k for b in task.keys[6 * epoch: 6 * epoch + 6] for k in b) == list(range(24 * epoch, 24 * epoch + 24))
    assert all(48 <= k < 72 for k in task.keys[12])


# --- Two processes stopping together --------------------------------------------------------------------

def _two_runs(tmp_path, monkeypatch, tasks, cfgs):
    """A _Run for each of two stand-in processes (threads) on the CPU, joined by TwoProcesses."""
    processes = TwoProcesses()
    monkeypatch.setattr(dist, "all_reduce", processes.all_reduce)
    monkeypatch.setattr(loop, "tqdm", Bar)
    runs = []
    for rank, (task, cfg) in enumerate(zip(tasks, cfgs)):
        task.setup(types.SimpleNamespace(prepare=lambda opt: opt))
        accelerator = types.SimpleNamespace(
            process_index=rank, num_processes=2, is_main_process=rank == 0, device=torch.device("cpu"),
            sync_gradients=True, scaler=None, accumulate=contextlib.nullcontext, autocast=contextlib.nullcontext,
            backward=lambda loss: loss.backward())
        runs.append(loop._Run(task, None, cfg, accelerator, CheckpointDir(tmp_path / f"c{rank}"), Position(), -1))
    return processes, runs


def _close(runs):
    for run in reversed(runs):
        if run.writer:
            run.writer.close()
        run.interrupted.restore()


class NanLoss(LoggingTask):
    def training_step(self, batch, step):
        yield "net", torch.tensor(float("nan"), requires_grad=True), {}


def _batch():
    return {"x": torch.ones(4, 6), "y": torch.zeros(4, 2)}


def test_a_non_finite_loss_on_one_process_stops_both(tmp_path, monkeypatch):
    processes, runs = _two_runs(tmp_path, monkeypatch, [LoggingTask(), NanLoss()], [_cfg(tmp_path)] * 2)

    def step(run):
        try:
            run.micro_step(_batch())
        except NonFiniteLossError as e:
            return str(e)

    try:
        good, bad = processes.run(*[lambda r=r: step(r) for r in runs])
    finally:
        _close(runs)
    assert good is not None and good.startswith("loss 'net' is ") and " at step 0; stopping without saving" in good
    assert bad == "loss 'net' is nan at step 0; stopping without saving (last good checkpoint: none)"


def test_two_processes_count_both_processes_samples(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(loop, "time", clock)
    processes, runs = _two_runs(tmp_path, monkeypatch, [LoggingTask(), LoggingTask()], [_cfg(tmp_path)] * 2)
    try:
        processes.run(*[lambda r=r: r.micro_step(_batch()) for r in runs])
        clock.now += 2.0
        processes.run(*[lambda r=r: r.log_scalars() for r in runs])
    finally:
        _close(runs)
    # 2 processes x 4 samples in 2 s on the stand-in clock.
    events = _events(tmp_path / "run" / "tensorboard")
    assert [(e.step, e.value) for e in events.Scalars("samples_per_second")] == [(0, 4.0)]
    assert [(e.step, e.value) for e in events.Scalars("calls")] == [(0, 1.0)]


@pytest.mark.parametrize("who", [0, 1, None])
def test_a_signal_on_one_process_stops_both(tmp_path, monkeypatch, who):
    monkeypatch.setattr(loop, "save_checkpoint", lambda *a: pytest.fail("finish_step saves no signalled step"))
    processes, runs = _two_runs(tmp_path, monkeypatch, [LoggingTask(), LoggingTask()], [_cfg(tmp_path)] * 2)
    try:
        if who is not None:
            runs[who].interrupted.set(15)
        stops = processes.run(*[lambda r=r: r.finish_step(_batch()) for r in runs])
        flags = [bool(r.interrupted) for r in runs]
    finally:
        _close(runs)
    assert stops == flags == [who is not None] * 2  # step 1 of 5: no other reason to stop


def test_one_process_out_of_time_stops_and_saves_both(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(loop, "time", clock)
    saved = []
    monkeypatch.setattr(loop, "save_checkpoint", lambda dir, pos, *a: saved.append((dir.root.name, pos.step)))
    cfgs = [_cfg(tmp_path), _cfg(tmp_path, max_minutes=0.01)]  # process 1 has 0.6 s
    processes, runs = _two_runs(tmp_path, monkeypatch, [LoggingTask(), LoggingTask()], cfgs)
    clock.now += 1.0
    try:
        stops = processes.run(*[lambda r=r: r.finish_step(_batch()) for r in runs])
    finally:
        _close(runs)
    assert stops == [True, True] and sorted(saved) == [("c0", 1), ("c1", 1)]


@pytest.mark.parametrize("bad_on", [None, 1])
def test_a_non_finite_shard_on_one_process_stops_both(tmp_path, monkeypatch, bad_on):
    """Sharded modules (a stand-in: the run is told its modules are sharded) are checked shard by shard,
    each process its own; a process whose shards are fine names the other's."""
    processes, runs = _two_runs(tmp_path, monkeypatch, [LoggingTask(), LoggingTask()], [_cfg(tmp_path)] * 2)
    for run in runs:
        run.sharded = True
    if bad_on is not None:
        with torch.no_grad():
            runs[bad_on].task.net.weight[0, 0] = float("inf")

    def check(run):
        try:
            run.check_finite("net")
        except NonFiniteStateError as e:
            return str(e)

    try:
        messages = processes.run(*[lambda r=r: check(r) for r in runs])
    finally:
        _close(runs)
    if bad_on is None:
        assert messages == [None, None]
        return
    tail = " at step 1 (e.g. {}; check optim.lr); stopping without saving (last good checkpoint: none)"
    assert messages == ["optimizer 'net' made 1 weights NaN or infinite" + tail.format("a shard of another process"),
                        "optimizer 'net' made 1 weights NaN or infinite" + tail.format("net.weight")]


def test_a_parameter_outside_the_tasks_modules_is_named_by_a_question_mark(tmp_path):

    class Stray(LoggingTask):
        def setup(self, accelerator):
            super().setup(accelerator)
            self.stray = nn.Parameter(torch.full((2,), float("inf")))
            self.optimizers["net"].add_param_group({"params": [self.stray]})

    with pytest.raises(NonFiniteStateError, match=r"made 1 weights NaN or infinite at step 1 \(e\.g\. \?; check"):
        train(Stray(), NoisyRegression(), _cfg(tmp_path, grad_accum=1))


# --- Loader details -------------------------------------------------------------------------------------

class WorkerStream(torch.utils.data.IterableDataset):
    def __iter__(self):
        worker = torch.utils.data.get_worker_info() is not None
        return iter([{"in_worker": torch.tensor(worker)} for _ in range(4)])


class WorkerMap(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, key):
        return {"in_worker": torch.tensor(torch.utils.data.get_worker_info() is not None)}


@pytest.mark.parametrize("data", [WorkerStream(), WorkerMap()], ids=["stream", "map"])
def test_num_workers_loads_in_worker_processes(tmp_path, data):
    for workers in (0, 1):
        batches = list(loop._epoch_batches(data, _cfg(tmp_path, batch_size=2, num_workers=workers), Position(),
                                           _process()))
        assert len(batches) == 2 and all(b["in_worker"].tolist() == [workers == 1] * 2 for b in batches)


def test_cpu_batches_are_not_pinned(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(loop._epoch_batches(NoisyRegression(), _cfg(tmp_path, batch_size=4), Position(), _process()))
    assert len(batches) == 6 and not batches[0]["x"].is_pinned()
    assert [str(w.message) for w in caught] == []


def test_sampler_batches_are_full_and_seeded_by_seed_and_epoch():
    # 11 keys in batches of 3: three full batches, never a short fourth.
    assert [len(b) for b in EpochKeySampler(11, 3, epoch=0, seed=0)] == [3, 3, 3]
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = list(EpochKeySampler(40, 4, epoch=2, seed=1))
    assert torch.equal(torch.get_rng_state(), before)  # its own generator, not the global one
    assert list(EpochKeySampler(40, 4, epoch=2, seed=1)) == first
    assert list(EpochKeySampler(40, 4, epoch=3, seed=1)) != [[k + 40 for k in b] for b in first]
    assert list(EpochKeySampler(40, 4, epoch=2, seed=2)) != first


def test_a_step_the_fp16_scaler_skips_still_moves_the_schedule_without_a_warning():
    weight = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([weight], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.ones(()))  # the scale is made with the first scaled loss
    weight.grad = torch.tensor([float("inf"), 1.0])
    task = types.SimpleNamespace(optimizers={"net": opt}, schedulers={"net": sched})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loop._optimizer_step(task, "net", types.SimpleNamespace(sync_gradients=True, num_processes=1, scaler=scaler),
                             None)
    assert torch.equal(weight.detach(), torch.zeros(2))  # the inf gradient's step was skipped
    assert opt.param_groups[0]["lr"] == 0.5 and weight.grad is None
    assert [str(w.message) for w in caught] == []


# --- Stops before the first step; the EMA's decay -----------------------------------------------------

class SignalledEmptyStream(torch.utils.data.IterableDataset):
    """A stream that is stopped (SIGTERM) while it opens and then has nothing to give."""

    def __iter__(self):
        signal.raise_signal(signal.SIGTERM)
        return iter([])


def test_a_stop_before_the_first_step_saves_step_0_of_a_fresh_run(tmp_path, monkeypatch):
    with pytest.raises(Interrupted, match=r"SIGTERM at step 0: saved .*step_00000000; no model exported"):
        train(LoggingTask(), SignalledEmptyStream(), _cfg(tmp_path))
    assert CheckpointDir(tmp_path / "run" / "checkpoints").steps() == [0]


def test_a_stop_before_the_first_resumed_step_saves_nothing_new(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, max_steps=2, grad_accum=1)
    train(LoggingTask(), NoisyRegression(), cfg)
    saved = []
    real_save = loop.save_checkpoint
    monkeypatch.setattr(loop, "save_checkpoint", lambda dir, pos, *a: (saved.append(pos.step), real_save(dir, pos, *a)))
    with pytest.raises(Interrupted, match=r"SIGTERM at step 2: saved .*step_00000002; no model exported"):
        train(LoggingTask(), SignalledEmptyStream(), replace(cfg, max_steps=4), resume=True)
    assert saved == [] and CheckpointDir(tmp_path / "run" / "checkpoints").steps() == [2]


def test_the_ema_follows_the_weights_at_the_configured_decay(tmp_path):
    """ema_decay 0.1 caps the warm-up decay (1 + n) / (10 + n) from the first update on:
    ema_n = 0.1 * ema_(n-1) + 0.9 * weights_n, from ema_0 = the initial weights."""

    class Recording(LoggingTask):
        def training_step(self, batch, step):
            self.__dict__.setdefault("before", []).append(self.net.weight.detach().clone().double())
            yield from super().training_step(batch, step)

    task = Recording()
    folder = train(task, NoisyRegression(), _cfg(tmp_path, grad_accum=1, max_steps=3, ema_decay=0.1))
    after = task.before[1:] + [task.net.weight.detach().double()]
    ema = task.before[0]
    for weights in after:
        ema = 0.1 * ema + 0.9 * weights
    torch.testing.assert_close(load_weights(folder / "ema.safetensors")["weight"].double(), ema, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(ema, after[-1])  # the EMA lags the weights


def test_other_warnings_of_a_schedule_step_come_through():

    def schedule(s):
        if s:
            warnings.warn("from the schedule")
        return 1.0

    weight = nn.Parameter(torch.zeros(2))
    weight.grad = torch.ones(2)
    opt = torch.optim.SGD([weight], lr=1.0)
    task = types.SimpleNamespace(optimizers={"net": opt}, schedulers={"net": torch.optim.lr_scheduler.LambdaLR(opt, schedule)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loop._optimizer_step(task, "net", types.SimpleNamespace(sync_gradients=True, num_processes=1, scaler=None), None)
    assert [str(w.message) for w in caught] == ["from the schedule"]


@pytest.mark.parametrize("decay, target", [(None, True), (0.9, False)])
def test_no_ema_without_a_decay_or_a_target(tmp_path, decay, target):
    class Task(LoggingTask):
        def setup(self, accelerator):
            super().setup(accelerator)
            if not target:
                self.ema_target = None

    folder = train(Task(), NoisyRegression(), _cfg(tmp_path, max_steps=1, ema_decay=decay))
    assert (folder / "net.safetensors").is_file() and not (folder / "ema.safetensors").exists()


def test_a_dataset_of_exactly_one_global_batch_is_enough():
    assert list(EpochKeySampler(4, 4, epoch=0, seed=0)) != []
    assert len(list(EpochKeySampler(6, 3, epoch=0, seed=0, rank=1, world=2))) == 1
    with pytest.raises(ValueError, match=r"dataset has 5 samples, fewer than one global batch \(3 x 2\)"):
        EpochKeySampler(5, 3, epoch=0, seed=0, rank=0, world=2)


# --- Resuming a checkpoint of this version: the same order and worker draws (golden values) ---------

class WorkerDraws(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, key):
        return {"r": torch.randint(0, 10 ** 9, ())}


class WorkerDrawsStream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter([{"r": torch.randint(0, 10 ** 9, ())} for _ in range(2)])


def test_epoch_order_and_worker_draws_are_those_checkpoints_of_this_version_expect(tmp_path):
    """A run saved by this version resumes on the data order and the DataLoader workers' random draws
    it would have had: values recorded with torch 2.14.1 for seed 5, epoch 2 (a changed seeding
    formula would silently change the data of every resumed run)."""
    assert list(EpochKeySampler(12, 3, epoch=2, seed=5)) == [[33, 35, 26], [29, 24, 31], [32, 25, 27], [34, 28, 30]]
    cfg = _cfg(tmp_path, batch_size=2, num_workers=1, seed=5)
    draws = [b["r"].tolist() for b in loop._epoch_batches(WorkerDraws(), cfg, Position(epoch=2), _process())]
    assert draws == [[797915626, 729242791], [753982467, 741962022]]
    draws = [b["r"].tolist() for b in loop._epoch_batches(WorkerDrawsStream(), cfg, Position(epoch=2), _process())]
    assert draws == [[797915626, 729242791]]


def test_a_sharded_run_makes_images_on_every_process_and_writes_them_on_the_main_one(tmp_path, monkeypatch):
    """With sharded modules (a stand-in: every module counts as sharded) each process runs the task's
    images() (each lends its shards); only the main process writes the grids."""
    monkeypatch.setattr(loop, "is_sharded", lambda module: True)
    tasks = [LoggingTask(images={"mid": _constant_images(MID)}) for _ in range(2)]
    cfgs = [_cfg(tmp_path / str(rank), image_every=1) for rank in range(2)]
    processes, runs = _two_runs(tmp_path, monkeypatch, tasks, cfgs)
    try:
        processes.run(*[lambda r=r: r.finish_step(_batch()) for r in runs])
    finally:
        _close(runs)
    assert [len(task.seen) for task in tasks] == [1, 1]
    assert [p.name for p in (tmp_path / "0" / "run" / "images").iterdir()] == ["mid_00000001.png"]
    assert not (tmp_path / "1" / "run" / "images").exists()
