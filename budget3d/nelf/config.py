"""``DistillConfig``: everything a distillation depends on (saved in its checkpoint), and its
checks, each error in the words the user typed."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from budget3d.errors import UserError

@dataclass
class DistillConfig:
    """Everything a distillation depends on; saved in its checkpoint (a resume reuses it)."""

    run: str = ""  # run folder written by 'budget3d train' (holds gaussians.ply and config.json)
    data: str = ""  # the run's scene folder when it moved ("": the one the run's config.json names)
    preset: str = "small"  # small | tiny | grid-small | grid-mobile | mobile-int8 | mobile-r2l (budget3d.nelf.students)
    iters: int = 4000  # optimisation steps
    minutes: float = 0.0  # stop after this many minutes of distillation and finish there (0: run every step)
    batch: int = 16  # teacher views per step (whole images, or one crop of each)
    real_steps: int = 0  # the last real_steps steps fine-tune on the real training images (training poses only)
    depth_weight: float = 0.1  # grid students: weight of the teacher's depth and alpha as a loss on the density (0: off)
    crop: int = 64  # train on random crop x crop windows of the views (a multiple of the preset's scale); 0 = whole views
    lr: Optional[float] = None  # peak AdamW learning rate (of the decoder for grid students); auto: 3e-3 r2l, 1e-2 grid
    grid_lr: float = 5e-2  # peak learning rate of a grid student's feature grids (no weight decay)
    weight_decay: float = 1e-2  # AdamW's decoupled weight decay
    warmup: int = 100  # steps of linear warm-up, then cosine decay to lr_final_frac * lr
    lr_final_frac: float = 0.02
    resolution: Optional[str] = None  # output "WxH" or "W" (height from the aspect); None = the train camera size
    arch: dict = field(default_factory=dict)  # grid students: settings over the preset's (students/grid.py DEFAULTS)
    n_points: int = 8  # K points per ray
    freqs: int = 6  # L positional-encoding frequencies
    n_poses: int = 2000  # size of the seeded teacher-pose pool (training poses + jittered ones)
    train_pose_frac: float = 0.25  # share of each batch drawn from the training poses
    cache_size: int = 0  # teacher renders kept in memory (LRU), never on disk; 0 = as many as fit in cache_mb
    cache_mb: int = 512  # memory for the teacher cache when cache_size is 0 (the whole pool when it fits)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    backend: str = "auto"  # teacher renderer: auto | torch | cpu | cuda
    checkpoint_every: int = 500
    log_every: int = 10
    eval_every: int = 0  # steps between test-view evaluations for the PSNR-time curve (0 = ten along the run)
    eval: bool = True  # evaluate on the test views at the end
    strip_views: int = 3  # test views in strip.png

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "DistillConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


FLAGS = ("preset", "iters", "minutes", "batch", "resolution")  # DistillConfig fields with a flag of their own


def flag(name: str, value) -> str:
    """How the user typed a setting: "--iters -5" or "--set crop=-1"."""
    return f"--{name} {value}" if name in FLAGS else f"--set {name}={value}"


def check_config(cfg: DistillConfig) -> None:
    """Every setting checked before any work, each error in the words the user typed."""
    from budget3d.nelf.students import PRESETS
    from budget3d.nelf.students.grid import DEFAULTS

    if cfg.preset not in PRESETS:
        raise UserError(f"{flag('preset', cfg.preset)}: unknown preset; choose one of {', '.join(PRESETS)}")
    for name in ("iters", "batch", "n_points", "freqs", "cache_mb", "log_every"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UserError(f"{flag(name, v)}: must be a positive whole number")
    for name in ("crop", "checkpoint_every", "eval_every", "warmup", "cache_size", "real_steps", "strip_views"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise UserError(f"{flag(name, v)}: must be a whole number >= 0")
    if cfg.real_steps > cfg.iters:
        raise UserError(f"{flag('real_steps', cfg.real_steps)}: must be at most the number of steps "
                        f"({flag('iters', cfg.iters)})")
    for name in ("lr", "grid_lr", "weight_decay", "lr_final_frac", "train_pose_frac", "depth_weight", "minutes"):
        v = getattr(cfg, name)
        if name == "lr" and v is None:  # auto: the kind's
            continue
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0 \
                or (name in ("lr", "grid_lr") and v == 0) or (name in ("lr_final_frac", "train_pose_frac") and v > 1):
            raise UserError(f"{flag(name, v)}: " + ("must be a positive number"
                                                    if name in ("lr", "grid_lr", "weight_decay", "depth_weight", "minutes")
                                                    else "must be between 0 and 1"))
    if cfg.n_poses < 1:
        raise UserError(f"{flag('n_poses', cfg.n_poses)}: must be a positive whole number")
    if cfg.arch:
        bad = sorted(set(cfg.arch) - set(DEFAULTS)) if PRESETS[cfg.preset] == "grid" else sorted(cfg.arch)
        if not isinstance(cfg.arch, dict) or bad:
            raise UserError(f"{flag('arch', cfg.arch)}: not settings of a grid student ({', '.join(map(str, bad))}); "
                            f"the grid presets take {', '.join(DEFAULTS)}")


__all__ = ["DistillConfig", "FLAGS", "check_config", "flag"]
