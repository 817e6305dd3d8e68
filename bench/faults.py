"""Fault-injection campaign against the real trainers: what is tried, what survives, what is lost.

    python bench/faults.py --work /tmp/faults [--kills 20] [--disk-full 3] [--injections 3] [--concurrent 2]

Every fault hits train_stage1.py / train_stage2.py as separate processes on tiny configs:
- kills: `kill -9` at random moments, half of them while a checkpoint is being written (the
  trainer saves every step; a kill is aimed at a `.step_*` temporary folder as soon as one
  appears), then `--resume` until the run finishes. Survived = the final checkpoint and the
  exported model are bit-identical to an uninterrupted run's.
- disk full: a tmpfs too small for the run (mounting needs root; skipped otherwise). Survived =
  exit 1 with one line naming the lack of space, every checkpoint left on disk loads and is
  finite, and `--resume` on a larger disk finishes bit-identical to the uninterrupted run.
- injections: NaN into a weight, an infinite learning rate, inf into a discriminator weight the
  loss never reads. Survived = exit 1, one line, and every checkpoint on disk finite.
- concurrent: two trainers started together on one folder. Survived = one exits 2 naming the
  other, the other finishes with the uninterrupted run's bytes.
- interrupts: SIGINT and SIGTERM mid-run. Survived = exit 130 / 143, no exported model, and
  `--resume` finishes bit-identical.
Prints one markdown table (tried / survived / lost per fault) and writes it beside --work.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.weights import file_sha256, load_weights  # noqa: E402

STAGE1 = ["--config", str(ROOT / "configs/autoencoder/tiny-kl.yaml"), "data.shapes_length=8", "train.batch_size=2",
          "scale_factor_batches=1", "train.checkpoint_every=1", "train.keep_checkpoints=2", "train.ema_decay=0.9"]
STAGE2 = ["--config", str(ROOT / "configs/ldm/tiny.yaml"), "data.shapes_length=16", "train.batch_size=4",
          "train.checkpoint_every=1", "train.keep_checkpoints=2", "train.ema_decay=0.9"]
STEPS = 12
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


class Campaign:
    """The runs of one kind of fault, and the reference they are compared with."""

    def __init__(self, work: Path, stage1_file: Path | None = None):
        self.work, self.stage1_file = work, stage1_file

    def command(self, stage: int, out: Path, *extra: str) -> list[str]:
        if stage == 1:
            return [sys.executable, str(ROOT / "train_stage1.py"), *STAGE1, f"train.output_dir={out}",
                    f"train.max_steps={STEPS}", *extra]
        return [sys.executable, str(ROOT / "train_stage2.py"), *STAGE2, "--first-stage", str(self.stage1_file),
                f"train.output_dir={out}", f"train.max_steps={STEPS}", *extra]

    def run(self, stage: int, out: Path, *extra: str, wrapper: list[str] = ()) -> subprocess.CompletedProcess:
        command = self.command(stage, out, *extra)
        if wrapper:
            command = [sys.executable, __file__, *wrapper, "--", *command[1:]]
        return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=900)

    def start(self, stage: int, out: Path, *extra: str) -> subprocess.Popen:
        return subprocess.Popen(self.command(stage, out, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, cwd=ROOT, env=ENV)


def model_file(stage: int, out: Path) -> Path:
    return out / ("autoencoder.safetensors" if stage == 1 else "model.safetensors")


def fingerprint(stage: int, out: Path) -> tuple[str, str]:
    """sha256 of the exported model and of the last checkpoint's weights (the optimizer state included)."""
    last = out / "checkpoints" / f"step_{STEPS:08d}"
    digest = "|".join(file_sha256(p) for p in sorted(last.glob("*")) if p.suffix in (".safetensors", ".pt"))
    return file_sha256(model_file(stage, out)), digest


def one_line(stderr: str, prefix: str = "error:") -> str | None:
    """The outcome line when it is the only such line and no traceback was printed."""
    lines = [line for line in stderr.splitlines() if line.startswith(("error:", "interrupted:"))]
    if "Traceback" in stderr or len(lines) != 1 or not lines[0].startswith(prefix):
        return None
    return lines[0]


