"""Training-loop behaviour the mutation run (make mutation) found untested, in one process: logged scalars,
image grids, resume messages, what train() sets up, TrainConfig's ranges, stopping on time, the EMA."""
import io
import logging
import signal
import sys
import types
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from PIL import Image
from test_training_loop import NoisyRegression
from torch import nn

import training.loop as loop
from common.cli import Interrupted
from common.config import ConfigError
from common.weights import load_weights
from training import TrainConfig, train
from training.checkpoint import CheckpointDir, Position
from training.ema import EMA
from training.finite import NonFiniteStateError
from loop_helpers import restore_signal_handlers  # noqa: F401 (autouse: each test's _Runs leave no signal handlers)
from loop_helpers import (
    Clock, Bar, LoggingTask, run_config, read_events, constant_images, MID, accelerator_as,
    ShardableTask
)


# --- Logged scalars: means over the window's micro-batches, samples per second ----------------------

def test_logged_scalars_are_window_means_and_the_sample_rate(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(loop, "time", clock)
    monkeypatch.setattr(loop, "tqdm", Bar)
    Bar.made = []
    task = LoggingTask(clock, seconds=0.5)
    train(task, NoisyRegression(), run_config(tmp_path))
    # 5 steps of 2 micro-batches of 4 samples, logged at steps 2, 4 and 5 (the last): micro-batches
    # 1-4, 5-8 and 9-10, each 0.5 s on the stand-in clock, so 16 samples / 2 s, 16 / 2 s, 8 / 1 s.
    events = read_events(tmp_path / "run" / "tensorboard")
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


def test_one_process_logs_its_own_means_without_a_collective(tmp_path, monkeypatch):
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: pytest.fail("no collective with one process"))
    task = LoggingTask()
    task.modules = {"net": task.net}
    accelerator = types.SimpleNamespace(is_main_process=True, num_processes=1, device=torch.device("cpu"))
    run = loop._Run(task, None, run_config(tmp_path), accelerator, CheckpointDir(tmp_path / "c"), Position(step=7), -1)
    run.meter.add({"one": 3.0})
    run.meter.count(4)
    run.log_scalars()
    run.writer.close()
    run.interrupted.restore()
    assert [(e.step, e.value) for e in read_events(tmp_path / "run" / "tensorboard").Scalars("one")] == [(7, 3.0)]


# --- Image grids --------------------------------------------------------------------------------------

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


def test_image_grids_are_written_at_the_image_steps_and_to_tensorboard(tmp_path, monkeypatch):
    task = LoggingTask(images={"wide": constant_images(WIDE), "mid": constant_images(MID)})
    train(task, NoisyRegression(), run_config(tmp_path, max_steps=4, image_every=2))
    folder = tmp_path / "run" / "images"
    assert sorted(p.name for p in folder.iterdir()) == [
        "mid_00000002.png", "mid_00000004.png", "wide_00000002.png", "wide_00000004.png"]
    want = {"wide": _grid_by_hand(WIDE, nrow=1), "mid": _grid_by_hand(MID, nrow=2)}
    for name in want:
        for step in (2, 4):
            np.testing.assert_array_equal(np.asarray(Image.open(folder / f"{name}_{step:08d}.png")), want[name])
    events = read_events(tmp_path / "run" / "tensorboard")
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
    task = LoggingTask(images={"mid": constant_images(MID)})
    with caplog.at_level(logging.WARNING, logger="training.loop"):
        train(task, NoisyRegression(), run_config(tmp_path, max_steps=2, image_every=2))
    assert "tensorboard not importable; scalars go to the progress bar only" in caplog.messages
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "run" / "images" / "mid_00000002.png")),
                                  _grid_by_hand(MID, nrow=2))
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_no_images_without_image_every(tmp_path):
    task = LoggingTask(images={"mid": constant_images(MID)})
    train(task, NoisyRegression(), run_config(tmp_path, max_steps=4, image_every=0))
    assert not (tmp_path / "run" / "images").exists() and task.seen == []


# --- Resume messages ---------------------------------------------------------------------------------

def test_resume_says_where_it_resumed_from_or_that_it_starts_afresh(tmp_path, caplog):
    cfg = run_config(tmp_path, max_steps=2, checkpoint_every=1)
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
    cfg = run_config(tmp_path, max_steps=3, grad_accum=1, checkpoint_every=1)
    train(LoggingTask(), NoisyRegression(), cfg)
    again = LoggingTask()
    train(again, NoisyRegression(), cfg)
    assert again.calls == 3  # all three steps again, not resumed at step 3
    assert not (tmp_path / "run" / "config.yaml").exists()  # no run_config, nothing recorded


