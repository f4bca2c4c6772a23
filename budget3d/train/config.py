"""``TrainConfig``: everything a run depends on (saved as config.json). No torch here, so the
CLI can build its flags from it quickly: each field is a ``budget3d train`` flag, its metadata the
flag's help (and argparse's choices/metavar/action where a field needs them). ``resolve_config``
fills its auto fields once the device is known."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from budget3d.errors import UserError

SCORES = ("full", "grad")
DEVICES = ("auto", "cpu", "cuda")


def _flag(default, help: str, **argparse_kw):
    """A field whose ``budget3d train`` flag says ``help`` (the CLI appends the default; ``shown`` replaces
    it); ``argparse_kw`` (choices, metavar, action) go to ``add_argument`` as they are."""
    return field(default=default, metadata={"help": help, **argparse_kw})


@dataclass
class TrainConfig:
    """Everything a run depends on. ``None`` schedule fields are 'auto' (scaled to ``iters``)."""

    data: str = _flag("", "scene folder (not needed with --resume)", metavar="PATH")  # Blender/nerfstudio/COLMAP/LLFF
    out: str = "runs/run"  # run folder
    budget: Optional[str] = _flag(None, 'Gaussian budget: a count ("200000", "200k"), "15x" the initial points, or '
                                  'a .ply size ("30MB"); not needed for --strategy default',
                                  metavar="BUDGET", shown="none")
    iters: Optional[int] = _flag(None, "training steps (auto: 3000 on the CPU; 30000 on CUDA, densifying every 100 "
                                 "from 500 to 15000, the 3DGS/Taming schedule)")
    device: str = _flag("auto", "auto | cpu | cuda", choices=DEVICES)
    backend: str = _flag("auto", "renderer backend", choices=("auto", "torch", "cpu", "cuda"))  # budget3d.splat.render
    downscale: int = _flag(1, "image downscale factor")
    sh_degree: int = _flag(3, "spherical-harmonics degree 0..3")
    strategy: str = _flag("taming", "densification: taming (exact budget), default (classic 3DGS, no budget), "
                          "mcmc (3DGS-MCMC relocation, grown on the budget schedule to exactly the budget, every device)", choices=("taming", "default", "mcmc"))
    seed: int = _flag(0, "random seed")
    batch: int = _flag(1, "views per step and process: the step's loss is the mean over them (under torchrun "
                       "the global batch is batch x processes, each rendering its own)")
    # initialisation (budget3d/train/init.py): the scene's points, else random ones
    init_points: int = _flag(5000, "random points when the scene has none")
    init_opacity: float = _flag(0.1, "opacity of the first Gaussians")
    init_bg_fraction: float = _flag(0.5, "points behind the foreground, x max(scene points, init_points) (photos only)")
    # learning rates (3DGS); means are scaled by the scene extent and decay exponentially
    means_lr: float = _flag(1.6e-4, "x the scene scale, decaying exponentially to means_lr_final")
    means_lr_final: float = _flag(1.6e-6, "x the scene scale, at the last step")
    scales_lr: float = _flag(5e-3, "Adam learning rates of the other parameters (3DGS's)")
    quats_lr: float = 1e-3
    opacities_lr: float = 5e-2
    sh0_lr: float = 2.5e-3
    shN_lr: float = 2.5e-3 / 20
    ssim_lambda: float = _flag(0.2, "loss = (1 - l) L1 + l (1 - SSIM)")
    random_background: bool = _flag(False, "train on random background colours", action="store_true")
    # schedules (None = auto from iters)
    sh_up_every: Optional[int] = _flag(None, "raise the SH degree every k steps (3DGS: 1000 of 30k)")
    densify_start: Optional[int] = _flag(None, "10% of iters")
    densify_stop: Optional[int] = _flag(None, "60% of iters")
    densify_every: Optional[int] = _flag(None, "~15 densification steps in the window")
    opacity_reset_every: Optional[int] = _flag(None, "3DGS's 3000 in runs of 10k+ steps, else one at iters // 3; "
                                                     "0 = never")
    # Taming
    score: str = _flag("full", "full | grad (ablation: positional gradient only)")
    prune_scale2d: float = _flag(0.5, "prune Gaussians whose screen radius reaches this fraction of the image "
                                      "(floaters)")
    recycle_frac: float = _flag(0.1, "lowest-score fraction removed and re-grown at each densification step (0 = off)")
    # per-training-view corrections (budget3d/train/refine.py); test views are rendered without them
    appearance: Optional[bool] = _flag(None, "per-image affine colour (exposure, white balance); auto: on for real "
                                             "captures, off for Blender")
    appearance_lr: float = _flag(0.01, "Adam learning rate of the per-image log-gains and offsets")
    appearance_start: Optional[int] = _flag(None, "first step that changes the transforms (10% of iters)")
    pose_opt: bool = _flag(False, "per-camera SE(3) pose corrections (off: they cost ethiopian_head's processed scene "
                                  "0.5 dB; docs/capture.md)")
    pose_lr: float = _flag(3e-3, "Adam learning rate of the corrections (rad; scene-scale units), decaying to 1% "
                                 "(docs/capture.md: 1e-3 recovered less on lego)")
    pose_start: Optional[int] = _flag(None, "first step that moves the cameras (10% of iters)")
    # fast paths
    visible_adam: bool = _flag(True, "Adam only on rows visible in the step (else torch.optim.Adam)")
    shN_every: int = _flag(4, "update higher-order SH every k steps; their gradient is skipped in between")
    # bookkeeping
    checkpoint_every: int = _flag(1000, "steps between checkpoints")
    log_every: int = _flag(10, "steps between progress records (history, progress.png)")
    eval_max_views: int = _flag(0, "test views to evaluate; 0 = every test view")
    save_renders: bool = _flag(True, "write renders/ (ground truth | render) for the test views")
    resolved: bool = field(default=False, repr=False)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def check_names(c: TrainConfig) -> None:
    from budget3d.splat.render import BACKENDS
    from budget3d.train.strategies import STRATEGIES

    if c.strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {c.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if c.device not in DEVICES:
        raise UserError(f"unknown device {c.device!r}; choose one of {', '.join(DEVICES)}")
    if c.backend not in BACKENDS:
        raise UserError(f"unknown backend {c.backend!r}; choose one of {', '.join(BACKENDS)}")


def resolve_config(cfg: TrainConfig, device_type: str = "cpu") -> TrainConfig:
    """Validate and fill the auto (None) fields: ``iters`` by the device (on CUDA the 3DGS/Taming
    schedule: 30,000 steps, densification every 100 from 500 to 15,000; on the CPU 3,000 steps),
    the schedules from ``iters``."""
    c = dataclasses.replace(cfg)
    check_names(c)
    if c.iters is None:
        c.iters = 30_000 if device_type == "cuda" else 3_000
        if device_type == "cuda":
            c.densify_start = 500 if c.densify_start is None else c.densify_start
            c.densify_stop = 15_000 if c.densify_stop is None else c.densify_stop
            c.densify_every = 100 if c.densify_every is None else c.densify_every
    if not isinstance(c.iters, int) or c.iters < 1:
        raise UserError(f"--iters must be a positive whole number (got {c.iters!r})")
    if c.sh_degree not in (0, 1, 2, 3):
        raise UserError(f"--sh-degree must be 0, 1, 2 or 3 (got {c.sh_degree!r})")
    if not isinstance(c.batch, int) or c.batch < 1:
        raise UserError(f"--batch must be a positive whole number of views (got {c.batch!r})")
    if c.shN_every < 1 or c.log_every < 1 or c.checkpoint_every < 0:
        raise UserError("shN_every and log_every must be >= 1 and checkpoint_every >= 0")
    if c.strategy != "default" and c.budget in (None, ""):
        raise UserError(f"strategy {c.strategy!r} needs a budget: give --budget (e.g. 200000, 15x or 30MB)")
    n = c.iters
    if c.sh_up_every is None:
        c.sh_up_every = max(1, min(1000, n // 30))
    if c.densify_start is None:
        c.densify_start = max(1, round(0.1 * n))
    if c.densify_stop is None:
        c.densify_stop = max(c.densify_start + 1, round(0.6 * n))
    if c.densify_every is None:
        c.densify_every = max(1, (c.densify_stop - c.densify_start) // 15)
    if c.opacity_reset_every is None:  # short runs: one reset, a third of the way (docs/training.md, "Real captures")
        c.opacity_reset_every = 3000 if n >= 10_000 else max(1, n // 3)
    if c.score not in SCORES:
        raise UserError(f"unknown score {c.score!r}; choose one of {', '.join(SCORES)}")
    c.resolved = True
    return c
