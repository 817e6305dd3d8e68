"""Data parallelism through the launchers users run: torchrun and accelerate launch, 2 CPU processes over gloo.

Two processes with batch B / 2 must train the model one process trains with batch B (every random
draw belongs to a sample, gradients are averaged over the global batch), a run must resume on
another number of processes, and a launch that would run one process or two unconnected ones is a
one-line error.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.run_log import read_scalars

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
STAGE2 = ["--config", "ldm/tiny", "data.shapes_length=16", "train.log_every=1", "train.checkpoint_every=1",
          "latent_cache=true", "optim.lr=1e-4"]


@pytest.fixture(scope="module")
def stage1_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stage1")
    _run([sys.executable, ROOT / "train_stage1.py", "--config", "autoencoder/tiny-kl", "data.shapes_length=8",
          "train.batch_size=2", "scale_factor_batches=1", "train.max_steps=1", f"train.output_dir={out}"])
    return out / "autoencoder.safetensors"


def _run(command: list, expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert result.returncode == expect, result.stderr[-4000:]
    return result


def _stage2(launcher: list, stage1_file: Path, out: Path, batch: int, steps: int, *extra: str):
    _run([*launcher, ROOT / "train_stage2.py", *STAGE2, "--first-stage", stage1_file, f"train.output_dir={out}",
          f"train.batch_size={batch}", f"train.max_steps={steps}", *extra])


ONE = [sys.executable]
TWO = [BIN / "torchrun", "--nproc_per_node", "2", "--master_port", "29517"]


def _losses(out: Path) -> list[float]:
    return [value for _, _, value in sorted(read_scalars(out)["loss"], key=lambda row: row[1])]


def _max_difference(a: Path, b: Path, step: int, names=("unet", "text_encoder")) -> float:
    folder = f"checkpoints/step_{step:08d}"
    worst = 0.0
    for name in names:
        x, y = load_file(a / folder / f"{name}.safetensors"), load_file(b / folder / f"{name}.safetensors")
        assert x.keys() == y.keys()
        worst = max(worst, *((x[k] - y[k]).abs().max().item() for k in x))
    return worst


def test_two_processes_train_the_model_one_process_trains(tmp_path, stage1_file):
    _stage2(ONE, stage1_file, tmp_path / "one", 4, 3)
    _stage2(TWO, stage1_file, tmp_path / "two", 2, 3)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert torch.allclose(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=0)  # global-batch means
    assert _max_difference(tmp_path / "one", tmp_path / "two", 3) < 1e-5
    # One writer: the cache, checkpoints and model were written once, by the main process.
    assert len(list((tmp_path / "two" / "latent_cache").glob("*.safetensors"))) == 1
    assert (tmp_path / "two" / "model.safetensors").is_file()

    # A two-process run resumed on one process, and a one-process run resumed on two, finish alike.
    _stage2(TWO, stage1_file, tmp_path / "two-one", 2, 2)
    _stage2(ONE, stage1_file, tmp_path / "two-one", 4, 3, "--resume")
    _stage2(ONE, stage1_file, tmp_path / "one-two", 4, 2)
    _stage2(TWO, stage1_file, tmp_path / "one-two", 2, 3, "--resume")
    for resumed in ("two-one", "one-two"):
        assert _max_difference(tmp_path / "one", tmp_path / resumed, 3) < 1e-5, resumed


def test_controlnet_trains_alike_on_two_processes(tmp_path, stage1_file):
    """The ControlNet trainer's draws (latent posterior, caption dropout, timestep, noise) per sample too."""
    _stage2(ONE, stage1_file, tmp_path / "stage2", 4, 1)
    for launcher, batch, out in ((ONE, 4, "one"), (TWO, 2, "two")):
        _run([*launcher, ROOT / "train_controlnet.py", "--config", "controlnet/tiny", "--stage2",
              tmp_path / "stage2" / "model.safetensors", "train.max_steps=3", "train.checkpoint_every=3",
              f"train.batch_size={batch}", f"train.output_dir={tmp_path / out}"])
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert torch.allclose(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=0)
    assert _max_difference(tmp_path / "one", tmp_path / "two", 3, names=("controlnet",)) < 1e-5


