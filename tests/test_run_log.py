"""training/run_log.py: sessions, training minutes and scalars of a run folder, resumed runs included."""
import os
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from training.run_log import read_scalars, training_minutes

T0 = 1_790_000_000


def _session(run: Path, start: int, last_write: int) -> Path:
    events = run / "tensorboard"
    events.mkdir(parents=True, exist_ok=True)
    path = events / f"events.out.tfevents.{start}.host.name.123.0"
    path.touch()
    os.utime(path, (last_write, last_write))
    return path


def _checkpoint(run: Path, step: int, written: int) -> None:
    state = run / "checkpoints" / f"step_{step:08d}" / "trainer_state.pt"
    state.parent.mkdir(parents=True)
    state.touch()
    os.utime(state, (written, written))


def test_minutes_leave_out_the_gaps_between_sessions(tmp_path):
    _session(tmp_path, T0, T0 + 600)
    _session(tmp_path, T0 + 1000, T0 + 2000)  # resumed after a 400 s gap
    minutes, source = training_minutes(tmp_path, [T0 + 300, T0 + 1300])
    assert minutes == pytest.approx([5.0, 15.0]) and "2 session(s)" in source


def test_minutes_leave_out_work_after_the_checkpoint_a_resume_started_from(tmp_path):
    _session(tmp_path, T0, T0 + 600)
    _session(tmp_path, T0 + 1000, T0 + 2000)
    _checkpoint(tmp_path, 100, T0 + 480)  # the first session's last checkpoint: its last 120 s were lost
    _checkpoint(tmp_path, 200, T0 + 1300)
    minutes, _ = training_minutes(tmp_path, [T0 + 480, T0 + 1300])
    assert minutes == pytest.approx([8.0, 13.0])


def test_minutes_without_event_files_count_from_the_config(tmp_path):
    (tmp_path / "config.yaml").touch()
    os.utime(tmp_path / "config.yaml", (T0, T0))
    minutes, source = training_minutes(tmp_path, [T0 + 90])
    assert minutes == pytest.approx([1.5]) and "config.yaml" in source
    with pytest.raises(FileNotFoundError, match="no tensorboard/ event files nor config.yaml"):
        training_minutes(tmp_path / "elsewhere", [T0])


def test_scalars_of_a_resumed_run_count_each_step_once(tmp_path):
    for start, values in ((T0, {1: 1.0, 2: 2.0, 3: 3.0}), (T0 + 100, {3: 30.0, 4: 40.0})):
        with SummaryWriter(str(tmp_path / "tensorboard"), filename_suffix=".part") as writer:
            for step, value in values.items():
                writer.add_scalar("loss", value, step)
        written = max((tmp_path / "tensorboard").glob("*.part"), key=os.path.getmtime)
        written.rename(tmp_path / "tensorboard" / f"events.out.tfevents.{start}.host.{start}.0")
    scalars = read_scalars(tmp_path)
    assert [(step, value) for _, step, value in scalars["loss"]] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        read_scalars(tmp_path / "elsewhere")
