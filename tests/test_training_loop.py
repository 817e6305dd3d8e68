"""The shared loop: exact resume, accumulation, EMA, non-finite losses, atomic checkpoints."""
import signal
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from common.weights import load_weights
from training import NonFiniteLossError, TrainConfig, TrainingTask, train
from common.weights import CheckpointError, load_torch, save_torch
from common.cli import Interrupted
from common.disk import DiskFull
from training.checkpoint import CheckpointDir
from training.finite import NonFiniteStateError
from training.loop import EpochKeySampler


class NoisyRegression(Dataset):
    """Key-addressed samples whose 'augmentation' noise depends on the key, like the real datasets."""

    def __init__(self, n: int = 24):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 6, generator=g)
        self.y = self.x @ torch.randn(6, 2, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, key):
        i = key % len(self)
        jitter = torch.randn(6, generator=torch.Generator().manual_seed(key)) * 0.01
        return {"x": self.x[i] + jitter, "y": self.y[i], "caption": f"sample {i}"}


class GanLikeTask(TrainingTask):
    """Two optimizers and global-RNG use in the step, as the real tasks have."""

    def __init__(self, nan_at: int | None = None, lr: float = 1e-2):
        torch.manual_seed(123)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.1), nn.Linear(16, 2))
        self.critic = nn.Linear(2, 1)
        self.nan_at, self.lr = nan_at, lr

    def setup(self, accelerator):
        opt_g = torch.optim.AdamW(self.net.parameters(), lr=self.lr)
        opt_d = torch.optim.Adam(self.critic.parameters(), lr=1e-2)
        opt_g, opt_d = accelerator.prepare(opt_g, opt_d)
        self.modules = {"net": self.net, "critic": self.critic}
        self.optimizers = {"net": opt_g, "critic": opt_d}
        self.schedulers = {"net": torch.optim.lr_scheduler.LambdaLR(opt_g, lambda s: min(1.0, (s + 1) / 5))}
        self.ema_target = self.net

    def training_step(self, batch, step):
        pred = self.net(batch["x"] + 0.01 * torch.randn_like(batch["x"]))
        loss = (pred - batch["y"]).pow(2).mean()
        if self.nan_at is not None and step == self.nan_at:
            loss = loss * float("nan")
        yield "net", loss, {"mse": loss.item()}
        critic = self.critic(pred.detach()).pow(2).mean()
        yield "critic", critic, {"critic": critic.item()}


def _cfg(tmp_path, **kw):
    base = TrainConfig(output_dir=str(tmp_path / "run"), batch_size=4, max_steps=14, checkpoint_every=5,
                       keep_checkpoints=2, ema_decay=0.99, log_every=3, grad_clip=1.0)
    return replace(base, **kw)


def _final_weights(folder):
    return {**load_weights(folder / "net.safetensors"), **load_weights(folder / "ema.safetensors")}


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resume_is_exact(tmp_path, grad_accum):
    data = NoisyRegression()
    straight = train(GanLikeTask(), data, _cfg(tmp_path / "a", grad_accum=grad_accum))
    # Stop at step 7 (mid-epoch: 6 batches of 4 per epoch), then resume to 14.
    train(GanLikeTask(), data, _cfg(tmp_path / "b", grad_accum=grad_accum, max_steps=7))
    resumed = train(GanLikeTask(), data, _cfg(tmp_path / "b", grad_accum=grad_accum), resume=True)
    assert straight.name == resumed.name == "step_00000014"
    a, b = _final_weights(straight), _final_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # Training actually moved the weights.
    init = GanLikeTask().net.state_dict()
    assert not torch.equal(init["0.weight"], a["0.weight"])


def test_keeps_last_k_checkpoints(tmp_path):
    train(GanLikeTask(), NoisyRegression(), _cfg(tmp_path))
    steps = CheckpointDir(tmp_path / "run" / "checkpoints").steps()
    assert steps == [10, 14]


def test_non_finite_loss_stops_and_keeps_good_checkpoint(tmp_path):
    cfg = _cfg(tmp_path)
    train(GanLikeTask(), NoisyRegression(), replace(cfg, max_steps=5))
    good = load_weights(tmp_path / "run" / "checkpoints" / "step_00000005" / "net.safetensors")
    with pytest.raises(NonFiniteLossError, match="loss 'net' is nan at step 6"):
        train(GanLikeTask(nan_at=6), NoisyRegression(), cfg, resume=True)
    folder = CheckpointDir(tmp_path / "run" / "checkpoints")
    assert folder.steps() == [5]
    after = load_weights(folder.path(5) / "net.safetensors")
    assert all(torch.equal(good[k], after[k]) for k in good)


