"""The shared training loop and what belongs to a run: EMA, checkpoint folders, the trainers' CLI."""
from training.ema import EMA, ema_weights, eval_mode
from training.loop import NonFiniteLossError, TrainConfig, TrainingTask, train

__all__ = ["EMA", "NonFiniteLossError", "TrainConfig", "TrainingTask", "ema_weights", "eval_mode", "train"]
