"""Checkpoint behaviour the mutation run (make mutation) found untested: what a folder holds and loads back,
the exact resume of every RNG stream (each process its own), load errors naming the file, the room a save
checks for, sharded saves, pruning, and the removal of killed saves' leftovers."""
import errno
import logging
import os
import random
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

import training.checkpoint as checkpoint
from common.cli import RunFailed
from common.config import ConfigError
from common.disk import DiskFull
from common.weights import CheckpointError, load_torch, load_weights, read_metadata, save_torch, save_weights
from training import EMA, TrainingTask
from training.checkpoint import CheckpointDir, Position, load_checkpoint, save_checkpoint
from training.finite import NonFiniteStateError
from training.sharding import shard_task


def test_remove_leftovers_deletes_only_killed_saves_folders_and_files(tmp_path):
    root = tmp_path / "checkpoints"
    kept = CheckpointDir(root, keep=3).write(2, lambda folder: (folder / "weights.bin").write_bytes(b"w"))
    (root / ".step_00000004.abc").mkdir()
    (root / ".step_00000004.abc" / "part").write_bytes(b"half")
    (root / ".step_00000006.tmp").write_bytes(b"half-written file")
    (root / "notes.txt").write_text("not ours")

    removed = CheckpointDir(root, keep=3).remove_leftovers()

    assert [p.name for p in removed] == [".step_00000004.abc", ".step_00000006.tmp"]
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt", kept.name]
    assert (kept / "weights.bin").read_bytes() == b"w"
    assert CheckpointDir(root, keep=3).remove_leftovers() == []
    assert CheckpointDir(tmp_path / "absent", keep=3).remove_leftovers() == []


# --- A tiny task, saved and loaded through save_checkpoint / load_checkpoint with a stand-in accelerator.

class Tiny(TrainingTask):
    """Two modules (one trained by Adam with a StepLR schedule) and extra state, like the real tasks."""

    shardable = ("net",)

    def __init__(self, seed: int = 0, width: int = 6):
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, width), nn.Linear(width, 2))  # 4*w + w + 2*w + 2 weights
        self.critic = nn.Linear(2, 1)
        self.modules = {"net": self.net, "critic": self.critic}
        self.optimizers = {"net": torch.optim.Adam(self.net.parameters(), lr=0.1)}
        self.schedulers = {"net": torch.optim.lr_scheduler.StepLR(self.optimizers["net"], step_size=1, gamma=0.5)}
        self.ema_target = self.net
        self.history = [float(seed)]
        self.loaded = "not called"

    def step(self) -> None:
        self.net(torch.ones(3, 4)).pow(2).sum().backward()
        self.optimizers["net"].step()
        self.optimizers["net"].zero_grad()
        self.schedulers["net"].step()
        self.history.append(self.history[-1] + 1)

    def extra_state(self) -> dict:
        return {"history": torch.tensor(self.history)}

    def load_extra_state(self, state: dict) -> None:
        self.loaded = state


class Scaler:
    """A GradScaler stand-in: what fp16 runs save and load."""

    def __init__(self, scale: float):
        self.scale, self.loaded = scale, []

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_tracker": 3}

    def load_state_dict(self, state: dict) -> None:
        self.loaded.append(state)


def _accelerator(**kw) -> SimpleNamespace:
    waits = []
    acc = dict(num_processes=1, is_main_process=True, process_index=0, device=torch.device("cpu"), scaler=None,
               wait_for_everyone=lambda: waits.append(1), waits=waits)
    return SimpleNamespace(**{**acc, **kw})


