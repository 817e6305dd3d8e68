"""Faults around a real trainer process: a second trainer on its folder, Ctrl-C, kill -9, a bad --resume.

Each test runs train_stage1.py as users do (a subprocess on a tiny config) and checks exit codes,
one-line messages and what is left on disk. bench/faults.py runs the longer campaign (random
kills during steps and saves, full disks, NaN injection) and counts what survived.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", str(ROOT / "configs/autoencoder/tiny-kl.yaml"), "data.shapes_length=8", "train.batch_size=2",
        "scale_factor_batches=1", "train.log_every=1"]


def _trainer(out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "train_stage1.py"), *TINY, f"train.output_dir={out}", *extra]


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_trainer(out, *extra), capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _start(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(_trainer(out, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"trainer ended early: {process.stderr.read()}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.2)


def _errors(stderr: str) -> list[str]:
    """The lines a user reads as the outcome (logging and the progress bar left out)."""
    return [line for line in stderr.splitlines() if line.startswith(("error:", "interrupted:"))]


def test_one_trainer_per_folder_and_ctrl_c_stops_it_resumably(tmp_path):
    out = tmp_path / "run"
    first = _start(out, "train.max_steps=100000", "train.checkpoint_every=1")
    try:
        _wait_for(out / "checkpoints" / "step_00000001", first)
        second = _run(out, "--resume")
        assert second.returncode == 2 and f"is in use by pid {first.pid} on " in second.stderr
        assert _errors(second.stderr) == [second.stderr.strip()]  # one line, nothing else
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=120) == 130
    finally:
        first.kill()
    stopped = _errors(first.stderr.read())
    assert len(stopped) == 1 and stopped[0].startswith("interrupted: Ctrl-C at step ")
    assert stopped[0].endswith("no model exported; continue with --resume")
    assert not (out / "autoencoder.safetensors").exists()
    step = int(stopped[0].split("at step ")[1].split(":")[0])
    assert (out / "checkpoints" / f"step_{step:08d}" / "trainer_state.pt").is_file()

    killed_save = out / "checkpoints" / ".step_99999999.k1ll3d"  # what a save killed half-way leaves
    killed_save.mkdir()
    finished = _run(out, "--resume", f"train.max_steps={step + 1}")
    assert finished.returncode == 0, finished.stderr
    assert (out / "autoencoder.safetensors").is_file() and not killed_save.exists()
    assert "removed 1 unfinished checkpoint(s) left by interrupted saves: .step_99999999.k1ll3d" in finished.stderr


def test_a_killed_trainer_leaves_no_lock_behind(tmp_path):
    out = tmp_path / "run"
    trainer = _start(out, "train.max_steps=100000")
    _wait_for(out / "config.yaml", trainer)
    trainer.kill()
    trainer.wait(timeout=60)
    assert f"pid {trainer.pid} on" in (out / ".run.lock").read_text()  # the record stays, the lock does not
    again = _run(out, "--resume", "train.max_steps=1")
    assert again.returncode == 0, again.stderr


def test_a_rejected_resume_keeps_the_runs_config(tmp_path):
    out = tmp_path / "run"
    assert _run(out, "train.max_steps=1").returncode == 0
    recorded = (out / "config.yaml").read_bytes()
    wider = _run(out, "--resume", "train.max_steps=2", "model.ddconfig.ch=64")
    assert wider.returncode == 2 and len(_errors(wider.stderr)) == 1
    assert "does not fit the weights" in wider.stderr
    assert (out / "config.yaml").read_bytes() == recorded