def test_every_process_stops_at_the_same_step(tmp_path, stage1_file):
    """A time limit and a SIGTERM (as schedulers send) reach the processes at different moments; they
    agree on one step, save one checkpoint and exit alike."""
    _stage2(TWO, stage1_file, tmp_path / "timed", 2, 100000, "train.max_minutes=0.002", "train.checkpoint_every=1000")
    saved = [p.name for p in (tmp_path / "timed" / "checkpoints").iterdir()]
    assert len(saved) == 1 and (tmp_path / "timed" / "model.safetensors").is_file()

    command = [*TWO, ROOT / "train_stage2.py", *STAGE2, "--first-stage", stage1_file, "train.batch_size=2",
               "train.max_steps=100000", "train.checkpoint_every=1000", f"train.output_dir={tmp_path / 'signalled'}"]
    launcher = subprocess.Popen([str(c) for c in command], stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    events = tmp_path / "signalled" / "tensorboard"
    deadline = time.monotonic() + 300
    while not (events.is_dir() and any(events.iterdir())):  # training has started
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.5)
    time.sleep(3)
    launcher.send_signal(signal.SIGTERM)  # torchrun passes it on to both processes
    stderr = launcher.communicate(timeout=300)[1]
    stopped = [line for line in stderr.splitlines() if line.startswith("interrupted: SIGTERM at step")]
    assert len(stopped) == 2 and stopped[0] == stopped[1], stderr[-3000:]
    step = int(stopped[0].split("at step ")[1].split(":")[0])
    assert [p.name for p in (tmp_path / "signalled" / "checkpoints").iterdir()] == [f"step_{step:08d}"]


def test_stage1_with_its_gan_trains_alike_on_two_processes(tmp_path):
    """Posterior samples per sample, the adaptive GAN weight from the global batch's gradients; the
    PatchGAN with GroupNorm (BatchNorm statistics are per process on CPUs, synchronised on GPUs)."""
    for launcher, batch, out in ((ONE, 4, "one"), (TWO, 2, "two")):
        _run([*launcher, ROOT / "train_stage1.py", "--config", "autoencoder/tiny-kl", "data.shapes_length=8",
              "scale_factor_batches=1", "train.max_steps=3", "train.log_every=1", "optim.lr=1e-4",
              "loss.disc_norm=group", f"train.batch_size={batch}", f"train.output_dir={tmp_path / out}"])
    scalars = read_scalars(tmp_path / "one"), read_scalars(tmp_path / "two")
    for tag in ("l1", "kl", "g_loss", "d_weight", "disc_loss"):
        one, two = ([v for _, _, v in sorted(s[tag], key=lambda row: row[1])] for s in scalars)
        assert len(one) == 3 and torch.allclose(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=1e-7), tag
    # Biases right before a GroupNorm of one channel per group have an exact gradient of 0: Adam turns its
    # rounding noise into steps of about lr on any run. Those few elements aside, the weights agree.
    folder = "checkpoints/step_00000003"
    total = off = 0
    for name in ("autoencoder", "loss"):
        one, two = (load_file(tmp_path / run / folder / f"{name}.safetensors") for run in ("one", "two"))
        for key in one:
            difference = (one[key] - two[key]).abs()
            total, off = total + difference.numel(), off + int((difference > 1e-5).sum())
            assert difference.max() < 3 * 2 * 1e-4, key  # never more than Adam's largest steps of lr 1e-4
    assert off < 1e-3 * total, (off, total)


def test_accelerate_launch_runs_two_processes_or_says_why_not(tmp_path, stage1_file):
    launch = [BIN / "accelerate", "launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    _stage2([*launch, "--multi_gpu", "--num_processes", "2", "--main_process_port", "29518"], stage1_file,
            tmp_path / "multi", 2, 2)
    _stage2(TWO, stage1_file, tmp_path / "torchrun", 2, 2)
    assert _max_difference(tmp_path / "multi", tmp_path / "torchrun", 2) == 0  # the same two processes

    single = _run([*launch, "--cpu", "--num_processes", "2", ROOT / "train_stage2.py", *STAGE2, "--first-stage",
                   stage1_file, f"train.output_dir={tmp_path / 'cpu'}"], expect=1)  # accelerate turns our 2 into 1
    errors = [line for line in single.stderr.splitlines() if line.startswith("error:")]
    assert errors and errors[0].startswith("error: accelerate launch started one process although several")
    assert not (tmp_path / "cpu" / "checkpoints").exists()


def test_a_samples_draws_do_not_depend_on_its_batch():
    from common.randomness import rand, randn, sample_generators

    keys = [3, 17, 42, 5]
    whole = randn((4, 2, 3), sample_generators(0, keys))
    halves = torch.cat([randn((2, 2, 3), sample_generators(0, part)) for part in (keys[:2], keys[2:])])
    assert torch.equal(whole, halves)
    assert torch.equal(rand(4, sample_generators(0, keys))[1:2], rand(1, sample_generators(0, [17])))
    assert not torch.equal(randn((1, 6), sample_generators(0, [3])), randn((1, 6), sample_generators(1, [3])))
    draws = randn((1000, 1), sample_generators(0, range(1000)))[:, 0]  # neighbouring keys: unrelated streams
    assert abs(draws.mean()) < 0.1 and abs(draws.std() - 1) < 0.1
    assert abs(torch.corrcoef(torch.stack([draws[:-1], draws[1:]]))[0, 1]) < 0.1