def _trained(seed: int = 0, steps: int = 2) -> tuple[Tiny, EMA]:
    task = Tiny(seed)
    ema = EMA(task.net, decay=0.5)
    for _ in range(steps):
        task.step()
        ema.update(task.net)
    return task, ema


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_holds_each_module_the_ema_optimizers_and_position_and_loads_back(tmp_path):
    task, ema = _trained()
    root = tmp_path / "run" / "checkpoints"  # neither folder exists yet
    save_checkpoint(CheckpointDir(root, keep=2), Position(7, 2, 3), task, ema, _accelerator())
    folder = root / "step_00000007"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000007"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "critic.safetensors", "ema.safetensors", "net.safetensors", "optimizers.pt", "trainer_state.pt"]
    assert _same(load_weights(folder / "net.safetensors"), task.net.state_dict())
    assert _same(load_weights(folder / "critic.safetensors"), task.critic.state_dict())
    assert _same(load_weights(folder / "ema.safetensors"), ema.shadow.state_dict())
    assert read_metadata(folder / "ema.safetensors") == {"num_updates": 2}
    trainer = load_torch(folder / "trainer_state.pt")
    assert (trainer["step"], trainer["epoch"], trainer["batch_in_epoch"], list(trainer["rng"])) == (7, 2, 3, [0])
    assert sorted(load_torch(folder / "optimizers.pt")) == ["optimizers", "scaler", "schedulers", "task"]

    other = Tiny(seed=1)
    other_ema = EMA(other.net, decay=0.5)
    assert load_checkpoint(folder, other, other_ema, _accelerator()) == Position(step=7, epoch=2, batch_in_epoch=3)
    assert _same(other.net.state_dict(), task.net.state_dict())
    assert _same(other.critic.state_dict(), task.critic.state_dict())
    assert _same(other_ema.shadow.state_dict(), ema.shadow.state_dict()) and other_ema.num_updates == 2
    saved, loaded = task.optimizers["net"].state_dict(), other.optimizers["net"].state_dict()
    assert loaded["param_groups"] == saved["param_groups"]
    assert all(_same(loaded["state"][i], saved["state"][i]) for i in range(4))
    assert other.schedulers["net"].get_last_lr() == [0.025]  # 0.1 halved after each of the 2 steps
    assert other.loaded.keys() == {"history"} and other.loaded["history"].tolist() == [0.0, 1.0, 2.0]

    # A second save into the same (now existing) folder, without an EMA: no ema file.
    save_checkpoint(CheckpointDir(root, keep=2), Position(8, 2, 4), other, None, _accelerator())
    assert sorted(p.name for p in (root / "step_00000008").iterdir()) == [
        "critic.safetensors", "net.safetensors", "optimizers.pt", "trainer_state.pt"]
    assert load_checkpoint(root / "step_00000008", Tiny(seed=2), None, _accelerator()) == Position(8, 2, 4)


def _draws() -> list:
    return [random.gauss(0, 1), random.random(), np.random.randn(), *np.random.rand(2).tolist(),
            *torch.rand(2).tolist()]


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_a_resume_continues_the_python_numpy_and_torch_streams_exactly(tmp_path):
    task, ema = _trained()
    _seed_all(5)
    random.gauss(0, 1), np.random.randn()  # each caches its pair's second value: it is part of the state
    save_checkpoint(CheckpointDir(tmp_path), Position(3), task, ema, _accelerator())
    expected = _draws()
    _seed_all(99)
    load_checkpoint(tmp_path / "step_00000003", Tiny(), EMA(Tiny().net), _accelerator())
    assert _draws() == expected

    # A process the checkpoint has no streams for (a resume on more processes) keeps its own.
    _seed_all(99)
    own = _draws()
    other = Tiny()  # (seeds torch itself)
    _seed_all(99)
    load_checkpoint(tmp_path / "step_00000003", other, None, _accelerator(process_index=1))
    assert _draws() == own


def test_a_gpu_runs_cuda_streams_are_restored_on_a_gpu_and_left_alone_without_one(tmp_path, monkeypatch):
    restored = []
    task, ema = _trained()  # (before CUDA is faked: the optimizer would ask for its streams)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.arange(4, dtype=torch.uint8)])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    save_checkpoint(CheckpointDir(tmp_path), Position(3), task, ema, _accelerator())
    load_checkpoint(tmp_path / "step_00000003", Tiny(), None, _accelerator())
    assert len(restored) == 1 and [t.tolist() for t in restored[0]] == [[0, 1, 2, 3]]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # resumed on a machine without CUDA
    load_checkpoint(tmp_path / "step_00000003", Tiny(), None, _accelerator())
    assert len(restored) == 1


