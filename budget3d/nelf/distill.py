"""Online distillation of a trained 3DGS run into a MobileR2L-style NeLF student.

The teacher is the run's ``gaussians.ply``: instead of storing thousands of pseudo images
(MobileR2L kept ~77 GB of NeRF renders), teacher images are rendered as training goes and kept
in a small LRU cache. Poses come from a fixed, seeded pool (``PoseSampler``): the training poses
plus jittered ones, so a pose index always means the same pose and a resumed run draws the same
batches. Per step: ``batch`` poses -> rays at 1/scale of the output -> point encoding -> student;
MSE against the teacher's renders; AdamW with linear warm-up and cosine decay.

Several processes: ``torchrun --nproc_per_node=N budget3d distill RUN`` trains one student with
DDP (gloo on CPU, nccl with SyncBatchNorm on CUDA). ``batch`` stays the global batch: each rank
renders and trains on its own ``batch / N`` of every step's poses, and DDP averages the
gradients, so the optimiser sees the same global batch as one process (BatchNorm statistics,
per rank on CPU, are the one difference). Rank 0 alone writes files and evaluates.

Everything goes into ``RUN/nelf/``: checkpoint.pt (atomic; ``resume=True`` continues),
student.pt (weights + what rebuilds the encoding), metrics.json, strip.png (GT | teacher |
student per test view) and progress.png (PSNR against time).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from budget3d.errors import UserError
from budget3d.nelf import students
from budget3d.nelf.config import DistillConfig, check_config
from budget3d.nelf.frame import Frame, choose_frame
from budget3d.nelf.poses import PoseSampler, at_resolution, parse_resolution
from budget3d.nelf.rays import camera_rays, scene_bounds
from budget3d.nelf.students import PRESETS, count_params, load_student
from budget3d.nelf.students.grid import DEFAULTS
from budget3d.nelf.teacher import Teacher, photo
from budget3d.runtime import StopOnCtrlC, pick_backend, pick_device, save_torch, write_json, write_png
from budget3d.scene.camera import Camera

NELF_DIR = "nelf"
CHECKPOINT = "checkpoint.pt"
STUDENT = "student.pt"


class DistillInterrupted(KeyboardInterrupt):
    """Raised after Ctrl-C once the checkpoint is safely written; ``str()`` says how to resume."""


# ----------------------------------------------------------------------------- the session


@dataclass
class Distiller:
    """The live state of a distillation: teacher, poses, student, optimiser, cache."""

    cfg: DistillConfig
    run_dir: Path
    scene: object
    device: torch.device
    backend: str
    teacher: Teacher
    poses: PoseSampler
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    width: int
    height: int
    near: float
    far: float
    step: int = 0
    history: list = field(default_factory=list)
    seconds: float = 0.0
    init_metrics: dict = field(default_factory=dict)
    rank: int = 0  # DDP rank (0 without torchrun) and number of processes
    world: int = 1
    net: Optional[torch.nn.Module] = None  # what trains: ``model``, or its DDP wrapper

    @property
    def main(self) -> bool:
        """The process that writes files, logs and evaluates."""
        return self.rank == 0

    @property
    def out_dir(self) -> Path:
        return self.run_dir / NELF_DIR

    def clock(self) -> float:
        """Seconds of distillation so far, the same on every rank (the slowest one's)."""
        if self.cfg.minutes <= 0 or self.world == 1:
            return self.seconds
        import torch.distributed as dist

        t = torch.tensor([self.seconds], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def batch(self, step: int, idx: list) -> tuple:
        """(targets (B, h, w, 3 or 5), cameras) of pool poses ``idx`` for ``step``: the teacher's
        images (and, for a student that ``needs_geometry``, its depth as the frame's ray parameter
        and its alpha as channels 3 and 4), whole views at the output resolution, or with ``crop``
        one random window of each (on the ray grid, so a crop's rays are exactly the whole view's;
        the window is a pure function of (seed, step, i))."""
        cams = [at_resolution(self.poses.camera(i), self.width, self.height) for i in idx]
        c, s = self.cfg.crop, self.model.scale
        cw, ch = (min(c, self.width), min(c, self.height)) if c else (self.width, self.height)
        g = np.random.default_rng([self.cfg.seed, 13, int(step)])
        real = step >= self.cfg.iters - self.cfg.real_steps  # fine-tune on the photos themselves
        geometry = not real and self.cfg.depth_weight > 0 and self.model.needs_geometry
        out_i, out_c = [], []
        for i, cam in zip(idx, cams):
            x0 = int(g.integers(0, (self.width - cw) // s + 1)) * s
            y0 = int(g.integers(0, (self.height - ch) // s + 1)) * s
            crop = Camera(cam.fx, cam.fy, cam.cx - x0, cam.cy - y0, cw, ch, cam.world_to_camera)
            if real:
                t = self.teacher.photo(i)[y0:y0 + ch, x0:x0 + cw]
            else:
                t = self.teacher.window(i, x0, y0, cw, ch, geometry)
            if geometry:  # the teacher's distance along each pixel's ray as the frame's t
                o, d = camera_rays(crop, 1, device=self.device)
                dist = t[..., 3]
                t = torch.cat([t[..., :3], torch.where(dist > 0, self.model.frame.param(o, d, dist), 0.0)[..., None],
                               t[..., 4:]], -1)
            out_i.append(t)
            out_c.append(crop)
        return torch.stack(out_i), out_c

    def student(self, cameras: list, net: Optional[torch.nn.Module] = None, resize: bool = True) -> torch.Tensor:
        """(B, H, W, 3) student images of ``cameras`` (in the model's current train/eval mode),
        brought to the output resolution first (``resize=False``: as given, e.g. crops of it)."""
        net = net or self.model
        cams = [at_resolution(c, self.width, self.height) if resize else c for c in cameras]
        c2w = torch.as_tensor(np.stack([np.linalg.inv(np.asarray(c.world_to_camera, np.float64)) for c in cams]),
                              dtype=torch.float32, device=self.device)
        K = torch.stack([c.K(self.device, torch.float32) for c in cams])
        return net(c2w, K, cams[0].width, cams[0].height).permute(0, 2, 3, 1)

    def save(self) -> None:
        if not self.main:
            return
        ckpt = {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "history": list(self.history),
            "seconds": self.seconds,
            "init_metrics": dict(self.init_metrics),
            "config": self.cfg.to_json(),
            "arch": dict(self.model.arch),
            "frame": self.model.frame.to_json(),
            "rng": torch.get_rng_state(),
        }
        save_torch(ckpt, self.out_dir / CHECKPOINT)


def lr_at(cfg: DistillConfig, step: int, seconds: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``lr_final_frac * lr``; with
    ``minutes`` the decay follows whichever runs out first, the steps or the time (``seconds``
    spent), so a run cut by the clock still ends on the low learning rate."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.iters - cfg.warmup)
    if cfg.minutes > 0:
        t = max(t, seconds / (60 * cfg.minutes))
    lo = cfg.lr_final_frac
    return cfg.lr * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


# ----------------------------------------------------------------------------- the loop


def distill(cfg: DistillConfig, *, resume: bool = False, progress: bool = True,
            on_step: Optional[Callable] = None) -> dict:
    """Distill the run ``cfg.run`` into a NeLF student (or continue it with ``resume``);
    returns the metrics written to RUN/nelf/metrics.json.

    ``on_step(distiller)`` runs after every step and may return True to stop as Ctrl-C does
    (checkpoint, then ``DistillInterrupted``)."""

    d = setup(cfg, resume=resume)
    cfg = d.cfg
    if d.step == 0 and "student_vs_teacher_psnr_init" not in d.init_metrics and cfg.eval and d.main:
        d.init_metrics["student_vs_teacher_psnr_init"] = _quick_eval(d)  # the untrained student, for reference
    bar = _progress_bar(d, progress and d.main)
    with StopOnCtrlC() as ctrl_c:
        t0 = time.perf_counter()
        for step in range(d.step, cfg.iters):
            d.net.train()
            for g in d.optimizer.param_groups:
                g["lr"] = lr_at(cfg, step, d.clock()) * g.get("lr_scale", 1.0)
            idx = d.poses.batch(step, cfg.batch, real=step >= cfg.iters - cfg.real_steps)[d.rank::d.world]
            gt, cams = d.batch(step, idx)
            img = d.student(cams, d.net, resize=False)
            loss = F.mse_loss(img, gt[..., :3])
            if gt.shape[-1] > 3:  # the teacher's depth and alpha, for the grid student's density
                loss = loss + cfg.depth_weight * d.model.geometry_loss(gt[..., 3:])
            d.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP: gradients averaged over the ranks here
            d.optimizer.step()
            d.step = step + 1
            d.seconds += time.perf_counter() - t0
            _log(d, bar, step, loss)
            every = cfg.eval_every or max(1, cfg.iters // 10)
            if cfg.eval and d.step % every == 0 and d.step < cfg.iters and d.main:  # not timed
                d.history.append({"step": d.step, "seconds": round(d.seconds, 3),
                                  "test_psnr_vs_teacher": round(_quick_eval(d), 3)})
            if _any_rank(d, cfg.minutes > 0 and d.seconds >= 60 * cfg.minutes):  # out of time: finish here
                d.save()
                break
            stop = _any_rank(d, (on_step is not None and on_step(d)) or ctrl_c.requested)
            if stop or (cfg.checkpoint_every and d.step % cfg.checkpoint_every == 0):
                d.save()
            if stop and d.step < cfg.iters:
                bar.leave = False  # the message below says where it stopped
                bar.close()
                _leave(d)
                raise DistillInterrupted(
                    f"interrupted at step {d.step}/{cfg.iters}; checkpoint saved to {d.out_dir / CHECKPOINT}. "
                    f"Resume with: budget3d distill {d.run_dir} --resume")
            t0 = time.perf_counter()
    bar.close()
    if not d.main:  # rank 0 evaluates and writes; the others wait for it, then read what it wrote
        _leave(d)
        return json.loads((d.out_dir / "metrics.json").read_text())
    metrics = finish(d, progress=progress)
    _leave(d)
    return metrics


# ----------------------------------------------------------------------------- several processes (torchrun)


def _world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def _join(device: torch.device, world: int) -> None:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA) unless already in one."""
    import torch.distributed as dist

    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)


def _any_rank(d: Distiller, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (so all stop at the same step)."""
    if d.world == 1:
        return bool(flag)
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _mean_over_ranks(d: Distiller, value: float) -> float:
    if d.world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return float(t.item()) / d.world


def _leave(d: Distiller) -> None:
    """Wait for every rank (rank 0 has written its files), then leave the process group."""
    if d.world == 1:
        return
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def _progress_bar(d: Distiller, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=d.cfg.iters, initial=d.step, disable=not enabled, desc=f"distill {d.cfg.preset}",
                dynamic_ncols=True, mininterval=0.5)


def _log(d: Distiller, bar, step: int, loss) -> None:
    bar.update(1)
    if step % d.cfg.log_every and d.step != d.cfg.iters:
        return
    mse = _mean_over_ranks(d, float(loss.detach()))  # the global batch's loss
    p = -10 * math.log10(max(mse, 1e-12))
    d.history.append({"step": d.step, "seconds": round(d.seconds, 3), "loss": round(mse, 7), "psnr": round(p, 3)})
    bar.set_postfix(loss=f"{mse:.5f}", psnr=f"{p:.2f}", refresh=False)


# ----------------------------------------------------------------------------- setup


def _read_run(run_dir: Path) -> dict:
    """The run's training config (scene path, downscale, sh_degree), checked: one-line errors."""
    from budget3d.runfolder import read_config

    saved = read_config(run_dir)
    if not (run_dir / "gaussians.ply").is_file():
        raise UserError(f"{run_dir}: no gaussians.ply (the teacher); finish the run first "
                        f"(budget3d train --out {run_dir} --resume)")
    return saved


def setup(cfg: DistillConfig, *, resume: bool = False) -> Distiller:
    """Build (or restore from RUN/nelf/checkpoint.pt) everything the loop needs."""
    from budget3d.runfolder import load_run_scene
    from budget3d.splat import load_ply
    run_dir = Path(cfg.run)
    if not resume:
        check_config(cfg)
    saved = _read_run(run_dir)
    ckpt = None
    if resume:
        path = run_dir / NELF_DIR / CHECKPOINT
        if not path.is_file():
            raise UserError(f"{path}: no distillation checkpoint to resume; start without --resume")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            old = DistillConfig.from_json(ckpt["config"])
        except Exception as e:  # torch raises many types for truncated / foreign files
            raise UserError(f"{path}: not a readable distillation checkpoint ({type(e).__name__}); "
                            "start again without --resume") from None
        cfg = dataclasses.replace(old, run=str(run_dir), device=cfg.device, backend=cfg.backend, data=cfg.data)
    check_config(cfg)
    rank, world, local_rank = _world()
    device = pick_device(cfg.device, cfg.backend)  # auto follows the backend
    if world > 1:
        if cfg.batch % world:
            raise UserError(f"batch {cfg.batch} does not split over {world} processes; give --batch a multiple of "
                            f"{world} (it is the global batch, shared by the processes)")
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        else:  # share the cores between the processes on this machine
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
        _join(device, world)
    backend = pick_backend(cfg.backend, device)
    scene = load_run_scene(run_dir, saved, cfg.data or None)
    if not scene.train:
        raise UserError(f"{saved.get('data')}: the scene has no training views")
    gaussians = {k: v.to(device).float() for k, v in load_ply(run_dir / "gaussians.ply").items()}
    torch.manual_seed(cfg.seed)
    kind = PRESETS[cfg.preset]
    if cfg.lr is None:
        cfg = dataclasses.replace(cfg, lr=students.LR[kind])
    near, far = scene_bounds(scene)
    poses = PoseSampler(scene, cfg.n_poses, cfg.seed, cfg.train_pose_frac)
    if ckpt is not None:
        frame = Frame.from_json(ckpt.get("frame"), near, far)
        arch = students.saved_arch(ckpt.get("arch"), cfg.preset)
    else:  # scale-free: NDC for forward-facing captures, the teacher's unit ball for the others
        arch = {**students.GRID_PRESETS[cfg.preset], **cfg.arch} if kind == "grid" and cfg.arch else None
        q = {**DEFAULTS, **students.GRID_PRESETS[cfg.preset], **cfg.arch}["frame_quantile"] if kind == "grid" else 0.99
        frame = choose_frame(poses.forward_facing, [v.camera for v in scene.train], gaussians, near, far, q)
    model = students.build(cfg.preset, arch=arch, frame=frame, n_points=cfg.n_points, freqs=cfg.freqs).to(device)
    if world > 1 and device.type == "cuda":  # BatchNorm statistics over the global batch (CUDA only in torch)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    width, height = parse_resolution(cfg.resolution, scene.train[0].camera, model.scale)
    cfg = dataclasses.replace(cfg, resolution=f"{width}x{height}")
    optimizer = torch.optim.AdamW(model.lr_groups(cfg.lr, cfg.grid_lr, cfg.weight_decay),
                                  lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.cache_size > 0:
        limit = cfg.cache_size
    else:  # the whole pool when it fits in cache_mb
        limit = max(1, min(len(poses), int(cfg.cache_mb * 1e6 // (width * height * 3))))
    sh = saved.get("sh_degree")
    teacher = Teacher(gaussians, None if sh is None else int(sh), backend, scene.background, poses, scene, width,
                      height, limit, device)
    d = Distiller(cfg=cfg, run_dir=run_dir, scene=scene, device=device, backend=backend, teacher=teacher,
                  poses=poses, model=model, optimizer=optimizer,
                  width=width, height=height, near=near, far=far, rank=rank, world=world)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        d.step, d.history = int(ckpt["step"]), list(ckpt.get("history", []))
        d.seconds = float(ckpt.get("seconds", 0.0))
        d.init_metrics = dict(ckpt.get("init_metrics", {}))
        torch.set_rng_state(ckpt["rng"])
    elif d.main:
        try:
            d.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{d.out_dir}: cannot create the folder ({e.strerror}); "
                            "check the run folder's permissions") from None
    if backend == "cpu":  # compile (or load) the renderer's kernels before the timed loop
        from budget3d.splat import cpu

        cpu.warmup()
    if ckpt is None:
        pts, wts, t = _teacher_surfaces(d, 32 if model.needs_geometry else 8)
        d.init_metrics["frame_coverage"] = _frame_coverage(d, t)
        if model.needs_geometry and len(pts):  # start the density where the teacher's surfaces are
            model.seed_density(pts, wts)
    d.net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        d.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return d


@torch.no_grad()
def _teacher_surfaces(d: Distiller, views: int = 32) -> tuple:
    """Where the teacher's surfaces are: up to ``views`` training cameras rendered at the ray-grid
    size, their opaque pixels' depth back-projected: (world points, alpha weights, the frame's t)."""
    step = max(1, len(d.scene.train) // views)
    pts, wts, ts = [], [], []
    for v in d.scene.train[::step][:views]:
        cam = at_resolution(v.camera, max(1, d.width // d.model.scale), max(1, d.height // d.model.scale))
        out = d.teacher.render(cam, (cam.width, cam.height))
        o, dirs = camera_rays(cam, 1, device=d.device)  # unit directions; depth is camera z
        fwd = torch.as_tensor(np.asarray(cam.world_to_camera, np.float64)[2, :3], dtype=torch.float32,
                              device=d.device)
        dist = out.depth[..., 0] / (dirs @ fwd).clamp_min(1e-6)
        keep = out.alpha[..., 0] > 0.5
        pts.append((o + dist[..., None] * dirs)[keep])
        wts.append(out.alpha[..., 0][keep])
        ts.append(d.model.frame.param(o, dirs, dist)[keep])
    return torch.cat(pts), torch.cat(wts), torch.cat(ts)


def _frame_coverage(d: Distiller, t: torch.Tensor) -> dict:
    """Where the teacher's surfaces fall along the rays, in the frame's t against the sampled
    [t0, t1]: whether the K points cover them (and how much of the interval they use)."""
    f = d.model.frame
    if not len(t):
        return {"t0": f.t0, "t1": f.t1}
    q = torch.quantile(t.float().cpu()[:200_000], torch.tensor([0.01, 0.5, 0.99])).tolist()
    inside = float(((t >= f.t0) & (t <= f.t1)).float().mean())
    return {"t0": round(f.t0, 4), "t1": round(f.t1, 4), "surface_t_p01_p50_p99": [round(v, 4) for v in q],
            "surfaces_inside": round(inside, 4)}


# ----------------------------------------------------------------------------- evaluation and outputs


def _test_views(d: Distiller) -> list:
    return list(d.scene.test) or list(d.scene.train[:3])


@torch.no_grad()
def _student_one(d: Distiller, camera: Camera) -> torch.Tensor:
    d.model.eval()
    return d.student([camera])[0].clamp(0, 1)


def _quick_eval(d: Distiller) -> float:
    """Mean student-vs-teacher PSNR over the test views (in eval mode)."""
    from budget3d.runtime import psnr

    vals = [psnr(_student_one(d, v.camera), d.teacher.test(i, v)) for i, v in enumerate(_test_views(d))]
    return float(np.mean(vals))


@torch.no_grad()
def evaluate(d: Distiller, strip_path: Optional[Path] = None) -> dict:
    """Student PSNR/SSIM against the ground truth and the teacher, the teacher's own PSNR, and
    the mean-colour baseline, over the test views; writes the GT | teacher | student strip."""
    from budget3d.runtime import psnr
    from budget3d.train.metrics import ssim

    views = _test_views(d)
    train_mean = torch.as_tensor(np.mean([v.image().reshape(-1, 3).mean(0) for v in d.scene.train[:50]], 0) / 255.0,
                                 device=d.device, dtype=torch.float32)
    rows, strip = [], []
    for i, v in enumerate(views):
        gt, teacher = photo(v, d.width, d.height, d.device), d.teacher.test(i, v)
        student = _student_one(d, v.camera)
        rows.append({"name": v.name, "teacher_psnr": psnr(teacher, gt), "student_psnr": psnr(student, gt),
                     "student_ssim": ssim(student, gt), "student_vs_teacher_psnr": psnr(student, teacher),
                     "student_vs_teacher_ssim": ssim(student, teacher),
                     "mean_colour_psnr": psnr(train_mean.expand_as(gt), gt)})
        if len(strip) < d.cfg.strip_views:
            strip.append(torch.cat([gt, teacher, student], dim=1))
    if strip_path is not None and strip:
        write_png(strip_path, torch.cat(strip, dim=0))
    mean = lambda k: round(float(np.mean([r[k] for r in rows])), 4)  # noqa: E731
    out = {k: mean(k) for k in ("teacher_psnr", "student_psnr", "student_vs_teacher_psnr", "student_ssim",
                                "student_vs_teacher_ssim", "mean_colour_psnr")}
    out["n_test_views"] = len(rows)
    out["per_view"] = [{k: (round(x, 4) if isinstance(x, float) else x) for k, x in r.items()} for r in rows]
    return out


def student_payload(d: Distiller) -> dict:
    """What rebuilds the student without the teacher or the scene (``students.load_student``)."""
    cam = at_resolution(_test_views(d)[0].camera, d.width, d.height)
    return students.payload(d.model, resolution=[d.width, d.height], near=d.near, far=d.far,
                            intrinsics=[cam.fx, cam.fy, cam.cx, cam.cy],  # at the output resolution
                            background=list(d.scene.background))


def finish(d: Distiller, progress: bool = True) -> dict:
    """Save the checkpoint and student.pt, evaluate, write metrics.json, strip.png and progress.png."""
    d.save()
    save_torch(student_payload(d), d.out_dir / STUDENT)
    metrics = {
        "preset": d.cfg.preset,
        "params": count_params(d.model),
        "kind": d.model.kind,
        "frame": d.model.frame.kind,
        "macs_per_frame": d.model.macs_per_frame(d.height, d.width),
        "resolution": [d.width, d.height],
        "iters": d.cfg.iters,
        "steps": d.step,  # fewer than iters when ``minutes`` ran out
        "batch": d.cfg.batch,
        "distill_seconds": round(d.seconds, 2),
        "seconds_per_iter": round(d.seconds / max(d.step, 1), 4),  # per step done (``minutes`` may stop early)
        "near_far": [round(d.near, 4), round(d.far, 4)],
        "n_points": d.cfg.n_points,
        "freqs": d.cfg.freqs,
        "pose_sampling": "forward-facing box" if d.poses.forward_facing else "360 orbit band",
        "device": str(d.device),
        "backend": d.backend,
        "threads": torch.get_num_threads(),
        "teacher_cache": {"hits": d.teacher.hits, "misses": d.teacher.misses, "windows": d.teacher.windows,
                          "size": d.teacher.limit, "keeps_all": d.teacher.keep_all},
        **d.init_metrics,
    }
    if d.cfg.eval:
        metrics.update(evaluate(d, d.out_dir / "strip.png"))
        d.history.append({"step": d.step, "seconds": round(d.seconds, 3),
                          "test_psnr_vs_teacher": metrics["student_vs_teacher_psnr"]})
    else:
        metrics.update({k: None for k in ("teacher_psnr", "student_psnr", "student_vs_teacher_psnr", "student_ssim")})
    metrics["history"] = d.history
    write_json(d.out_dir / "metrics.json", metrics)
    _plot(d, metrics)
    return metrics


def _plot(d: Distiller, metrics: dict) -> None:
    """Training PSNR (against the teacher's batch) and test PSNR against the teacher, over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [h for h in d.history if "psnr" in h]
    test = [h for h in d.history if "test_psnr_vs_teacher" in h]
    if not train and not test:
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([h["seconds"] for h in train], [h["psnr"] for h in train], lw=1, label="train batch vs teacher")
    if test:
        ax.plot([h["seconds"] for h in test], [h["test_psnr_vs_teacher"] for h in test], "o-",
                label="test views vs teacher")
    ax.set_xlabel("seconds")
    ax.set_ylabel("PSNR (dB)")
    ax.legend(loc="lower right")
    title = f"{d.cfg.preset} {d.width}x{d.height}"
    if metrics.get("student_psnr") is not None:
        title += f": student {metrics['student_psnr']:.2f} dB, teacher {metrics['teacher_psnr']:.2f} dB vs GT"
    ax.set_title(title)
    fig.tight_layout()
    from budget3d.runtime import save_figure

    save_figure(fig, d.out_dir / "progress.png")


__all__ = ["DistillConfig", "DistillInterrupted", "Distiller", "PoseSampler", "at_resolution", "distill",
           "evaluate", "load_student", "lr_at", "parse_resolution", "setup"]
