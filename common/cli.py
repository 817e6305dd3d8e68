"""What every command-line entry point shares: argument basics and one-line errors."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
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
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RUN_FAILED as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside a training loop
        print("interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
