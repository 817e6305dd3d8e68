"""Training-loop behaviour the mutation run (make mutation) found untested, over two processes (joined by
stand-in collectives): logged means, gradient averaging and clipping, agreeing on flags and stops, seeds
per rank, FSDP sharding, images of a sharded run."""
import concurrent.futures
import contextlib
import random
import threading
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
from test_training_loop import NoisyRegression
from torch import nn

import training.loop as loop
from training import NonFiniteLossError, train
from training.checkpoint import CheckpointDir, Position
from training.ema import EMA
from training.finite import NonFiniteStateError
from loop_helpers import restore_signal_handlers  # noqa: F401 (autouse: each test's _Runs leave no signal handlers)
from loop_helpers import (
    Clock, Bar, LoggingTask, run_config, read_events, constant_images, MID, stand_in_process,
    accelerator_as, ShardableTask
)


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
    run = loop._Run(task, None, run_config(tmp_path), accelerator, CheckpointDir(tmp_path / "c"), Position(step=3), -1)
    run.meter.add({"one": 3.0, "big": 2.0 ** 24 + 1})
    run.meter.add({"one": 3.0, "big": 2.0 ** 24 + 1})
    run.meter.count(4)
    run.meter.count(4)
    run.log_scalars()
    run.writer.close()
    run.interrupted.restore()
    events = read_events(tmp_path / "run" / "tensorboard")
    assert [(e.step, e.value) for e in events.Scalars("one")] == [(3, 2.0)]
    assert [(e.step, e.value) for e in events.Scalars("big")] == [(3, 2.0 ** 23 + 1)]
    assert reduced == [torch.float64]


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


class Stop(Exception):
    """Raised by a stand-in to end train() where a test has seen what it needs."""


def test_each_process_seeds_with_the_seed_plus_its_rank(tmp_path, monkeypatch):
    accelerator_as(monkeypatch, process_index=1)

    class StopAtSetup(LoggingTask):
        def setup(self, accelerator):
            super().setup(accelerator)
            raise Stop

    task = StopAtSetup()
    with pytest.raises(Stop):
        train(task, NoisyRegression(), run_config(tmp_path, seed=5))
    assert task.setup_seed == 6
    # numpy's and Python's generators too: the task saw what they draw after seeding with 6.
    np.random.seed(6)
    random.seed(6)
    assert task.setup_draws == (np.random.random(), random.random())


def test_fsdp_with_two_processes_shards_the_tasks_modules_with_its_ema(tmp_path, monkeypatch):
    made = accelerator_as(monkeypatch, num_processes=2)
    seen = []

    def shard_task(task, names, ema, accelerator):
        seen.append((task, names, ema, accelerator))
        raise Stop

    monkeypatch.setattr(loop, "shard_task", shard_task)
    task = ShardableTask()
    with pytest.raises(Stop):
        train(task, NoisyRegression(), run_config(tmp_path, shard="fsdp"))
    ((got_task, names, ema, accelerator),) = seen
    assert got_task is task and names == ["net"] and isinstance(ema, EMA) and accelerator is made[0]


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
        cfg = run_config(tmp_path / str(rank))
        runs.append(loop._Run(task, None, cfg, stand_in_process(rank, 2), CheckpointDir(tmp_path / "c"), Position(), -1))
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
    run = loop._Run(task, None, run_config(tmp_path), stand_in_process(0, 1), CheckpointDir(tmp_path / "c"), Position(), -1)
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
    processes, runs = _two_runs(tmp_path, monkeypatch, [LoggingTask(), NanLoss()], [run_config(tmp_path)] * 2)

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
    processes, runs = _two_runs(tmp_path, monkeypatch, [LoggingTask(), LoggingTask()], [run_config(tmp_path)] * 2)
    try:
        processes.run(*[lambda r=r: r.micro_step(_batch()) for r in runs])
        clock.now += 2.0
        processes.run(*[lambda r=r: r.log_scalars() for r in runs])
    finally:
        _close(runs)
    # 2 processes x 4 samples in 2 s on the stand-in clock.
    events = read_events(tmp_path / "run" / "tensorboard")
    assert [(e.step, e.value) for e in events.Scalars("samples_per_second")] == [(0, 4.0)]
    assert [(e.step, e.value) for e in events.Scalars("calls")] == [(0, 1.0)]


@pytest.mark.parametrize("who", [0, 1, None])
def test_a_signal_on_one_process_stops_both(tmp_path, monkeypatch, who):
    monkeypatch.setattr(loop, "save_checkpoint", lambda *a: pytest.fail("finish_step saves no signalled step"))
    processes, runs = _two_runs(tmp_path, monkeypatch, [LoggingTask(), LoggingTask()], [run_config(tmp_path)] * 2)
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
    cfgs = [run_config(tmp_path), run_config(tmp_path, max_minutes=0.01)]  # process 1 has 0.6 s
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
    processes, runs = _two_runs(tmp_path, monkeypatch, [LoggingTask(), LoggingTask()], [run_config(tmp_path)] * 2)
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


def test_a_sharded_run_makes_images_on_every_process_and_writes_them_on_the_main_one(tmp_path, monkeypatch):
    """With sharded modules (a stand-in: every module counts as sharded) each process runs the task's
    images() (each lends its shards); only the main process writes the grids."""
    monkeypatch.setattr(loop, "is_sharded", lambda module: True)
    tasks = [LoggingTask(images={"mid": constant_images(MID)}) for _ in range(2)]
    cfgs = [run_config(tmp_path / str(rank), image_every=1) for rank in range(2)]
    processes, runs = _two_runs(tmp_path, monkeypatch, tasks, cfgs)
    try:
        processes.run(*[lambda r=r: r.finish_step(_batch()) for r in runs])
    finally:
        _close(runs)
    assert [len(task.seen) for task in tasks] == [1, 1]
    assert [p.name for p in (tmp_path / "0" / "run" / "images").iterdir()] == ["mid_00000001.png"]
    assert not (tmp_path / "1" / "run" / "images").exists()
