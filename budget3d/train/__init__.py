"""Training: ``TrainConfig`` + ``train(cfg)`` write a run folder (see trainer.py)."""

from budget3d.train.optim import VisibleAdam, exp_decay
from budget3d.train.trainer import TrainConfig, TrainingInterrupted, evaluate_run, resolve_config, setup, train

__all__ = ["TrainConfig", "TrainingInterrupted", "VisibleAdam", "evaluate_run", "exp_decay", "resolve_config",
           "setup", "train"]
