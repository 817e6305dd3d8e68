"""Training-loop behaviour the mutation run (make mutation) found untested."""
import pytest

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

import io
import logging
import sys
import types
from dataclasses import replace

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_training_loop import NoisyRegression
from torch import nn

import training.loop as loop
from common.config import ConfigError
from training import TrainConfig, TrainingTask, train
from training.checkpoint import CheckpointDir, Position
from training.ema import EMA


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
    shapes = [((2, 3), torch.float32), ((4,), torch.float64), ((3,), torch.float32), ((2, 2), torch.float64)]
    params, mine = [], []
    for k, (shape, dtype) in enumerate(shapes):
        p = nn.Parameter(torch.zeros(shape, dtype=dtype))
        p.grad = torch.arange(p.numel(), dtype=dtype).reshape(shape) * 10 + k
        params.append(p)
        mine.append(p.grad.clone())
    loop._average_gradients(params, 2)
    assert sorted(calls, key=str) == sorted([(torch.float32, 9), (torch.float64, 8)], key=str)
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
    from accelerate.state import AcceleratorState
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
    from accelerate import Accelerator
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


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_an_accelerate_fsdp_or_deepspeed_config_is_refused(tmp_path, monkeypatch, kind):
    from accelerate.utils import DistributedType
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