def test_what_does_not_fit_a_checkpoint_is_named_with_its_file(tmp_path):
    task, ema = _trained()
    save_checkpoint(CheckpointDir(tmp_path), Position(3), task, ema, _accelerator())
    folder = tmp_path / "step_00000003"
    narrow = Tiny(width=5)
    with pytest.raises(CheckpointError, match="^" + re.escape(
            f"{folder / 'net.safetensors'}: the task's module 'net' does not fit the weights: 3 mis-shaped, "  # (file order)
            f"e.g. ['0.bias (6,) (model (5,))', '0.weight (6, 4) (model (5, 4))', '1.weight (2, 6) (model (2, 5))']")
            + "$"):
        load_checkpoint(folder, narrow, EMA(narrow.net), _accelerator())

    shadow = ema.shadow.state_dict()
    del shadow["1.bias"]
    save_weights(shadow, folder / "ema.safetensors", {"num_updates": 2})
    with pytest.raises(CheckpointError, match="^" + re.escape(
            f"{folder / 'ema.safetensors'}: the EMA copy does not fit the weights: 1 missing, e.g. ['1.bias']") + "$"):
        load_checkpoint(folder, Tiny(), EMA(Tiny().net), _accelerator())

    (folder / "optimizers.pt").unlink()
    with pytest.raises(CheckpointError, match="^" + re.escape(f"checkpoint not found: {folder / 'optimizers.pt'}") + "$"):
        load_checkpoint(folder, Tiny(), None, _accelerator())


def test_an_ema_file_without_its_update_count_restarts_the_warm_up(tmp_path):
    task, ema = _trained(steps=3)
    save_checkpoint(CheckpointDir(tmp_path), Position(3), task, ema, _accelerator())
    path = tmp_path / "step_00000003" / "ema.safetensors"
    save_weights(ema.shadow.state_dict(), path)  # as written before the count was recorded
    resumed = EMA(Tiny().net, decay=0.5)
    resumed.num_updates = 9
    load_checkpoint(tmp_path / "step_00000003", Tiny(), resumed, _accelerator())
    assert resumed.num_updates == 0 and _same(resumed.shadow.state_dict(), ema.shadow.state_dict())


def test_the_loss_scaler_and_task_state_round_trip_and_older_checkpoints_start_them_fresh(tmp_path):
    task, ema = _trained()
    save_checkpoint(CheckpointDir(tmp_path), Position(3), task, ema, _accelerator(scaler=Scaler(1024.0)))
    scaler = Scaler(1.0)
    resumed = Tiny(seed=1)
    load_checkpoint(tmp_path / "step_00000003", resumed, None, _accelerator(scaler=scaler))
    assert scaler.loaded == [{"scale": 1024.0, "growth_tracker": 3}]
    assert resumed.loaded["history"].tolist() == [0.0, 1.0, 2.0]

    # A bf16 / fp32 run's checkpoint (no scaler state) resumed with fp16: the scaler starts fresh.
    save_checkpoint(CheckpointDir(tmp_path), Position(4), task, ema, _accelerator())
    scaler = Scaler(1.0)
    load_checkpoint(tmp_path / "step_00000004", Tiny(), None, _accelerator(scaler=scaler))
    assert scaler.loaded == []

    # A checkpoint from before tasks and scalers were saved: the task gets an empty state.
    states = load_torch(tmp_path / "step_00000004" / "optimizers.pt")
    save_torch({"optimizers": states["optimizers"], "schedulers": states["schedulers"]},
               tmp_path / "step_00000004" / "optimizers.pt")
    old = Tiny()
    scaler = Scaler(1.0)
    load_checkpoint(tmp_path / "step_00000004", old, None, _accelerator(scaler=scaler))
    assert old.loaded == {} and scaler.loaded == []