def checkpoints_finite(out: Path) -> bool:
    for path in (out / "checkpoints").glob("step_*/*.safetensors"):
        if not all(math.isfinite(float(t.float().abs().max())) for t in load_weights(path).values()
                   if t.is_floating_point() and t.numel()):
            return False
    return True


def kills(c: Campaign, n: int, reference: dict, rng: random.Random) -> tuple[int, int, int]:
    """n runs, each killed once (-9) during a step or a save, then resumed; (tried, survived, during a save)."""
    survived = during_save = done = 0
    while done < n:
        stage, aim_at_save = 1 + done % 2, done % 4 < 2
        out = c.work / f"kill{done}"
        shutil.rmtree(out, ignore_errors=True)
        if not _kill_at_random(c.start(stage, out), out, rng, aim_at_save):
            continue  # the run finished before its kill: not a fault, try again
        in_save = any((out / "checkpoints").glob(".step_*"))
        resumed = c.run(stage, out, "--resume")
        ok = resumed.returncode == 0 and fingerprint(stage, out) == reference[stage]
        survived, during_save, done = survived + ok, during_save + in_save, done + 1
        print(f"kill {done} (stage {stage}, {'during a save' if in_save else 'between saves'}): "
              f"{'ok' if ok else 'LOST'}", flush=True)
    return n, survived, during_save


def _kill_at_random(proc: subprocess.Popen, out: Path, rng: random.Random, aim_at_save: bool) -> bool:
    """SIGKILL the trainer after its first checkpoint, at a random later moment (or while it saves)."""
    while not any((out / "checkpoints").glob("step_*")) and proc.poll() is None:
        time.sleep(0.01)
    deadline = time.monotonic() + rng.uniform(0.0, 3.0)
    while proc.poll() is None:
        saving = aim_at_save and any(d.name.startswith(".step_") for d in _entries(out / "checkpoints"))
        if saving or (not aim_at_save and time.monotonic() > deadline):
            if saving:
                time.sleep(rng.uniform(0.0, 0.02))
            proc.kill()
            proc.wait()
            return True
        time.sleep(0.001)
    return False


def _entries(folder: Path) -> list[os.DirEntry]:
    try:
        return list(os.scandir(folder))
    except FileNotFoundError:
        return []


def disk_full(c: Campaign, n: int, reference: dict) -> tuple[int, int]:
    """Runs on tmpfs mounts that run out at different points: during the first save, a later one, the export."""
    survived = 0
    for i, megabytes in enumerate([4, 12, 20, 28][:n]):
        mount = c.work / f"tmpfs{i}"
        mount.mkdir(parents=True, exist_ok=True)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(mount)]).returncode:
            print("disk full: cannot mount a tmpfs (needs root); skipped")
            return 0, 0
        try:
            out = mount / "run"
            full = c.run(1, out)
            line = one_line(full.stderr)
            intact = checkpoints_finite(out)
            moved = c.work / f"disk{i}"
            shutil.copytree(out, moved, ignore=shutil.ignore_patterns(".run.lock"))
        finally:
            subprocess.run(["umount", str(mount)])
        resumed = c.run(1, moved, "--resume")
        ok = (full.returncode == 1 and line is not None and "MB free" in line and intact
              and resumed.returncode == 0 and fingerprint(1, moved) == reference[1])
        survived += ok
        print(f"disk full {megabytes} MB: exit {full.returncode}, {line!r}: {'ok' if ok else 'LOST'}", flush=True)
    return min(n, 4), survived


INJECTIONS = ("nan-weight", "inf-lr", "inf-idle-weight")


def injections(c: Campaign, n: int) -> tuple[int, int]:
    survived = 0
    for kind in INJECTIONS[:n]:
        out = c.work / f"inject-{kind}"
        result = c.run(1, out, "loss.disc_start=100", wrapper=["--inject", kind])
        line = one_line(result.stderr)
        ok = result.returncode == 1 and line is not None and ("NaN" in line or "nan" in line) and checkpoints_finite(out)
        survived += ok
        print(f"inject {kind}: exit {result.returncode}, {line!r}: {'ok' if ok else 'LOST'}", flush=True)
    return min(n, len(INJECTIONS)), survived


def concurrent(c: Campaign, n: int, reference: dict) -> tuple[int, int]:
    survived = 0
    for i in range(n):
        out = c.work / f"concurrent{i}"
        procs = [c.start(1, out), c.start(1, out)]
        codes = sorted(p.wait() for p in procs)
        errors = [one_line(p.stderr.read()) for p in procs]
        named = any(e and "is in use by pid" in e for e in errors)
        ok = codes == [0, 2] and named and fingerprint(1, out) == reference[1]
        survived += ok
        print(f"concurrent start {i}: exits {codes}: {'ok' if ok else 'LOST'}", flush=True)
    return n, survived


def interrupts(c: Campaign, reference: dict) -> tuple[int, int]:
    survived = 0
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        out = c.work / f"signal-{sig.name}"
        proc = c.start(1, out)
        while not any((out / "checkpoints").glob("step_*")) and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(sig)
        stopped = proc.wait() == code and one_line(proc.stderr.read(), "interrupted:") is not None
        stopped = stopped and not model_file(1, out).exists()
        resumed = c.run(1, out, "--resume")
        ok = stopped and resumed.returncode == 0 and fingerprint(1, out) == reference[1]
        survived += ok
        print(f"{sig.name}: {'ok' if ok else 'LOST'}", flush=True)
    return 2, survived


def inject_and_train(kind: str, command: list[str]) -> None:
    """Run a trainer (the argv after --) with one fault planted in its task's training step at step 3."""
    import torch

    import train_stage1
    from common.cli import run

    original = train_stage1.AutoencoderTask.training_step

    def poisoned(self, batch, step):
        if step == 3:
            with torch.no_grad():
                if kind == "nan-weight":
                    next(self.autoencoder.parameters()).view(-1)[0] = float("nan")
                elif kind == "inf-lr":
                    for group in self.optimizers["autoencoder"].param_groups:
                        group["lr"] = float("inf")
                else:  # a discriminator not started yet: neither a loss nor an optimizer step reads it
                    self.loss.discriminator_parameters()[0].view(-1)[0] = float("inf")
        yield from original(self, batch, step)

    train_stage1.AutoencoderTask.training_step = poisoned
    sys.argv = command
    run(train_stage1.main)


def main() -> None:
    if "--inject" in sys.argv:
        split = sys.argv.index("--")
        return inject_and_train(sys.argv[sys.argv.index("--inject") + 1], sys.argv[split + 1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (emptied first)")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--disk-full", type=int, default=3)
    parser.add_argument("--injections", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    started = time.time()

    c = Campaign(args.work, stage1_file=model_file(1, args.work / "reference1"))
    reference = {}
    for stage in (1, 2):
        result = c.run(stage, args.work / f"reference{stage}")
        assert result.returncode == 0, result.stderr
        reference[stage] = fingerprint(stage, args.work / f"reference{stage}")
    again = c.run(1, args.work / "reference1-again")
    assert again.returncode == 0 and fingerprint(1, args.work / "reference1-again") == reference[1], \
        "an uninterrupted stage-1 run does not reproduce itself: nothing below would mean anything"

    rows = []
    tried, ok, in_save = kills(c, args.kills, reference, random.Random(args.seed))
    rows.append((f"kill -9, then --resume ({in_save} during a save)", tried, ok))
    rows.append(("disk full (tmpfs), then --resume elsewhere", *disk_full(c, args.disk_full, reference)))
    rows.append(("NaN / inf injected into a weight, the lr, an idle discriminator", *injections(c, args.injections)))
    rows.append(("two trainers started on one folder", *concurrent(c, args.concurrent, reference)))
    rows.append(("SIGINT / SIGTERM, then --resume", *interrupts(c, reference)))
    table = ["| fault | tried | survived | lost |", "|---|---:|---:|---:|"]
    table += [f"| {name} | {tried} | {ok} | {tried - ok} |" for name, tried, ok in rows]
    text = "\n".join(table) + f"\n\n{(time.time() - started) / 60:.1f} min on {os.cpu_count()} cores\n"
    print(text)
    (args.work.parent / f"{args.work.name}.md").write_text(text)


if __name__ == "__main__":
    main()
