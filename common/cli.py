"""What every command-line entry point shares: argument basics and one-line errors."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Callable

from common.config import ConfigError
from common.weights import CheckpointError


class RunFailed(RuntimeError):
    """A run that went wrong though its input was fine (e.g. a loss turned NaN): exit code 1."""


class Interrupted(Exception):
    """A run stopped by a signal after saving what it had: exit code 128 + the signal's number (Ctrl-C: 130),
    so `train_stage1.py ... && train_stage2.py ...` does not go on with an unfinished model."""

    def __init__(self, message: str, signal_number: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + int(signal_number)


# Errors that mean "your input is wrong" (exit 2) or "the run went wrong" (exit 1): one line each.
BAD_INPUT = (ConfigError, CheckpointError, FileNotFoundError, ValueError)
RUN_FAILED = (RunFailed,)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (`error: <prog>: <message>`, exit code 2) instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (--help lists the options)\n")


def run(main: Callable[[], object]) -> None:
    """Call `main`; turn expected failures into one line on stderr and a non-zero exit code."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except BAD_INPUT as e:
        _say(f"error: {e}")
        sys.exit(2)
    except RUN_FAILED as e:
        _say(f"error: {e}")
        sys.exit(1)
    except Interrupted as e:
        _say(f"interrupted: {e}")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside a training loop
        _say("interrupted")
        sys.exit(128 + signal.SIGINT)


def _say(line: str) -> None:
    """One line on stderr in one write: several processes of a run (torchrun) share the stream, and
    print's separate write of the newline lets their lines run together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def check_output_folder(path: str | Path, flag: str = "--out") -> None:
    """A one-line ValueError naming `flag` unless `path` is a folder this process can write into, or one it
    can create: checked before any work, so that a typo costs nothing and no run dies at its first write."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a folder")
    _check_writable_parent(path, flag)


def check_output_file(path: str | Path, flag: str = "--out") -> None:
    """As `check_output_folder`, for a file to be written (or replaced) at `path`."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give the name of the file to write, e.g. {path / 'results.json'}")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{flag} {path} is not writable")
    _check_writable_parent(path.parent, flag)


def _check_writable_parent(folder: Path, flag: str) -> None:
    """The nearest existing folder of `folder` (itself, or where it would be created) must take new files."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {folder}: folder {existing} is not writable")
