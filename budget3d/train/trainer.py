"""The trainer: one config dataclass, one short loop (``train``), helpers outside the loop.

Per step: pick a training view, render, L1 + ssim_lambda * (1 - SSIM), backward, Adam on the
rows this view saw, then the densification strategy (strategies.py: Taming to an exact budget,
gsplat's classic 3DGS ``DefaultStrategy``, or gsplat's ``MCMCStrategy`` on CUDA), called as
gsplat's trainers call it. Everything a run makes goes into its run folder: config.json,
checkpoint.pt, gaussians.ply, metrics.json, progress.png and renders/ (ground truth left, render
right).

Schedules default to fractions of ``iters`` (None = auto, resolved once and written to
config.json), so a 2000-step CPU run densifies and raises its SH degree like a 30k-step one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from budget3d.errors import UserError
from budget3d.runtime import StopOnCtrlC, pick_backend, pick_device, psnr, seed_everything, write_json
from budget3d.runfolder import check_run_dir, read_config, scene_path
from budget3d.train.checkpoint import CHECKPOINT, CONFIG, load_checkpoint, save_checkpoint, set_rng_state
from budget3d.train.metrics import evaluate, peak_memory_mb, plot_progress, to_float
from budget3d.train.optim import VisibleAdam, exp_decay

from budget3d.train.config import TrainConfig, check_names, resolve_config  # noqa: F401 (resolve_config: re-exported)


@dataclass
class Session:
    """The live state of a run: what the loop reads and writes."""

    cfg: TrainConfig
    run_dir: Path
    scene: object
    device: torch.device
    backend: str
    params: dict
    optimizers: dict
    strategy: object
    state: dict
    budget: Optional[int]
    extent: float
    step: int = 0
    history: list = field(default_factory=list)
    train_seconds: float = 0.0
    sh_now: int = 0
    gt_other: Optional[list] = None  # train images on another background (random_background only)
    other_bg: tuple = (0.0, 0.0, 0.0)
    progress: bool = True
    init: str = ""  # where the first Gaussians came from, in words
    appearance: Optional[object] = None  # refine.Appearance (per training image), or None
    poses: Optional[object] = None  # refine.PoseRefine (per training camera), or None
    dist: Optional[object] = None  # train.distributed.Dist under torchrun, else None
    others: Optional[dict] = None  # every rank's Gaussians (read-only), gathered for the score renders
    offset: int = 0  # where this rank's shard sits in ``others``
    bytes_sent: int = 0  # the sharded render's exchange, this rank, since step ``start_step``
    start_step: int = 0
    _bg: Optional[torch.Tensor] = None
    _resident: object = None  # {(view, other): uint8 image on the GPU}, or False when they do not fit

    def render(self, params, camera, extra=None, background=None, viewmat=None):
        from budget3d.splat import render

        bg = self.background() if background is None else background
        return render(params, camera, backend=self.backend, sh_degree=self.sh_now, background=bg, extra=extra,
                      viewmat=viewmat)

    def background(self):
        if self._bg is None:  # once: on a GPU each new small tensor is a host-to-device copy
            self._bg = torch.tensor(self.scene.background, dtype=torch.float32, device=self.device)
        return self._bg

    def image(self, k: int, other: bool = False) -> torch.Tensor:
        """Training image ``k`` as uint8 (H, W, 3) on the run's device (``other``: on the second
        background). On a GPU the images stay there after their first use when all of them fit in
        a quarter of its memory, so no step copies an image from the host."""
        view = (self.gt_other if other else self.scene.train)[k]
        if self.device.type == "cpu":
            return torch.as_tensor(view.image())
        if self._resident is None:
            need = sum(v.camera.width * v.camera.height * 3 for v in self.scene.train) * (2 if self.gt_other else 1)
            self._resident = {} if need <= torch.cuda.get_device_properties(self.device).total_memory // 4 else False
        if self._resident is False:
            return torch.as_tensor(view.image()).to(self.device, non_blocking=True)
        if (k, other) not in self._resident:
            self._resident[(k, other)] = torch.as_tensor(view.image()).to(self.device)
        return self._resident[(k, other)]

    def extras(self) -> dict:
        """What a strategy may take besides gsplat's arguments (strategies.step_post_backward hands
        each the ones it names): the means' learning rate, Taming's score views and their renderer."""
        render_fn = self.render
        if self.others is not None:  # sharded: the score renders see the whole model, gathered
            from budget3d.splat.distributed import replicated_render

            render_fn = replicated_render(lambda p, c, e: self.render(p, c, extra=e), self.params, self.others,
                                          self.offset)
        return {"lr": self.optimizers["means"].param_groups[0]["lr"], "score_views": lambda k: _score_views(self, k),
                "render_fn": render_fn}

    @property
    def world(self) -> int:
        return 1 if self.dist is None else self.dist.world

    def save(self) -> None:
        from budget3d.train.distributed import checkpoint_name

        extra = {"budget": self.budget, "train_seconds": self.train_seconds, "init": self.init,
                 "world_size": self.world}
        for k in ("appearance", "poses"):
            if getattr(self, k) is not None:
                extra[k] = getattr(self, k).state_dict()
        save_checkpoint(self.run_dir / checkpoint_name(self.dist), params=self.params, optimizers=self.optimizers,
                        strategy_state=self.state, step=self.step, history=self.history,
                        config=self.cfg.to_json(), extra=extra)


class TrainingInterrupted(KeyboardInterrupt):
    """Raised after Ctrl-C once the checkpoint is safely written; ``str()`` says how to resume."""


# ----------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, *, resume: bool = False, scene=None, on_step: Optional[Callable] = None,
          progress: bool = True) -> dict:
    """Train to ``cfg`` (or continue the run in ``cfg.out`` with ``resume``); returns metrics.

    ``scene`` overrides loading ``cfg.data``; ``on_step(session)`` runs after every step and may
    return True to stop as Ctrl-C does (checkpoint, then ``TrainingInterrupted``).
    """
    from budget3d.train import strategies

    s = setup(cfg, resume=resume, scene=scene, progress=progress)
    s.progress, cfg = progress and (s.dist is None or s.dist.main), s.cfg
    progress = s.progress
    if s.backend == "cpu":
        _compile_cpu_kernels(s)
    bar = _progress_bar(s, progress)
    s.start_step = s.step
    with StopOnCtrlC() as ctrl_c, _peers(s):
        t0 = time.perf_counter()
        for step in range(s.step, cfg.iters):
            batch, views = _step_views(s, step)  # the step's views, and this process's share
            _set_learning_rates(s, step)
            s.sh_now = min(cfg.sh_degree, step // cfg.sh_up_every)
            s.params["shN"].requires_grad_(step % cfg.shN_every == 0)
            bgs = [torch.rand(3, device=s.device) if cfg.random_background else s.background() for _ in views]
            gts = [_target(s, k, bg) for k, bg in zip(views, bgs)]
            outs, info, m2d = _render_views(s, batch, views, bgs, step)
            imgs = [_corrected(s, k, o.image, gt) for k, o, gt in zip(views, outs, gts)]
            loss = (sum(_loss(img, gt, cfg.ssim_lambda) for img, gt in zip(imgs, gts)) / (len(views) * s.world)
                    + strategies.regulariser(s.strategy, s.params) / s.world)
            s.strategy.step_pre_backward(s.params, s.optimizers, s.state, step, info)
            loss.backward()
            strategies.set_means2d_grad(info, [g() for g in m2d])
            _optimizer_step(s, (info["radii"] > 0).any(-1).any(0))
            _refine_step(s, views, step)
            with _whole_model(s, step):
                strategies.step_post_backward(s.strategy, s.params, s.optimizers, s.state, step, info, **s.extras())
            _rebalance(s, step)
            if s.params["means"].shape[0] == 0:
                bar.close()
                raise UserError(
                    f"strategy {cfg.strategy!r} pruned every Gaussian by step {step + 1} (none stayed above the "
                    "pruning opacity, as after an opacity reset where nothing fits yet); train with --strategy "
                    "taming (it never prunes below its schedule) or with --opacity-reset-every 0")
            s.step = step + 1
            s.train_seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            _log(s, bar, step, loss, imgs[0], gts[0])
            stop = (on_step is not None and on_step(s)) or ctrl_c.requested
            if s.dist is not None:  # every rank stops at the same step
                from budget3d.train.distributed import agree

                stop = agree(stop, s.device)
            if stop or (cfg.checkpoint_every and s.step % cfg.checkpoint_every == 0):
                s.save()
            if stop and s.step < cfg.iters:
                bar.close()
                launch = "budget3d" if s.dist is None else f"torchrun --nproc_per_node {s.world} -m budget3d"
                raise TrainingInterrupted(
                    f"interrupted at step {s.step}/{cfg.iters}; checkpoint saved to {s.run_dir / CHECKPOINT}"
                    f"{'' if s.dist is None else ' (and one per rank)'}. "
                    f"Resume with: {launch} train --out {s.run_dir} --resume")
    bar.close()
    with _peers(s):
        return finish(s)


@contextlib.contextmanager
def _peers(s: Session):
    """Under torchrun, a failed collective (a rank died, a network went down) as one line."""
    try:
        yield
    except (RuntimeError, ConnectionError) as e:
        if s.dist is None or isinstance(e, UserError):
            raise
        from budget3d.train.distributed import lost_peer

        raise lost_peer(s.dist, e, s.run_dir) from None


# ----------------------------------------------------------------------------- setup


def _compile_cpu_kernels(s: Session, training: bool = True) -> None:
    """Compile the CPU kernels before the work (on all cores; only on a machine's first run, numba
    caches them), so that the progress bars and the training time measure the work."""
    from budget3d.splat import cpu
    from budget3d.train import optim, ssim

    kernels = (ssim.KERNELS if training and s.cfg.ssim_lambda > 0 else []) + \
        (optim.KERNELS if training and s.cfg.visible_adam else [])
    cold = []

    def say():
        cold.append(True)
        if s.progress:
            print("compiling the CPU kernels (first run on this machine, ~30 s; cached afterwards) ...",
                  file=sys.stderr, flush=True)

    sec = cpu.warmup(kernels, on_cold=say)
    if cold and s.progress:
        print(f"compiled in {sec:.0f} s", file=sys.stderr, flush=True)


def _load_scene(cfg: TrainConfig, background=None):
    from budget3d.scene import load_scene

    if not cfg.data:
        raise UserError("no scene given: pass --data PATH (a Blender, nerfstudio, COLMAP or LLFF scene folder)")
    kw = {} if background is None else {"background": background}
    return load_scene(cfg.data, downscale=cfg.downscale, **kw)


def _init_params(cfg: TrainConfig, scene) -> tuple[dict, str]:
    from budget3d.splat import init_from_points
    from budget3d.train.init import initial_points

    pts, cols, what = initial_points(scene, cfg.init_points, cfg.init_bg_fraction, seed=cfg.seed)
    return init_from_points(pts, cols, cfg.sh_degree, opacity=cfg.init_opacity), what


def _make_optimizers(cfg: TrainConfig, params: dict, extent: float) -> dict:
    lrs = {"means": cfg.means_lr * extent, "scales": cfg.scales_lr, "quats": cfg.quats_lr,
           "opacities": cfg.opacities_lr, "sh0": cfg.sh0_lr, "shN": cfg.shN_lr}
    if cfg.visible_adam:
        return {k: VisibleAdam([params[k]], lr=lrs[k], eps=1e-15) for k in params}
    return {k: torch.optim.Adam([params[k]], lr=lrs[k], eps=1e-15) for k in params}


def setup(cfg: TrainConfig, *, resume: bool = False, scene=None, progress: bool = True) -> Session:
    """Build (or restore from the run folder's checkpoint) everything the loop needs."""
    from budget3d.train import distributed, strategies

    run_dir = Path(cfg.out)
    d = distributed.from_env()  # a torchrun rank, or None
    ckpt = None
    if resume:
        _check_run_dir(run_dir, need_checkpoint=True)
        name = distributed.checkpoint_name(d)
        if not (run_dir / name).is_file():
            raise UserError(f"{run_dir}: no {name} for rank {d.rank}; resume with as many processes as the run had")
        ckpt = load_checkpoint(run_dir / name)
        had = int(ckpt["extra"].get("world_size", 1))
        if had != (1 if d is None else d.world):
            raise UserError(f"{run_dir}: trained by {had} process(es), resumed by {1 if d is None else d.world}; resume "
                            f"with the same count ({'torchrun --nproc_per_node ' + str(had) if had > 1 else 'no torchrun'})")
        saved = TrainConfig.from_json(ckpt["config"])
        data = str(scene_path(run_dir, {"data": saved.data}, cfg.data or None)) if scene is None else saved.data
        cfg = dataclasses.replace(saved, out=str(run_dir), device=cfg.device, backend=cfg.backend, data=data)
    elif cfg.data and scene is None:  # stored absolute, so the run folder works from any directory
        cfg = dataclasses.replace(cfg, data=os.path.abspath(os.path.expanduser(cfg.data)))
    check_names(cfg)
    device = pick_device(cfg.device, cfg.backend)
    if d is not None:
        if cfg.pose_opt or cfg.appearance:
            raise UserError("--pose-opt and --appearance train one process's views at a time; drop them under torchrun")
        device = distributed.start(d, device)
    cfg = resolve_config(cfg, device.type)
    backend = pick_backend(cfg.backend, device)
    if not resume and scene is None and cfg.data:  # a folder of photos or a video: make it a scene first
        from budget3d.capture import maybe_process

        cfg = dataclasses.replace(cfg, data=maybe_process(cfg.data, run_dir, progress))
    scene = scene if scene is not None else _load_scene(cfg)
    cfg = _resolve_for_scene(cfg, scene)
    if not scene.train:
        raise UserError(f"{cfg.data}: the scene has no training views")
    if d is not None:
        distributed.check_same_scene(d, scene, str(cfg.data))
    if ckpt is not None:
        init = ckpt["params"]
        budget = ckpt["extra"].get("budget")
    else:
        init, init_what = _init_params(cfg, scene)
        budget = _parse_budget(cfg, len(init["means"]))
        if d is not None:  # every rank made the same points (same seed): each keeps its slice
            from budget3d.splat.distributed import shard_slice

            cut = shard_slice(len(init["means"]), d.rank, d.world)
            init = {k: v[cut] for k, v in init.items()}
    params = {k: torch.nn.Parameter(v.to(device).float().contiguous()) for k, v in init.items()}
    from budget3d.train.init import scene_scale

    extent = scene_scale(scene)
    optimizers = _make_optimizers(cfg, params, extent)
    s = Session(cfg=cfg, run_dir=run_dir, scene=scene, device=device, backend=backend, params=params,
                optimizers=optimizers, strategy=None, state={}, budget=budget, extent=extent,
                init=ckpt["extra"].get("init", "") if ckpt is not None else init_what, dist=d)
    _make_refiners(s, ckpt)
    local_budget = budget
    if d is not None and budget is not None:  # each shard's part of the schedule; the parts sum to it
        from budget3d.splat.distributed import share

        local_budget = share(budget, d.rank, d.world)
    s.strategy = strategies.make_strategy(cfg, local_budget, device=device)
    s.strategy.check_sanity(s.params, s.optimizers)
    s.state = strategies.initialize_state(s.strategy, scene_scale=extent)
    if cfg.random_background and cfg.data:
        s.other_bg = (0.0, 0.0, 0.0) if sum(scene.background) > 1.5 else (1.0, 1.0, 1.0)
        s.gt_other = _load_scene(cfg, background=s.other_bg).train
    if ckpt is not None:
        for k, opt in optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][k])
        s.state = _merge_state(s.state, ckpt["strategy_state"], device)
        s.step, s.history = int(ckpt["step"]), list(ckpt.get("history", []))
        s.train_seconds = float(ckpt["extra"].get("train_seconds", 0.0))
        set_rng_state(ckpt["rng"])
    else:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{run_dir}: cannot create the run folder ({e.strerror}); choose another --out") from None
        seed_everything(cfg.seed)
    if d is None or d.main:
        write_json(run_dir / CONFIG, {**cfg.to_json(), "world_size": s.world})
    return s


