"""Training: ``TrainConfig`` + ``train(cfg)`` write a run folder (see trainer.py). Names load on
first use: ``TrainConfig`` (config.py) without torch, the rest with it."""

_WHERE = {
    "TrainConfig": "config",
    "VisibleAdam": "optim", "exp_decay": "optim",
    "TrainingInterrupted": "trainer", "evaluate_run": "trainer", "resolve_config": "trainer", "setup": "trainer",
    "train": "trainer",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"budget3d.train.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'budget3d.train' has no attribute {name!r}")
