"""What every command-line entry point shares: argument basics and one-line errors."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from training.checkpoint import CheckpointError
from training.config import ConfigError
from training.loop import NonFiniteLossError

# Errors that mean "your input is wrong" (exit 2) or "the run went wrong" (exit 1): one line each.
BAD_INPUT = (ConfigError, CheckpointError, FileNotFoundError, ValueError)
RUN_FAILED = (NonFiniteLossError,)


def train_parser(description: str) -> argparse.ArgumentParser:
    """--config, --resume and trailing key=value overrides, as all three trainers take them."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML file under configs/")
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    return parser


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
