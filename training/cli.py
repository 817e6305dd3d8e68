"""What the three trainers' command lines share: their arguments and the start of a run."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TypeVar

import yaml

from common.cli import ArgumentParser
from common.config import ConfigError, load_config, to_dict
from training.loop import seed_everything

T = TypeVar("T")


def train_parser(description: str) -> ArgumentParser:
    """--config, --resume and trailing key=value overrides, as all three trainers take them."""
    parser = ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML file under configs/")
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    return parser


def start_run(args: argparse.Namespace, schema: type[T]) -> T:
    """The run's config from --config and overrides; seeds everything (before any model is built,
    so initial weights are reproducible) and records the config in the output folder. A folder that
    already holds checkpoints is only continued (--resume), never silently trained over."""
    cfg = load_config(args.config, schema, args.overrides)
    out = Path(cfg.train.output_dir)
    if not args.resume and any((out / "checkpoints").glob("step_*")):
        # A fresh run there would be pruned against the old run's later steps and export its weights.
        raise ConfigError(f"{out} already holds a run's checkpoints: pass --resume to continue it, or choose "
                          f"another train.output_dir")
    seed_everything(cfg.train.seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return cfg