def test_a_save_checks_the_room_its_tensors_need_and_names_the_last_good_checkpoint(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(checkpoint, "check_free_space", lambda *args: asked.append(args))
    task, ema = _trained()
    root = tmp_path / "checkpoints"
    save_checkpoint(CheckpointDir(root, keep=2), Position(5), task, ema, _accelerator())
    save_checkpoint(CheckpointDir(root, keep=2), Position(7), task, ema, _accelerator())
    # net 44 and critic 3 float32 weights, the EMA's 44, Adam's two moments of 44 and its 4 step counts:
    # 183 x 4 bytes, plus 1 MiB for headers and the rest.
    needed = 183 * 4 + (1 << 20)
    assert asked == [
        (root, needed, "checkpoint of step 5",
         "free space there or lower train.keep_checkpoints (2), then --resume (last good checkpoint: none)"),
        (root, needed, "checkpoint of step 7",
         f"free space there or lower train.keep_checkpoints (2), then --resume "
         f"(last good checkpoint: {root / 'step_00000005'})")]


def test_a_full_or_read_only_disk_during_a_save_is_one_line_naming_the_folder(tmp_path, monkeypatch):
    task, ema = _trained()
    root = tmp_path / "checkpoints"

    def refused(number):
        def write(obj, path):
            raise OSError(number, os.strerror(number))
        return write
    monkeypatch.setattr(checkpoint, "save_torch", refused(errno.ENOSPC))
    with pytest.raises(DiskFull, match="^" + re.escape(f"checkpoint of step 3: no space left on the device of {root} (")
                       + r"\d+\.\d MB free\); " + re.escape(
                           "free space there or lower train.keep_checkpoints (3), then --resume "
                           "(last good checkpoint: none)") + "$"):
        save_checkpoint(CheckpointDir(root), Position(3), task, ema, _accelerator())
    monkeypatch.setattr(checkpoint, "save_torch", refused(errno.EROFS))
    with pytest.raises(ConfigError, match="^" + re.escape(
            f"checkpoint of step 3: cannot write to {root} (Read-only file system); choose a folder you can write to")
            + "$"):
        save_checkpoint(CheckpointDir(root), Position(3), task, ema, _accelerator())
    assert list(root.iterdir()) == []


def test_a_non_finite_weight_ema_or_optimizer_value_is_named_and_not_saved(tmp_path):
    for poison, name in [(lambda t, e: t.net[0].weight, "net.0.weight"), (lambda t, e: e.shadow[1].bias, "ema.1.bias"),
                         (lambda t, e: t.optimizers["net"].state[t.net[1].weight]["exp_avg"],
                          "optimizer.net.state.2.exp_avg")]:
        task, ema = _trained()
        with torch.no_grad():
            poison(task, ema).view(-1)[0] = float("inf")
        with pytest.raises(NonFiniteStateError, match="^" + re.escape(
                f"1 tensors are NaN or infinite at step 3 (e.g. {name}); not saved (last good checkpoint: none)") + "$"):
            save_checkpoint(CheckpointDir(tmp_path), Position(3), task, ema, _accelerator())
        assert list(tmp_path.iterdir()) == []


# --- Two processes, with torch.distributed's collectives played by a stand-in (this test is one process).

class TwoProcesses:
    """torch.distributed as one process of two sees it: the other process's RNG streams come from
    seed `other_seed`, and the other process reports a failed save when `other_failed`."""

    ReduceOp = dist.ReduceOp

    def __init__(self, other_seed: int = 5, other_failed: bool = False):
        self.other_seed, self.other_failed, self.reduced = other_seed, other_failed, []

    def all_gather_object(self, out: list, obj) -> None:
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        _seed_all(self.other_seed)
        other = checkpoint._rng_state()
        random.setstate(saved[0]), np.random.set_state(saved[1]), torch.set_rng_state(saved[2])
        out[:] = [obj, other]

    def all_reduce(self, tensor: torch.Tensor, op) -> None:
        assert op == dist.ReduceOp.MAX
        self.reduced.append(tensor.tolist())
        tensor.fill_(max(tensor.item(), float(self.other_failed)))


def test_the_main_process_saves_every_processs_streams_and_each_resumes_its_own(tmp_path, monkeypatch):
    fake = TwoProcesses(other_seed=5)
    monkeypatch.setattr(checkpoint, "dist", fake)
    task, ema = _trained()
    _seed_all(3)
    accelerator = _accelerator(num_processes=2)
    save_checkpoint(CheckpointDir(tmp_path), Position(3), task, ema, accelerator)
    assert fake.reduced == [[0.0]] and len(accelerator.waits) == 2  # no failure; waited before and after
    main = _draws()
    _seed_all(5)
    other = _draws()
    folder = tmp_path / "step_00000003"
    assert sorted(load_torch(folder / "trainer_state.pt")["rng"]) == [0, 1]
    first, second = Tiny(), Tiny()  # (each seeds torch itself)
    _seed_all(99)
    load_checkpoint(folder, first, None, _accelerator(num_processes=2, process_index=1))
    assert _draws() == other
    load_checkpoint(folder, second, None, _accelerator(num_processes=2, process_index=0))
    assert _draws() == main


def test_only_the_main_process_writes_and_every_process_fails_when_its_save_does(tmp_path, monkeypatch):
    task, ema = _trained()
    monkeypatch.setattr(checkpoint, "dist", TwoProcesses())
    save_checkpoint(CheckpointDir(tmp_path), Position(3), task, ema, _accelerator(num_processes=2, is_main_process=False))
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(checkpoint, "dist", TwoProcesses(other_failed=True))
    with pytest.raises(RunFailed, match=r"^the main process could not save the checkpoint of step 3 \(its error says why\)$"):
        save_checkpoint(CheckpointDir(tmp_path), Position(3), task, ema,
                        _accelerator(num_processes=2, is_main_process=False))

    def full(*args):
        raise DiskFull("checkpoint of step 3 needs more room")
    monkeypatch.setattr(checkpoint, "check_free_space", full)
    fake = TwoProcesses()
    monkeypatch.setattr(checkpoint, "dist", fake)
    with pytest.raises(DiskFull, match="^checkpoint of step 3 needs more room$"):  # the main raises its own error
        save_checkpoint(CheckpointDir(tmp_path), Position(3), task, ema, _accelerator(num_processes=2))
    assert fake.reduced == [[1.0]]  # after telling the others
    assert list(tmp_path.iterdir()) == []


# --- Sharded modules (train.shard=fsdp) in a one-process group: DTensor weights, EMA and optimizer state.

@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _sharded(seed: int, steps: int) -> tuple[Tiny, EMA]:
    task = Tiny(seed)
    ema = EMA(task.net, decay=0.5)
    shard_task(task, ["net"], ema, _accelerator())
    for _ in range(steps):
        task.step()
        ema.update(task.net)
    return task, ema


def _full(state: dict) -> dict:
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}