def test_the_run_config_is_recorded_in_its_own_key_order(tmp_path):
    train(LoggingTask(), NoisyRegression(), run_config(tmp_path, max_steps=1), run_config={"b": 1, "a": {"d": 2, "c": 3}})
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
        train(LoggingTask(), NoisyRegression(), run_config(tmp_path, max_steps=1, mixed_precision=precision))
    assert (FP16_WARNING in caplog.messages) == warned
    assert not any("fp16" in m for m in caplog.messages if m != FP16_WARNING)


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_an_accelerate_fsdp_or_deepspeed_config_is_refused(tmp_path, monkeypatch, kind):
    accelerator_as(monkeypatch, distributed_type=getattr(DistributedType, kind))
    task = LoggingTask()
    with pytest.raises(ConfigError) as caught:
        train(task, NoisyRegression(), run_config(tmp_path))
    assert str(caught.value) == (
        f"accelerate's {getattr(DistributedType, kind).value} config is not used by these trainers (they do not "
        "hand their models to accelerate): launch with a multi-GPU config, e.g. configs/accelerate/fsdp-8gpu.yaml, "
        "and set train.shard=fsdp to shard the model")
    assert task.calls == 0 and not hasattr(task, "modules")


def test_fsdp_with_one_process_warns_and_trains_whole_modules(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(loop, "shard_task", lambda *a: pytest.fail("nothing to shard over with one process"))
    task = ShardableTask()
    with caplog.at_level(logging.WARNING, logger="training.loop"):
        train(task, NoisyRegression(), run_config(tmp_path, shard="fsdp", max_steps=2))
    assert "train.shard=fsdp with one process: nothing to split it over; the modules stay whole" in caplog.messages
    assert task.calls == 4


def test_fsdp_refuses_a_task_that_cannot_be_sharded_even_with_one_process(tmp_path):
    task = LoggingTask()
    with pytest.raises(ConfigError, match=r"train.shard=fsdp: LoggingTask cannot shard its module\(s\) \['net'\]"):
        train(task, NoisyRegression(), run_config(tmp_path, shard="fsdp"))
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


# --- Stopping on time ---------------------------------------------------------------------------------

def test_max_minutes_stops_at_the_first_step_past_the_limit_and_saves_it_once(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(loop, "time", clock)
    saved = []
    real_save = loop.save_checkpoint
    monkeypatch.setattr(loop, "save_checkpoint", lambda dir, pos, *a: (saved.append(pos.step), real_save(dir, pos, *a)))
    task = LoggingTask(clock, seconds=1.0)  # one second a step: 0.05 minutes is 3 s, passed at step 4
    last = train(task, NoisyRegression(), run_config(tmp_path, grad_accum=1, max_steps=100, max_minutes=0.05,
                                               checkpoint_every=2))
    assert last.name == "step_00000004" and task.calls == 4
    assert saved == [2, 4]
    assert CheckpointDir(tmp_path / "run" / "checkpoints").steps() == [2, 4]


def test_max_minutes_saves_a_step_the_schedule_did_not(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(loop, "time", clock)
    task = LoggingTask(clock, seconds=0.76)  # 3.04 s after step 4: just past 0.05 minutes
    last = train(task, NoisyRegression(), run_config(tmp_path, grad_accum=1, max_steps=100, max_minutes=0.05,
                                               checkpoint_every=3))
    assert last.name == "step_00000004" and CheckpointDir(tmp_path / "run" / "checkpoints").steps() == [3, 4]


def test_a_parameter_outside_the_tasks_modules_is_named_by_a_question_mark(tmp_path):

    class Stray(LoggingTask):
        def setup(self, accelerator):
            super().setup(accelerator)
            self.stray = nn.Parameter(torch.full((2,), float("inf")))
            self.optimizers["net"].add_param_group({"params": [self.stray]})

    with pytest.raises(NonFiniteStateError, match=r"made 1 weights NaN or infinite at step 1 \(e\.g\. \?; check"):
        train(Stray(), NoisyRegression(), run_config(tmp_path, grad_accum=1))


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
        train(LoggingTask(), SignalledEmptyStream(), run_config(tmp_path))
    assert CheckpointDir(tmp_path / "run" / "checkpoints").steps() == [0]


def test_a_stop_before_the_first_resumed_step_saves_nothing_new(tmp_path, monkeypatch):
    cfg = run_config(tmp_path, max_steps=2, grad_accum=1)
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
    folder = train(task, NoisyRegression(), run_config(tmp_path, grad_accum=1, max_steps=3, ema_decay=0.1))
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

    folder = train(Task(), NoisyRegression(), run_config(tmp_path, max_steps=1, ema_decay=decay))
    assert (folder / "net.safetensors").is_file() and not (folder / "ema.safetensors").exists()
