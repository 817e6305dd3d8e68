"""training/run_log.py: sessions, training minutes and scalars of a run folder, resumed runs included."""
import os
import shutil
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
    state.parent.mkdir(parents=True, exist_ok=True)
    state.touch()
    os.utime(state, (written, written))


def _logged_session(run: Path, start: int, from_step: int, to_step: int, checkpoints: tuple[int, ...] = ()) -> int:
    """A session that started at `start` from step `from_step` and trained to `to_step` at 4 s a step,
    logging every 10 steps and saving `checkpoints` (1 s after the step's scalars); returns its last write."""
    events = run / "tensorboard"
    with SummaryWriter(str(events), filename_suffix=".part") as writer:
        for step in range(from_step + 10, to_step + 1, 10):
            writer.add_scalar("loss", 1.0 / step, step, walltime=start + 4 * (step - from_step))
    last_write = start + 4 * (to_step - from_step)
    path = next(events.glob("*.part")).rename(events / f"events.out.tfevents.{start}.host.name.123.0")
    os.utime(path, (last_write, last_write))
    for step in checkpoints:
        _checkpoint(run, step, start + 4 * (step - from_step) + 1)
    return last_write


def _pruned(run: Path, *steps: int) -> None:
    for step in steps:
        shutil.rmtree(run / "checkpoints" / f"step_{step:08d}")


def test_minutes_leave_out_the_gaps_between_sessions(tmp_path):
    _session(tmp_path, T0, T0 + 600)
    _session(tmp_path, T0 + 1000, T0 + 2000)  # resumed after a 400 s gap
    minutes, source = training_minutes(tmp_path, [T0 + 300, T0 + 1300])
    assert minutes == pytest.approx([5.0, 15.0]) and "2 session(s)" in source
    # Nothing in the folder tells where the second session started: counted as kept, and said so.
    assert "1 session(s) counted to their last write" in source


def test_minutes_leave_out_work_after_the_checkpoint_a_resume_started_from(tmp_path):
    _session(tmp_path, T0, T0 + 600)
    _session(tmp_path, T0 + 1000, T0 + 2000)
    _checkpoint(tmp_path, 100, T0 + 480)  # the first session's last checkpoint: its last 120 s were lost
    _checkpoint(tmp_path, 200, T0 + 1300)
    minutes, _ = training_minutes(tmp_path, [T0 + 480, T0 + 1300])
    assert minutes == pytest.approx([8.0, 13.0])


def test_a_session_that_crashed_before_its_first_checkpoint_counts_nothing(tmp_path):
    _logged_session(tmp_path, T0, 0, 150, checkpoints=(100,))  # killed at step 150: 100-150 lost
    _logged_session(tmp_path, T0 + 1000, 100, 140)  # resumed from 100, killed before saving 200: all lost
    end = _logged_session(tmp_path, T0 + 2000, 100, 300, checkpoints=(200, 300))  # resumed from 100 again
    minutes, source = training_minutes(tmp_path, [T0 + 401, T0 + 1100, end])
    # 401 s to step 100's checkpoint, nothing of the second session (a time in it counts as 401 s), 800 s
    assert minutes == pytest.approx([401 / 60, 401 / 60, 1201 / 60])
    assert "counted to their last write" not in source


def test_several_crashes_in_a_row_after_some_checkpoints_count_up_to_the_step_resumed_from(tmp_path):
    _logged_session(tmp_path, T0, 0, 250, checkpoints=(100, 200))
    _logged_session(tmp_path, T0 + 1200, 200, 280)  # both resumed from 200 and killed before 300
    _logged_session(tmp_path, T0 + 2000, 200, 290)
    end = _logged_session(tmp_path, T0 + 3000, 200, 400, checkpoints=(300, 400))
    _pruned(tmp_path, 100)  # keep_checkpoints=3
    [minutes], _ = training_minutes(tmp_path, [end])
    assert minutes == pytest.approx((801 + 800) / 60)


def test_a_session_whose_checkpoints_were_pruned_ends_at_the_step_the_next_resumed_from(tmp_path):
    _logged_session(tmp_path, T0, 0, 250, checkpoints=(100, 200))  # killed at 250, 3 min after saving 200
    end = _logged_session(tmp_path, T0 + 1200, 200, 500, checkpoints=(300, 400, 500))
    _pruned(tmp_path, 100, 200)  # keep_checkpoints=3: the first session's checkpoints are gone
    [minutes], source = training_minutes(tmp_path, [end])
    # Step 200 (logged at T0 + 800) is where the second session started: the first one's 200 s after it are lost.
    assert minutes == pytest.approx((800 + 1200) / 60)
    assert "counted to their last write" not in source


def test_a_restart_from_scratch_discards_the_sessions_before_it(tmp_path):
    _logged_session(tmp_path, T0, 0, 200, checkpoints=(100, 200))
    end = _logged_session(tmp_path, T0 + 1000, 0, 100, checkpoints=(100,))  # no --resume: step 100 rewritten
    [minutes], _ = training_minutes(tmp_path, [end])
    assert minutes == pytest.approx(400 / 60)


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
