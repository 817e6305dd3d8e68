"""Bad input to every command, run as a user runs them: one line, no traceback, a non-zero exit, and
nothing in the output folder written, overwritten or deleted.

Each row of TABLE runs one command (generate.py, demo.py, python -m ldm.evaluate, python -m
autoencoder.evaluate, and the three trainers, whose output folder already holds an earlier run's
config.yaml and model) as a subprocess from the repository root with one bad value or file, and checks:
  - the exit code is not 0, and stderr holds no "Traceback";
  - stderr is exactly one line, starting "error:", that holds every string of the row's `mentions` (the
    offending option or file, and the limit or what the file is). Blank lines and the "INFO ..." lines
    of common.cli's logging are not counted: progress notes are not errors. Anything else counts,
    warnings too: a second complaint about one bad value is one too many, and a progress bar on
    stderr means sampling started before the input was checked;
  - the row's folder, holding the output folder with sentinel files (named like the files the command
    writes) before the run, is byte for byte and time for time as it was.
The model files are the tiny test models, saved here: a stage-2 model, a ControlNet on it and its
autoencoder as a stage-1 file.

Subprocess start-up (importing torch) takes 2-4 s on 2 CPU cores, so the selected rows run two at a
time while the tests wait for their own row.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from autoencoder.model_file import save_autoencoder
from ldm.controlnet import ControlNet, save_controlnet
from test_generate import tiny_model

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"generate": ["generate.py"], "demo": ["demo.py"], "ldm.evaluate": ["-m", "ldm.evaluate"],
            "autoencoder.evaluate": ["-m", "autoencoder.evaluate"], "train_stage1": ["train_stage1.py"],
            "train_stage2": ["train_stage2.py"], "train_controlnet": ["train_controlnet.py"]}
TRAINED = ("config.yaml", "model.safetensors")  # what a trainer's output folder holds after an earlier run
SENTINELS = {"generate": ("00000-a-red-apple-seed0.png", "grid-00000-a-red-apple.png"), "demo": ("prompts.txt",),
             "ldm.evaluate": ("results.json",), "autoencoder.evaluate": ("results.json",),
             "train_stage1": TRAINED, "train_stage2": TRAINED, "train_controlnet": TRAINED}
TIMEOUT = 600  # seconds; a row that starts sampling or evaluating on today's code may take a while

# Each command's arguments with nothing wrong; a row appends its bad ones (argparse keeps the last value).
GEN = ["a red apple", "--checkpoint", "{model}", "--steps", "1", "--size", "16", "--out", "{out}"]
CONTROL = ["--controlnet", "{controlnet}", "--control-image", "{control_image}", "--control", "canny"]
LDM_EVAL = ["--checkpoint", "{model}", "--data", "shapes", "--n", "2", "--steps", "1", "--batch-size", "2",
            "--size", "16", "--no-clip", "--device", "cpu", "--out", "{out}/results.json"]
STAGE1 = ["--config", "configs/autoencoder/tiny-kl.yaml", "train.output_dir={out}"]
STAGE2 = ["--config", "configs/ldm/tiny.yaml", "--first-stage", "{autoencoder}", "train.output_dir={out}"]
CONTROL_TRAIN = ["--config", "configs/controlnet/tiny.yaml", "--stage2", "{model}", "train.output_dir={out}"]
AE_EVAL = ["--checkpoint", "{autoencoder}", "--data", "shapes", "--n", "2", "--batch-size", "2", "--device", "cpu",
           "--lpips-path", "{files}/absent.pth", "--out", "{out}/results.json"]

# (row id, command, arguments, strings the error line must hold)
TABLE = [
    ("size-zero", "generate", [*GEN, "--size", "0"], ["--size", "got 0"]),
    ("size-not-multiple", "generate", [*GEN, "--size", "18"], ["--size", "multiple of 4"]),
    ("size-huge", "generate", [*GEN, "--size", "100000"], ["--size", "4096"]),
    ("cfg-nan", "generate", [*GEN, "--cfg", "nan"], ["--cfg", "nan"]),
    ("steps-zero", "generate", [*GEN, "--steps", "0"], ["--steps", "got 0"]),
    ("steps-past-schedule", "generate", [*GEN, "--sampler", "ddim", "--steps", "5000"], ["--steps", "1000"]),
    ("guidance-rescale", "generate", [*GEN, "--guidance-rescale", "2"], ["--guidance-rescale", "[0.0, 1.0]"]),
    ("eta-negative", "generate", [*GEN, "--sampler", "ddim", "--eta", "-1"], ["--eta", ">= 0"]),
    ("strength-above-one", "generate", [*GEN, "--init-image", "{init_image}", "--strength", "1.5"],
     ["--strength", "[0.0, 1.0]"]),
    ("repaint-resamples-zero", "generate",
     [*GEN, "--sampler", "ddim", "--init-image", "{init_image}", "--mask", "{init_image}",
      "--repaint-resamples", "0"], ["--repaint-resamples", "got 0"]),
    ("canny-high-past-255", "generate", [*GEN, *CONTROL, "--canny-high", "300"], ["--canny-high", "255"]),
    ("canny-low-above-high", "generate", [*GEN, *CONTROL, "--canny-low", "200", "--canny-high", "100"],
     ["--canny-low", "--canny-high"]),
    ("control-scale-nan", "generate", [*GEN, *CONTROL, "--control-scale", "nan"], ["--control-scale", "nan"]),
    ("seed-negative", "generate", [*GEN, "--seed", "-1"], ["--seed", "2**64 - 1"]),
    ("seed-past-2**64", "generate", [*GEN, "--seed", str(2**64)], ["--seed", "2**64 - 1"]),
    ("out-is-a-file", "generate", [*GEN, "--out", "{out}/grid-00000-a-red-apple.png"],
     ["--out", "grid-00000-a-red-apple.png"]),
    ("out-read-only", "generate", GEN, ["--out", "not writable"]),
    ("prompts-file-not-utf8", "generate", [*GEN[1:], "--prompts-file", "{files}/latin1.txt"],
     ["latin1.txt", "UTF-8"]),
    ("checkpoint-is-a-controlnet", "generate", [*GEN, "--checkpoint", "{controlnet}"],
     ["controlnet.safetensors", "is a ControlNet file", "--controlnet"]),
    ("checkpoint-is-an-autoencoder", "generate", [*GEN, "--checkpoint", "{autoencoder}"],
     ["autoencoder.safetensors", "is a stage-1 autoencoder file", "stage-2 model file"]),
    ("controlnet-is-a-stage2-model", "generate",
     [*GEN, "--controlnet", "{model}", "--control-image", "{control_image}"],
     ["model.safetensors", "is a stage-2 model file", "--checkpoint"]),
    ("cfg-nan", "ldm.evaluate", [*LDM_EVAL, "--cfg", "nan"], ["--cfg", "nan"]),
    ("size-not-multiple", "ldm.evaluate", [*LDM_EVAL, "--size", "18"], ["--size", "multiple of 4"]),
    ("checkpoint-is-a-controlnet", "ldm.evaluate", [*LDM_EVAL, "--checkpoint", "{controlnet}"],
     ["controlnet.safetensors", "is a ControlNet file"]),
    ("out-is-a-folder", "ldm.evaluate", [*LDM_EVAL, "--out", "{out}"], ["--out", "folder"]),
    ("checkpoint-is-a-controlnet", "autoencoder.evaluate", [*AE_EVAL, "--checkpoint", "{controlnet}"],
     ["controlnet.safetensors", "is a ControlNet file", "not a stage-1 autoencoder file"]),
    ("size-zero", "autoencoder.evaluate", [*AE_EVAL, "--size", "0"], ["--size", "got 0"]),
    ("out-is-a-folder", "autoencoder.evaluate", [*AE_EVAL, "--out", "{out}"], ["--out", "folder"]),
    ("row-is-a-folder", "autoencoder.evaluate", [*AE_EVAL, "--row", "{out}"], ["--row", "folder"]),
    ("edge-tolerance-negative", "autoencoder.evaluate", [*AE_EVAL, "--edge-tolerance", "-1"],
     ["--edge-tolerance", "got -1"]),
    ("out-is-a-file", "demo", ["--out", "{out}/prompts.txt"], ["--out", "prompts.txt"]),
    ("max-steps-zero", "train_stage1", [*STAGE1, "train.max_steps=0"], ["train: max_steps must be >= 1, got 0"]),
    ("batch-size-zero", "train_stage1", [*STAGE1, "train.batch_size=0"], ["train: batch_size must be >= 1, got 0"]),
    ("lr-infinite", "train_stage1", [*STAGE1, "optim.lr=.inf"], ["optim: lr must be", "(0, 1]", "inf"]),
    ("lr-past-float32", "train_stage1", [*STAGE1, "optim.lr=1e39"], ["optim: lr must be", "(0, 1]", "1e+39"]),
    ("lr-not-a-number", "train_stage1", [*STAGE1, "optim.lr=abc"], ["'optim.lr' must be a number, got 'abc'"]),
    ("config-not-yaml", "train_stage1", ["--config", "{files}/broken.yaml", "train.output_dir={out}"],
     ["broken.yaml:3:1:", "flow sequence at line 2"]),
    ("output-dir-read-only", "train_stage1", STAGE1, ["cannot write to the output folder", "choose another"]),
    ("output-dir-is-a-file", "train_stage1", [*STAGE1, "train.output_dir={out}/config.yaml"],
     ["config.yaml", "cannot write to the output folder"]),
    ("first-stage-is-a-controlnet", "train_stage2", [*STAGE2, "--first-stage", "{controlnet}"],
     ["controlnet.safetensors", "is a ControlNet file"]),
    ("init-from-is-a-controlnet", "train_stage2", [*STAGE2[:2], "--init-from", "{controlnet}", *STAGE2[4:]],
     ["controlnet.safetensors", "is a ControlNet file"]),
    ("guidance-nan", "train_stage2", [*STAGE2, "samples.guidance=.nan"], ["samples: guidance", "nan"]),
    ("caption-dropout-above-one", "train_stage2", [*STAGE2, "caption_dropout=2"], ["caption_dropout", "[0, 1]"]),
    ("stage2-is-an-autoencoder", "train_controlnet", [*CONTROL_TRAIN, "--stage2", "{autoencoder}"],
     ["autoencoder.safetensors", "is a stage-1 autoencoder file"]),
]
ROWS = {f"{command}:{row_id}": (command, args, mentions) for row_id, command, args, mentions in TABLE}
assert len(ROWS) == len(TABLE), "row ids must be unique per command"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The model and input files the rows name: the tiny stage-2 model, a ControlNet on it, its
    autoencoder as a stage-1 file, 16-pixel images and a prompts file in Latin-1."""
    folder = tmp_path_factory.mktemp("inputs")
    model = tiny_model()
    model.save(folder / "model.safetensors")
    save_controlnet(folder / "controlnet.safetensors", ControlNet.from_unet(model.unet, latent_factor=2))
    save_autoencoder(model.autoencoder, model.autoencoder_cfg, folder / "autoencoder.safetensors", 0.5)
    Image.new("RGB", (16, 16), (200, 30, 30)).save(folder / "init.png")
    Image.new("RGB", (16, 16), (30, 200, 30)).save(folder / "control.png")
    (folder / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    (folder / "broken.yaml").write_text("train:\n  batch_size: [4\n")
    return {"model": folder / "model.safetensors", "controlnet": folder / "controlnet.safetensors",
            "autoencoder": folder / "autoencoder.safetensors", "init_image": folder / "init.png",
            "control_image": folder / "control.png", "files": folder}


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under `folder`: its bytes (files) and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def make_read_only(folder: Path) -> bool:
    """Make `folder` unwritable; False if this machine cannot. Root ignores file modes, but not the
    immutable attribute (chattr +i, on file systems that have it)."""
    folder.chmod(0o555)
    if os.access(folder, os.W_OK) and shutil.which("chattr"):
        subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    return not os.access(folder, os.W_OK)


def make_writable(folder: Path) -> None:
    if shutil.which("chattr"):
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    folder.chmod(0o755)


def run_row(command: str, argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, *COMMANDS[command], *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def outcomes(request, files, tmp_path_factory) -> dict[str, tuple]:
    """Runs the rows selected in this session, two at a time: row key -> (result, folder before, after),
    or a reason to skip the row."""
    selected = [item.callspec.params["row"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")]
    prepared, results, read_only = {}, {}, []
    for key in selected:
        command, args, _ = ROWS[key]
        folder = tmp_path_factory.mktemp("row")
        out = folder / "out"
        out.mkdir()
        for name in SENTINELS[command]:
            (out / name).write_bytes(f"sentinel {name}\n".encode())
        if key.endswith((":out-read-only", ":output-dir-read-only")):
            read_only.append(out)
            if not make_read_only(out):
                results[key] = "this machine cannot make a folder read-only for this user"
                continue
        names = {name: str(path) for name, path in files.items()} | {"out": str(out)}
        prepared[key] = (folder, [arg.format(**names) for arg in args], snapshot(folder))
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = {key: pool.submit(run_row, ROWS[key][0], argv) for key, (_, argv, _) in prepared.items()}
            for key, future in futures.items():
                folder, _, before = prepared[key]
                results[key] = (future.result(), before, snapshot(folder))
    finally:
        for folder in read_only:
            make_writable(folder)
    return results


def error_lines(stderr: str) -> list[str]:
    """stderr without blank lines and common.cli's INFO log lines (see the module doc)."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("INFO ")]


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input_is_one_line_and_writes_nothing(outcomes, row):
    if isinstance(outcomes[row], str):
        pytest.skip(outcomes[row])
    result, before, after = outcomes[row]
    mentions = ROWS[row][2]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr[-3000:]
    assert all(text in lines[0] for text in mentions), f"{lines[0]!r} should mention {mentions}"
    assert result.returncode != 0
    assert after == before, "the output folder changed"