def test_a_sharded_task_saves_full_tensors_and_loads_them_back_into_its_shards(tmp_path, one_process_group):
    task, ema = _sharded(seed=0, steps=2)
    plain, plain_ema = _trained(seed=0, steps=2)  # the same training, unsharded
    save_checkpoint(CheckpointDir(tmp_path), Position(3), task, ema, _accelerator())
    folder = tmp_path / "step_00000003"
    for name, state in [("net", plain.net.state_dict()), ("ema", plain_ema.shadow.state_dict())]:
        written = load_weights(folder / f"{name}.safetensors")
        assert written.keys() == state.keys()
        assert all(torch.allclose(written[k], state[k], atol=1e-6) for k in state), name

    resumed, resumed_ema = _sharded(seed=1, steps=0)
    load_checkpoint(folder, resumed, resumed_ema, _accelerator())
    assert isinstance(resumed.net[0].weight, DTensor) and isinstance(resumed_ema.shadow[0].weight, DTensor)
    assert _same(_full(resumed.net.state_dict()), _full(task.net.state_dict()))
    assert _same(_full(resumed_ema.shadow.state_dict()), _full(ema.shadow.state_dict()))
    saved, loaded = task.optimizers["net"].state_dict()["state"], resumed.optimizers["net"].state_dict()["state"]
    assert all(isinstance(loaded[i]["exp_avg"], DTensor) for i in range(4))
    assert all(_same(_full(loaded[i]), _full(saved[i])) for i in range(4))

    # A process other than the main one only lends its shards: it writes nothing.
    save_checkpoint(CheckpointDir(tmp_path / "other"), Position(3), task, ema, _accelerator(is_main_process=False))
    assert not (tmp_path / "other").exists() or list((tmp_path / "other").iterdir()) == []


def test_a_sharded_save_refuses_when_any_process_finds_a_non_finite_shard(tmp_path, one_process_group, monkeypatch):
    task, ema = _sharded(seed=0, steps=1)
    with torch.no_grad():
        task.net[0].weight.to_local().view(-1)[0] = float("nan")
    fake = TwoProcesses()
    monkeypatch.setattr(checkpoint, "dist", fake)
    with pytest.raises(NonFiniteStateError, match=r"^1 tensors are NaN or infinite at step 3 \(e\.g\. net\.0\.weight\)"):
        save_checkpoint(CheckpointDir(tmp_path), Position(3), task, ema, _accelerator())
    assert fake.reduced == [[1.0]]  # the others are told

    task, ema = _sharded(seed=0, steps=1)
    fake = TwoProcesses(other_failed=True)  # this process's shards are finite, another's are not
    monkeypatch.setattr(checkpoint, "dist", fake)
    with pytest.raises(NonFiniteStateError, match="^" + re.escape(
            "1 tensors are NaN or infinite at step 3 (e.g. a shard of another process); not saved "
            "(last good checkpoint: none)") + "$"):
        save_checkpoint(CheckpointDir(tmp_path), Position(3), task, ema, _accelerator())
    assert fake.reduced == [[0.0]]
    assert list(tmp_path.iterdir()) == []