def _parse_budget(cfg: TrainConfig, n_init: int) -> Optional[int]:
    if cfg.budget in (None, ""):
        return None
    from budget3d.budget import parse_budget

    return parse_budget(cfg.budget, n_init, cfg.sh_degree)


def _merge_state(fresh: dict, saved: dict, device) -> dict:
    out = dict(fresh)
    for k, v in saved.items():
        out[k] = v.to(device) if isinstance(v, torch.Tensor) else v
    return out


def _check_run_dir(run_dir: Path, need_checkpoint: bool) -> None:
    check_run_dir(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise UserError(f"{run_dir}: not a run folder (no {CONFIG}); give a folder written by 'budget3d train --out'")
    if need_checkpoint and not (run_dir / CHECKPOINT).is_file():
        raise UserError(f"{run_dir}: no {CHECKPOINT} to resume from; start a new run without --resume")


# ----------------------------------------------------------------------------- per-step helpers


def _view_index(seed: int, step: int, n: int, j: int = 0) -> int:
    """View ``j`` of the step's batch, a pure function of (seed, step, j) so that resuming picks the
    same ones and every rank knows every rank's views."""
    return int(np.random.default_rng([seed, step] if j == 0 else [seed, step, j]).integers(n))


def _step_views(s: Session, step: int) -> tuple[list[int], list[int]]:
    """The training views of ``step``'s global batch (``batch`` per process, in rank order), and
    this process's share of them."""
    every = [_view_index(s.cfg.seed, step, len(s.scene.train), j) for j in range(s.cfg.batch * s.world)]
    rank = 0 if s.dist is None else s.dist.rank
    return every, every[rank * s.cfg.batch:(rank + 1) * s.cfg.batch]


def _render_views(s: Session, batch: list[int], views: list[int], bgs: list, step: int):
    """Render this process's ``views`` of the step's ``batch``: (outputs, gsplat's info over the
    held Gaussians, one callable per camera of the batch that returns the projected centres'
    gradient after backward)."""
    from budget3d.train import strategies

    cam0 = s.scene.train[views[0]].camera
    if s.dist is None:
        outs = [s.render(s.params, s.scene.train[k].camera, background=bg, viewmat=_viewmat(s, k, step))
                for k, bg in zip(views, bgs)]
        info = strategies.gsplat_info([o.radii for o in outs], [o.depths for o in outs], cam0)
        return outs, info, [o.means2d_grad for o in outs]
    from budget3d.splat.distributed import render_sharded

    outs, local, stats = render_sharded(s.params, [s.scene.train[k].camera for k in batch], backend=s.backend,
                                        sh_degree=s.sh_now, backgrounds=bgs)
    s.bytes_sent += stats["bytes_sent"]
    info = strategies.gsplat_info([p.radii for p in local], [p.depths for p in local], cam0)
    return outs, info, [(lambda p=p: p.means2d.grad) for p in local]


def _rebalance(s: Session, step: int) -> None:
    """Sharded: after a densification window's step, even the shards out again when one holds more
    than 1.2x the mean (a strategy without a budget grows each shard by its own gradients)."""
    c = s.cfg
    if s.dist is None or not (c.densify_start < step <= c.densify_stop and step % c.densify_every == 0):
        return
    from budget3d.splat.distributed import rebalance

    rebalance(s.params, s.optimizers, s.state)


@contextlib.contextmanager
def _whole_model(s: Session, step: int, final: bool = False):
    """Sharded Taming, around a densification step (and the final one): every rank holds every
    shard (read-only) in ``s.others``, so that its score renders see the whole model, as one
    process does; dropped afterwards."""
    if s.dist is not None and s.cfg.strategy == "taming" and (final or step in s.strategy.densify_steps()):
        from budget3d.splat.distributed import gather_rows

        s.others, counts = gather_rows(dict(s.params))
        s.offset = sum(counts[: s.dist.rank])
    try:
        yield
    finally:
        s.others = None


def _set_learning_rates(s: Session, step: int) -> None:
    cfg = s.cfg
    lr = exp_decay(step, cfg.iters, cfg.means_lr * s.extent, cfg.means_lr_final * s.extent)
    s.optimizers["means"].param_groups[0]["lr"] = lr


def _target(s: Session, view_idx: int, bg: torch.Tensor) -> torch.Tensor:
    """The float (H, W, 3) ground truth, on ``bg`` when training on random backgrounds.

    Scenes hand out images already composited on their background, so the transparency
    (1 - alpha) is recovered from the same image composited on a second background:
    img - other = (1 - alpha) * (own_bg - other_bg). Opaque sources give 0 and stay as they are.
    """
    img = s.image(view_idx).float() / 255.0
    if not s.cfg.random_background or s.gt_other is None:
        return img
    other = s.image(view_idx, other=True).float() / 255.0
    own = s.background()
    d = own - torch.tensor(s.other_bg, device=s.device)
    transparency = (((img - other) * d).sum(-1, keepdim=True) / (d * d).sum()).clamp(0, 1)
    return img + transparency * (bg - own)


def _loss(img: torch.Tensor, gt: torch.Tensor, ssim_lambda: float) -> torch.Tensor:
    l1 = (img - gt).abs().mean()
    if ssim_lambda <= 0:
        return l1
    from budget3d.train.ssim import ssim  # (pytorch_msssim's, as numba kernels on the CPU)

    return (1 - ssim_lambda) * l1 + ssim_lambda * (1 - ssim(img, gt))


# ----------------------------------------------------------------------------- per-view corrections


def _resolve_for_scene(cfg: TrainConfig, scene) -> TrainConfig:
    """The auto (None) settings that depend on the scene: appearance on for real captures (every
    format but Blender-synthetic); appearance and pose refinement (off unless asked for:
    docs/capture.md) start after 10% of the steps."""
    c = dataclasses.replace(cfg)
    if c.appearance is None:
        c.appearance = scene.format != "blender"
    if c.pose_opt is None:  # configs written before pose refinement was measured ("auto")
        c.pose_opt = False
    if c.pose_start is None:
        c.pose_start = round(0.1 * c.iters)
    if c.appearance_start is None:
        c.appearance_start = round(0.1 * c.iters)
    return c


def _make_refiners(s: Session, ckpt) -> None:
    from budget3d.train.refine import Appearance, PoseRefine

    n = len(s.scene.train)
    saved = ckpt["extra"] if ckpt is not None else {}
    if s.cfg.appearance:
        from budget3d.train.refine import flat_border

        # the gauge (refine.py): photos take the mean offset into the Gaussians; flat-background renders pin it
        flat = s.background() if flat_border(s.scene.train) else None
        s.appearance = Appearance(n, s.cfg.appearance_lr, s.device, flat_background=flat)
    if s.cfg.pose_opt:
        s.poses = PoseRefine(n, s.cfg.pose_lr, s.extent, s.device)
    for k in ("appearance", "poses"):
        if getattr(s, k) is not None and k in saved:
            getattr(s, k).load_state_dict(saved[k])


def _viewmat(s: Session, k: int, step: int):
    """Training camera ``k``'s corrected pose (differentiable) once pose refinement has started, else None."""
    if s.poses is None or step < s.cfg.pose_start:
        return None
    return s.poses.viewmat(k, s.scene.train[k].camera)


def _train_camera(s: Session, k: int):
    """Training camera ``k`` with its current pose correction (a plain Camera, for scoring)."""
    cam = s.scene.train[k].camera
    if s.poses is None:
        return cam
    return dataclasses.replace(cam, world_to_camera=s.poses.world_to_camera(k, cam))


def _corrected(s: Session, k: int, img: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """The render as the loss sees it: with image ``k``'s appearance (no error where the photo is
    clipped and the corrected render lies beyond it), and the ground truth itself where the view's
    mask says to ignore the pixel (no error there, so no gradient)."""
    if s.appearance is not None:
        from budget3d.train.refine import saturated

        img = saturated(s.appearance.apply(k, img), gt)
    mask = s.scene.train[k].mask()
    if mask is not None:
        img = torch.where(torch.as_tensor(mask, device=img.device)[..., None], img, gt)
    return img


def _canonical(s: Session, k: int, gt: torch.Tensor) -> torch.Tensor:
    """Training image ``k`` brought to the Gaussians' own appearance (its correction undone), so
    that Taming's error maps measure geometry rather than exposure."""
    if s.appearance is None:
        return gt
    with torch.no_grad():
        g = s.appearance.param[k]
        return ((gt - g[3:]) * torch.exp(-g[:3])).clamp(0, 1)


def _refine_step(s: Session, k, step: int) -> None:
    """Step the per-image corrections of the step's views ``k`` (an index or a list)."""
    from budget3d.train.refine import lr_at

    if s.appearance is not None:
        if step >= s.cfg.appearance_start:
            s.appearance.step(k)
            s.appearance.recentre(s.params, s.appearance.flat_background)  # Gaussians: the mean exposure
        else:  # identity until the Gaussians hold the average appearance
            s.appearance.opt.zero_grad(set_to_none=True)
    if s.poses is not None:
        s.poses.opt.param_groups[0]["lr"] = lr_at(step, s.cfg.pose_start, s.cfg.iters, s.cfg.pose_lr)
        s.poses.step(k)


def _optimizer_step(s: Session, visible: torch.Tensor) -> None:
    for opt in s.optimizers.values():
        if isinstance(opt, VisibleAdam):
            opt.step(visible)
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)


def _score_views(s: Session, k: int) -> list:
    """``k`` random training views with float ground truth, for Taming's scores."""
    n = len(s.scene.train)
    idx = torch.randperm(n)[: max(1, min(k, n))].tolist()
    bg = s.background()
    return [(_train_camera(s, i), _canonical(s, i, _target(s, i, bg))) for i in idx]


def _progress_bar(s: Session, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=s.cfg.iters, initial=s.step, disable=not enabled, desc=f"train {s.cfg.strategy}",
                dynamic_ncols=True, mininterval=0.5)


def _log(s: Session, bar, step: int, loss, img, gt) -> None:
    bar.update(1)
    if step % s.cfg.log_every and s.step != s.cfg.iters:
        return
    with torch.no_grad():
        p = psnr(img.detach(), gt)
    n = int(s.params["means"].shape[0])
    s.history.append({"step": s.step, "loss": round(float(loss.detach()), 6), "psnr": round(p, 3), "count": n})
    bar.set_postfix(loss=f"{float(loss.detach()):.4f}", psnr=f"{p:.2f}", n=n, refresh=False)


# ----------------------------------------------------------------------------- the end of a run


def finish(s: Session) -> dict:
    """Force the exact budget, save checkpoint + .ply, evaluate, write metrics and the plot."""
    from budget3d.splat import save_ply

    from budget3d.train import strategies

    with _whole_model(s, s.step, final=True):
        strategies.finalize(s.strategy, s.params, s.optimizers, s.state, s.step, **s.extras())
    s.sh_now = s.cfg.sh_degree
    for p in s.params.values():
        p.requires_grad_(True)
    s.save()
    shards = {}
    if s.dist is not None:  # rank 0 writes the gathered model; the others are done
        shards = _gather_model(s)
        if not s.dist.main:
            return shards
    save_ply(s.params, s.run_dir / "gaussians.ply")
    metrics = {**_train_metrics(s), **shards}
    metrics.update(_evaluate(s))
    write_json(s.run_dir / "metrics.json", metrics)
    title = f"{s.cfg.strategy}: {metrics['num_gaussians']} Gaussians, test PSNR {metrics['psnr']:.2f} dB"
    plot_progress(s.history, s.run_dir / "progress.png", title=title)
    return metrics


def _gather_model(s: Session) -> dict:
    """Every shard onto every rank (``s.params`` becomes the whole model), the process group closed;
    what the ranks report: counts, peak memory, the exchange's bytes per step."""
    from budget3d.splat.distributed import gather_rows
    from budget3d.train import distributed

    full, counts = gather_rows(dict(s.params))
    steps = max(1, s.step - s.start_step)
    per_rank = distributed.gather_all({**peak_memory_mb(s.device), "bytes_sent_per_step": s.bytes_sent // steps})
    distributed.finish()
    s.params = full
    return {"world_size": s.world, "views_per_step": s.world * s.cfg.batch, "shard_counts": counts,
            "per_rank": per_rank}


def _train_metrics(s: Session) -> dict:
    last = s.history[-1] if s.history else {}
    return {
        "num_gaussians": int(s.params["means"].shape[0]),
        "budget": s.budget,
        "budget_spec": s.cfg.budget,
        "strategy": s.cfg.strategy,
        "backend": s.backend,
        "device": str(s.device),
        "iters": s.cfg.iters,
        "train_seconds": round(s.train_seconds, 2),
        "steps_per_second": round(s.cfg.iters / s.train_seconds, 2) if s.train_seconds > 0 else None,
        "final_train_psnr": last.get("psnr"),
        "init": s.init,
        **_last_growth(s),
        **peak_memory_mb(s.device),
        **({"appearance": s.appearance.summary()} if s.appearance is not None else {}),
        **({"pose_refinement": s.poses.summary()} if s.poses is not None else {}),
        "scene": str(s.cfg.data),
    }


def _last_growth(s: Session) -> dict:
    """How many Gaussians the last densification step (with finalize's top-up) added: the
    schedule, not a last-step top-up, should have reached the budget."""
    hist = s.state.get("history") if isinstance(s.state, dict) else None
    if not hist:
        return {}
    before = hist[-2][1] if len(hist) > 1 else s.state.get("n_init", hist[-1][1])
    return {"densify_steps": len(hist), "last_step_added": int(hist[-1][1] - before)}


def _evaluate(s: Session) -> dict:
    """The test metrics, plus ``psnr_matched``: each test view's colour matched to its photo on the
    left half and scored on the right (refine.matched_psnr; the fair number when test photos have
    their own exposure, docs/capture.md, "Per-image appearance")."""
    from budget3d.train.refine import matched_psnr

    renders = s.run_dir / "renders" if s.cfg.save_renders else None
    vals = []

    def render_fn(p, cam):  # evaluate() renders the test views in order
        out = s.render(p, cam)
        view = s.scene.test[len(vals)]
        vals.append(matched_psnr(out.image.clamp(0, 1), to_float(view.image(), out.image.device)))
        return out

    with torch.no_grad():
        m = evaluate(s.params, s.scene.test, render_fn=render_fn, background=s.background(), renders_dir=renders,
                     max_views=s.cfg.eval_max_views, progress=s.progress)
    m["psnr_matched"] = round(float(np.mean(vals)), 4) if vals else None
    for row, v in zip(m.get("per_view", []), vals):
        row["psnr_matched"] = round(v, 4)
    return m


def evaluate_run(run_dir, *, device: str = "auto", backend: str = "auto", progress: bool = True,
                 data: Optional[str] = None, downscale: int = 1) -> dict:
    """Re-evaluate a finished run folder (its checkpoint, else gaussians.ply) on its test split;
    rewrites the evaluation part of metrics.json and returns the whole metrics dict. A splat file
    (any format ``export.splats.load_any`` reads: another tool's .sog, .glb, .spz ...) is scored on
    the test split of the scene ``data`` at ``downscale``; nothing is written."""
    from budget3d.splat import load_ply

    run_dir = Path(run_dir)
    from budget3d.export.splats import is_splat_file

    if is_splat_file(run_dir):
        return _evaluate_file(run_dir, device=device, backend=backend, progress=progress, data=data,
                              downscale=downscale)
    saved = read_config(run_dir)
    try:
        cfg = TrainConfig.from_json(saved)
    except TypeError as e:
        raise UserError(f"{run_dir / CONFIG}: not a readable run config ({e}); retrain the run") from None
    cfg = dataclasses.replace(cfg, data=str(scene_path(run_dir, saved, data)))
    dev = pick_device(device, backend)
    if (run_dir / "gaussians.ply").is_file():
        params = load_ply(run_dir / "gaussians.ply")
    elif (run_dir / CHECKPOINT).is_file():
        params = load_checkpoint(run_dir / CHECKPOINT)["params"]
    else:
        raise UserError(f"{run_dir}: neither gaussians.ply nor {CHECKPOINT}; train the run first")
    params = {k: v.to(dev).float() for k, v in params.items()}
    scene = _load_scene(cfg)
    s = Session(cfg=cfg, run_dir=run_dir, scene=scene, device=dev, backend=pick_backend(backend, dev),
                params=params, optimizers={}, strategy=None, state={}, budget=None, extent=1.0,
                sh_now=cfg.sh_degree, progress=progress)
    if s.backend == "cpu":
        _compile_cpu_kernels(s, training=False)
    metrics = {}
    if (run_dir / "metrics.json").is_file():
        try:
            metrics = json.loads((run_dir / "metrics.json").read_text())
        except json.JSONDecodeError:
            metrics = {}
    metrics["num_gaussians"] = int(params["means"].shape[0])
    metrics.update(_evaluate(s))
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def _evaluate_file(path: Path, *, device: str, backend: str, progress: bool, data: Optional[str],
                   downscale: int) -> dict:
    from budget3d.export.splats import load_any, sniff

    try:
        sniff(path)
    except UserError as e:
        raise UserError(f"{path}: is a file, not a run folder; give a run folder written by 'budget3d train', or a "
                        f"splat file with --data SCENE ({str(e).split(': ', 1)[-1]})") from None
    if not data:
        raise UserError(f"{path}: a splat file names no scene; give the scene to score it on with --data SCENE")
    dev = pick_device(device, backend)
    params = {k: v.to(dev).float() for k, v in load_any(path).items()}
    sh = int(round((params["shN"].shape[1] + 1) ** 0.5)) - 1
    cfg = TrainConfig(data=os.path.abspath(os.path.expanduser(data)), downscale=downscale, sh_degree=sh,
                      save_renders=False)
    s = Session(cfg=cfg, run_dir=path.parent, scene=_load_scene(cfg), device=dev, backend=pick_backend(backend, dev),
                params=params, optimizers={}, strategy=None, state={}, budget=None, extent=1.0, sh_now=sh,
                progress=progress)
    if s.backend == "cpu":
        _compile_cpu_kernels(s, training=False)
    return {"file": str(path), "num_gaussians": int(params["means"].shape[0]), **_evaluate(s)}


__all__ = ["TrainConfig", "TrainingInterrupted", "Session", "evaluate_run", "resolve_config", "setup", "train"]
