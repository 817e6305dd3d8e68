"""Training-loop behaviour the mutation run (make mutation) found untested, in the data path: the epoch's
keys and batches (map and stream datasets, ranks, resume), loader workers and pinning, golden epoch order."""
import warnings

import pytest
import torch
from test_training_loop import NoisyRegression

import training.loop as loop
from training import train
from training.checkpoint import Position
from training.loop import EpochKeySampler
from loop_helpers import restore_signal_handlers  # noqa: F401 (autouse: each test's _Runs leave no signal handlers)
from loop_helpers import LoggingTask, run_config, stand_in_process


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


def test_a_stream_numbers_its_samples_by_global_batch_and_epoch(tmp_path):
    cfg = run_config(tmp_path, batch_size=3)
    stream = Stream()
    # Process 1 of 2, epoch 2, resumed after its first batch: its batches are the global batches
    # 1 * 2 + 1 = 3, 5, 7 of the epoch, keys 3 * 3 .. 3 * 3 + 2, ... plus 2 << 40.
    batches = list(loop._epoch_batches(stream, cfg, Position(epoch=2, batch_in_epoch=1), stand_in_process(1, 2)))
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

    batches = list(loop._epoch_batches(Plain(), run_config(tmp_path, batch_size=2), Position(), stand_in_process()))
    assert [b["x"].tolist() for b in batches] == [[0.0, 1.0], [2.0, 3.0]]
    assert [b["sample_key"].tolist() for b in batches] == [[0, 1], [2, 3]]


def test_map_batches_carry_their_keys_and_follow_rank_and_resume(tmp_path):
    class Keyed(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, key):
            return {"key": torch.tensor(key), "text": f"k{key}"}

    cfg = run_config(tmp_path, batch_size=2, seed=3)
    whole = list(loop._epoch_batches(Keyed(), cfg, Position(epoch=1), stand_in_process(0, 1)))
    assert len(whole) == 5
    keys = [b["sample_key"].tolist() for b in whole]
    assert sorted(k for b in keys for k in b) == list(range(10, 20))  # epoch 1 of 10 samples: keys 10..19
    assert all(b["key"].tolist() == k for b, k in zip(whole, keys)) and whole[0]["text"] == [f"k{k}" for k in keys[0]]
    resumed = list(loop._epoch_batches(Keyed(), cfg, Position(epoch=1, batch_in_epoch=3), stand_in_process(0, 1)))
    assert [b["sample_key"].tolist() for b in resumed] == keys[3:]
    rank0 = [b["sample_key"].tolist() for b in loop._epoch_batches(Keyed(), cfg, Position(epoch=1), stand_in_process(0, 2))]
    rank1 = [b["sample_key"].tolist() for b in loop._epoch_batches(Keyed(), cfg, Position(epoch=1), stand_in_process(1, 2))]
    assert len(rank0) == len(rank1) == 2
    assert [k for pair in zip(rank0, rank1) for b in pair for k in b] == [k for b in keys[:4] for k in b]


@pytest.mark.parametrize("stream", [False, True])
def test_making_an_epochs_loader_leaves_the_global_rng_alone(tmp_path, stream):
    data = Stream() if stream else NoisyRegression()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    list(loop._epoch_batches(data, run_config(tmp_path, batch_size=4), Position(epoch=1, batch_in_epoch=1), stand_in_process()))
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


# --- Epochs ---------------------------------------------------------------------------------------------

def test_each_epoch_sees_every_sample_once_under_its_own_keys(tmp_path):
    class KeyRecorder(LoggingTask):
        keys: list

        def training_step(self, batch, step):
            self.__dict__.setdefault("keys", []).append(batch["sample_key"].tolist())
            yield from super().training_step(batch, step)

    task = KeyRecorder()
    # 24 samples in batches of 4: 6 steps an epoch; 13 steps reach into a third epoch.
    train(task, NoisyRegression(), run_config(tmp_path, grad_accum=1, max_steps=13))
    assert len(task.keys) == 13
    for epoch in range(2):
        assert sorted(k for b in task.keys[6 * epoch: 6 * epoch + 6] for k in b) == list(range(24 * epoch, 24 * epoch + 24))
    assert all(48 <= k < 72 for k in task.keys[12])


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
        batches = list(loop._epoch_batches(data, run_config(tmp_path, batch_size=2, num_workers=workers), Position(),
                                           stand_in_process()))
        assert len(batches) == 2 and all(b["in_worker"].tolist() == [workers == 1] * 2 for b in batches)


def test_cpu_batches_are_not_pinned(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(loop._epoch_batches(NoisyRegression(), run_config(tmp_path, batch_size=4), Position(), stand_in_process()))
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
    cfg = run_config(tmp_path, batch_size=2, num_workers=1, seed=5)
    draws = [b["r"].tolist() for b in loop._epoch_batches(WorkerDraws(), cfg, Position(epoch=2), stand_in_process())]
    assert draws == [[797915626, 729242791], [753982467, 741962022]]
    draws = [b["r"].tolist() for b in loop._epoch_batches(WorkerDrawsStream(), cfg, Position(epoch=2), stand_in_process())]
    assert draws == [[797915626, 729242791]]