# --- Checkpoint folders.

def _complete(folder) -> None:
    (folder / "trainer_state.pt").write_bytes(b"state")


def test_steps_are_the_complete_step_folders_in_order_and_latest_is_the_last(tmp_path):
    assert CheckpointDir(tmp_path / "absent").steps() == [] and CheckpointDir(tmp_path / "absent").latest() is None
    for name in ["step_00000012", "step_00000005", "step_123456789", "step_00000007"]:
        (tmp_path / name).mkdir()
        if name != "step_00000007":  # a folder without its trainer state is no checkpoint
            _complete(tmp_path / name)
    (tmp_path / "step_00000009").write_bytes(b"a file")
    (tmp_path / "other_00000003").mkdir()
    _complete(tmp_path / "other_00000003")
    folder = CheckpointDir(tmp_path)
    assert folder.steps() == [5, 12, 123456789]
    assert folder.latest() == tmp_path / "step_123456789"
    assert folder.path(42) == tmp_path / "step_00000042"
    assert CheckpointDir(tmp_path / "empty").latest() is None


def test_write_fills_a_temporary_folder_renames_it_and_keeps_the_last_ones(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    seen = []

    def fill(folder):
        seen.append((folder.parent, folder.name))
        _complete(folder)

    folder = CheckpointDir(root)  # keeps 3 by default
    assert folder.write(1, fill) == root / "step_00000001"
    assert seen[0][0] == root and seen[0][1].startswith(".step_00000001.")
    for step in (2, 3, 4):
        folder.write(step, fill)
    assert folder.steps() == [2, 3, 4]
    CheckpointDir(root, keep=2).write(5, fill)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000005"]

    # The same step again replaces the folder.
    CheckpointDir(root, keep=2).write(5, lambda f: (_complete(f), (f / "again").write_bytes(b"2")))
    assert sorted(p.name for p in (root / "step_00000005").iterdir()) == ["again", "trainer_state.pt"]


def test_a_failed_fill_leaves_no_folder_and_raises_its_own_error(tmp_path):
    folder = CheckpointDir(tmp_path)
    folder.write(1, _complete)

    def broken(f):
        _complete(f)
        raise ValueError("disk went away")
    with pytest.raises(ValueError, match="disk went away"):
        folder.write(2, broken)

    def gone(f):  # the temporary folder vanished too: its error is still the one raised
        shutil.rmtree(f)
        raise ValueError("folder went away")
    with pytest.raises(ValueError, match="folder went away"):
        folder.write(3, gone)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]


def test_a_folder_that_cannot_be_removed_fails_neither_pruning_nor_the_start(tmp_path):
    # rmtree refuses symbolic links: a linked step folder, or leftover, stays where it is.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _complete(elsewhere)
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "step_00000001").symlink_to(elsewhere, target_is_directory=True)
    (root / ".step_00000002.x").symlink_to(elsewhere, target_is_directory=True)
    CheckpointDir(root, keep=1).write(3, _complete)
    assert CheckpointDir(root).steps() == [1, 3]
    assert [p.name for p in CheckpointDir(root).remove_leftovers()] == [".step_00000002.x"]
    assert (elsewhere / "trainer_state.pt").is_file()


def test_removing_leftovers_logs_them_and_skips_one_removed_meanwhile(tmp_path, monkeypatch, caplog):
    (tmp_path / ".step_00000004.a").mkdir()
    (tmp_path / ".step_00000006.b").write_bytes(b"half")
    listed = Path.iterdir

    def with_a_vanished_one(self):  # another hand removed it between the listing and its removal
        return [*listed(self), self / ".step_00000005.gone"]
    monkeypatch.setattr(Path, "iterdir", with_a_vanished_one)
    with caplog.at_level(logging.INFO, logger="training.checkpoint"):
        removed = CheckpointDir(tmp_path).remove_leftovers()
    assert [p.name for p in removed] == [".step_00000004.a", ".step_00000005.gone", ".step_00000006.b"]
    assert caplog.messages == ["removed 3 unfinished checkpoint(s) left by interrupted saves: "
                               ".step_00000004.a, .step_00000005.gone, .step_00000006.b"]
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
