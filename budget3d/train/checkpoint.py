"""Checkpoints: everything needed to continue a run bit-for-bit, written atomically.

A checkpoint holds the parameters, each optimizer's state, the strategy's running state, the
step to run next, the progress history, the RNG states (torch, CUDA, numpy, python) and the
config. It is written to a temporary file and moved over ``checkpoint.pt`` with os.replace
(``runtime.save_torch``), so an interrupted write never leaves a broken checkpoint behind.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from budget3d.errors import UserError
from budget3d.runtime import save_torch

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, *, params, optimizers, strategy_state, step, history, config: dict, extra=None) -> None:
    path = Path(path)
    ckpt = {
        "step": int(step),
        "params": {k: v.detach().cpu() for k, v in params.items()},
        "requires_grad": {k: bool(v.requires_grad) for k, v in params.items()},
        "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
        "strategy_state": _to_cpu(strategy_state),
        "history": list(history),
        "rng": rng_state(),
        "config": dict(config),
        "extra": extra or {},
    }
    save_torch(ckpt, path)


def load_checkpoint(path, device="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint; give a run folder written by 'budget3d train' (it holds {CHECKPOINT})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for truncated / foreign files
        raise UserError(f"{path}: not a readable budget3d checkpoint ({type(e).__name__}); retrain or restore it") from None
    if not isinstance(ckpt, dict) or "params" not in ckpt or "step" not in ckpt:
        raise UserError(f"{path}: not a budget3d checkpoint (no params/step); give a run folder written by 'budget3d train'")
    ckpt["strategy_state"] = _to_device(ckpt.get("strategy_state", {}), device)
    return ckpt


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj
