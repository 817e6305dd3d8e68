"""Shared infrastructure: typed configs, the training loop, checkpoints, EMA."""
from training.checkpoint import CheckpointError, load_weights, save_weights
from training.config import ConfigError, load_config
from training.ema import EMA
from training.loop import NonFiniteLossError, TrainConfig, TrainingTask, train

__all__ = ["CheckpointError", "ConfigError", "EMA", "NonFiniteLossError", "TrainConfig", "TrainingTask",
           "load_config", "load_weights", "save_weights", "train"]