def test_sampler_covers_epoch_and_shards_ranks():
    batches = list(EpochKeySampler(10, 2, epoch=1, seed=0))
    keys = [k for b in batches for k in b]
    assert sorted(keys) == list(range(10, 20))
    assert list(EpochKeySampler(10, 2, epoch=1, seed=0, start=3)) == batches[3:]
    r0 = list(EpochKeySampler(10, 2, 1, 0, rank=0, world=2))
    r1 = list(EpochKeySampler(10, 2, 1, 0, rank=1, world=2))
    assert len(r0) == len(r1) == 2 and not set(sum(r0, [])) & set(sum(r1, []))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        EpochKeySampler(3, 4, 0, 0)


def test_torch_load_refuses_code_execution(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused or unreadable"):
        load_torch(path)
    save_torch({"w": torch.ones(2)}, tmp_path / "ok.pt")
    assert torch.equal(load_torch(tmp_path / "ok.pt")["w"], torch.ones(2))


def test_corrupt_and_missing_weights_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_weights(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(tmp_path / "nope.safetensors")


def test_max_minutes_stops_and_saves(tmp_path):
    last = train(GanLikeTask(), NoisyRegression(), _cfg(tmp_path, max_steps=1000, max_minutes=1e-9))
    assert last.name == "step_00000001"


def test_fp16_copy_keeps_metadata_and_integer_tensors(tmp_path):
    from common.weights import cast_weights_file, read_metadata, save_weights

    weights = {"w": torch.randn(3, 4), "step": torch.arange(3)}
    save_weights(weights, tmp_path / "a.safetensors", {"format": "ldm-stage2", "config": {"x": [1, 2]}})
    cast_weights_file(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    half = load_weights(tmp_path / "b.safetensors")
    assert half["w"].dtype == torch.float16 and half["step"].dtype == torch.int64
    torch.testing.assert_close(half["w"].float(), weights["w"], rtol=1e-3, atol=1e-3)
    assert torch.equal(half["step"], weights["step"])
    assert read_metadata(tmp_path / "b.safetensors") == {"format": "ldm-stage2", "config": {"x": [1, 2]}}
    assert (tmp_path / "b.safetensors").stat().st_size < (tmp_path / "a.safetensors").stat().st_size
    save_weights({"w": torch.tensor([1e6])}, tmp_path / "big.safetensors")
    with pytest.raises(CheckpointError, match="1 tensors do not fit torch.float16"):
        cast_weights_file(tmp_path / "big.safetensors", tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()


def test_written_files_and_checkpoint_folders_follow_the_umask(tmp_path, monkeypatch):
    # Not mkstemp's 0600: others on a shared machine may read what the umask lets them.
    from common import weights as checkpoint

    monkeypatch.setattr(checkpoint, "_UMASK", 0o022)
    checkpoint.save_weights({"w": torch.zeros(1)}, tmp_path / "a.safetensors")
    folder = CheckpointDir(tmp_path / "c").write(1, lambda f: None)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o644
    assert folder.stat().st_mode & 0o777 == 0o755


class PoisonedBufferTask(GanLikeTask):
    """A buffer (no optimizer sees it, no loss depends on it) turns infinite at step `at`."""

    def __init__(self, at: int):
        super().__init__()
        self.net.register_buffer("running_max", torch.zeros(2))
        self.at = at

    def training_step(self, batch, step):
        if step == self.at:
            self.net.running_max.fill_(float("inf"))
        yield from super().training_step(batch, step)


def test_an_infinite_learning_rate_stops_before_its_weights_are_saved(tmp_path):
    class BlowUp(GanLikeTask):  # the warm-up schedule turns the learning rate infinite from step 6 on
        def setup(self, accelerator):
            super().setup(accelerator)
            warmup = torch.optim.lr_scheduler.LambdaLR
            self.schedulers["net"] = warmup(self.optimizers["net"], lambda s: float("inf") if s >= 5 else 1.0)

    cfg = _cfg(tmp_path, grad_clip=None)
    train(GanLikeTask(), NoisyRegression(), replace(cfg, max_steps=5))
    with pytest.raises(NonFiniteStateError, match=r"optimizer 'net' made \d+ weights NaN or infinite at step 7 "
                                                  r"\(e\.g\. net\.0\.weight.*last good checkpoint: .*step_00000005\)"):
        train(BlowUp(), NoisyRegression(), cfg, resume=True)
    assert CheckpointDir(tmp_path / "run" / "checkpoints").steps() == [5]


def test_a_non_finite_state_is_never_saved(tmp_path):
    with pytest.raises(NonFiniteStateError, match=r"tensors are NaN or infinite at step 5 \(e\.g\. net\.running_max\); "
                                                  r"not saved \(last good checkpoint: none\)"):
        train(PoisonedBufferTask(at=3), NoisyRegression(), _cfg(tmp_path))
    folder = tmp_path / "run" / "checkpoints"
    assert CheckpointDir(folder).steps() == [] and not any(folder.glob(".step_*"))


def test_a_full_disk_during_a_save_is_one_line_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, keep_checkpoints=3)
    train(GanLikeTask(), NoisyRegression(), replace(cfg, max_steps=5))
    good = (tmp_path / "run" / "checkpoints" / "step_00000005" / "net.safetensors").read_bytes()

    def full(obj, path):  # what torch.save's zip writer raises on ENOSPC
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1324352 vs 1324240")
    monkeypatch.setattr("training.checkpoint.save_torch", full)
    with pytest.raises(DiskFull) as caught:
        train(GanLikeTask(), NoisyRegression(), cfg, resume=True)
    message = str(caught.value)
    assert "\n" not in message and "checkpoint of step 10: no space left on the device of" in message
    assert "lower train.keep_checkpoints (3)" in message and "step_00000005" in message
    folder = tmp_path / "run" / "checkpoints"
    assert CheckpointDir(folder).steps() == [5] and not any(folder.glob(".step_*"))
    assert (folder / "step_00000005" / "net.safetensors").read_bytes() == good


def test_a_save_needs_room_for_its_tensors_before_it_writes(tmp_path, monkeypatch):
    monkeypatch.setattr("common.disk.free_bytes", lambda folder: 100_000)
    with pytest.raises(DiskFull, match=r"checkpoint of step 5 needs about 1\.\d MB but .* has 0\.1 MB free"):
        train(GanLikeTask(), NoisyRegression(), _cfg(tmp_path))
    assert not any((tmp_path / "run" / "checkpoints").iterdir())


def test_a_signal_saves_the_step_reached_and_raises_interrupted(tmp_path):
    class SignalledTask(GanLikeTask):
        def training_step(self, batch, step):
            if step == 2:
                signal.raise_signal(signal.SIGTERM)
            yield from super().training_step(batch, step)

    with pytest.raises(Interrupted, match=r"SIGTERM at step 3: saved .*step_00000003; no model exported") as caught:
        train(SignalledTask(), NoisyRegression(), _cfg(tmp_path))
    assert caught.value.exit_code == 128 + signal.SIGTERM
    assert CheckpointDir(tmp_path / "run" / "checkpoints").steps() == [3]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the loop's handler is gone


def test_config_is_recorded_only_once_a_resume_has_loaded(tmp_path):
    cfg = _cfg(tmp_path, max_steps=5)
    train(GanLikeTask(), NoisyRegression(), cfg, run_config={"lr": 0.01})
    recorded = (tmp_path / "run" / "config.yaml").read_text()
    assert recorded == "lr: 0.01\n"

    class Wider(GanLikeTask):
        def __init__(self):
            super().__init__()
            self.critic = nn.Linear(2, 3)
    with pytest.raises(CheckpointError, match="critic"):
        train(Wider(), NoisyRegression(), replace(cfg, max_steps=6), resume=True, run_config={"lr": 0.02})
    assert (tmp_path / "run" / "config.yaml").read_text() == recorded


def test_killed_saves_leave_temporary_folders_that_the_next_start_removes(tmp_path):
    folder = CheckpointDir(tmp_path / "checkpoints")
    folder.write(4, lambda d: (d / "trainer_state.pt").write_bytes(b"x"))
    (tmp_path / "checkpoints" / ".step_00000008.k1ll3d").mkdir()
    (tmp_path / "checkpoints" / ".step_00000008.k1ll3d" / "net.safetensors").write_bytes(b"partial")
    assert [d.name for d in folder.remove_leftovers()] == [".step_00000008.k1ll3d"]
    assert [d.name for d in (tmp_path / "checkpoints").iterdir()] == ["step_00000004"]


@pytest.mark.parametrize("override,message", [
    ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ({"max_steps": 0}, "max_steps must be >= 1, got 0"),
    ({"grad_clip": float("nan")}, "grad_clip"),
    ({"ema_decay": 1.0}, "ema_decay"),
])
def test_train_config_values_out_of_range_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**override)
