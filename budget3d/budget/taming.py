"""Taming 3DGS densification (Mallick et al. 2024) to an exact Gaussian budget.

A gsplat strategy (a dataclass whose fields are its config, called with
``step_pre_backward`` / ``step_post_backward(params, optimizers, state, step, info)`` where
``info`` is what gsplat's ``rasterization`` returns), so it runs in our trainer or in gsplat's.
Every ``refine_every`` steps after ``refine_start_iter`` up to ``refine_stop_iter`` it scores
every Gaussian, prunes low-opacity ones and ones grown to half a view on screen (probability
proportional to 1/score) and grows the most useful ones (probability proportional to score,
without replacement: clone when small, split when large) so that the count follows
``budget_schedule`` and, after the last densification step (or ``finalize``), is exactly the
budget. It never renders on its own: the views it scores, and how to render them, come in with
each call (``score_views`` / ``render_fn``).

The score (``compute_scores``), per Gaussian i, with ``n(x) = min(x / median(x), norm_clip)``:

    score_i = w_grad   n(mean positional-gradient norm since the last densification)
            + w_opacity n(sigmoid(opacity))
            + w_volume n(prod exp(scales))                      (3D scale volume)
            + w_depth  n(mean over score views where visible of 1 / camera z)   (near = big)
            + w_screen n(max screen radius / max(W, H) since the last densification)
            + w_pixels n(sum over score views of pixels the Gaussian was composited into)
            + w_blend  n(sum over score views and pixels p of imp_p * alpha_i(p) T_i(p))

    imp_p = (1 - edge_mix) * err_p / mean(err) + edge_mix * edge_p / mean(edge)
    err_p = mean_c |render - gt|,  edge_p = Sobel gradient magnitude of the gt's grey image.

The blend sum comes from the extra-channel trick: render ``extra = ones(N, 1)`` with grad,
backward ``sum_p imp_p * extra_image_p`` and read ``extra.grad``. Medians of 0 fall back to the
median of the positive values; an all-zero term contributes 0; NaN/inf count as 0; if the
whole score is zero or not finite, sampling is uniform.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from gsplat.strategy.base import Strategy
from gsplat.strategy.ops import duplicate, remove, reset_opa, split

from budget3d.budget.schedule import budget_schedule

_MULTINOMIAL_MAX = 2**24  # torch.multinomial's category limit


# ---------------------------------------------------------------------------------------------
# sampling and scoring helpers


def _clean(x: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(x.detach().float(), nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)


@torch.no_grad()
def sample_without_replacement(weights: torch.Tensor, n: int, generator: Optional[torch.Generator] = None
                               ) -> torch.Tensor:
    """``n`` distinct indices, drawn one after another with probability proportional to
    ``weights`` (NaN, inf, negative = 0). When fewer than ``n`` weights are positive, all the
    positive ones are taken and the rest drawn uniformly from the zero ones. ``n`` >= len: all."""
    w = _clean(weights.reshape(-1))
    m = w.numel()
    n = int(n)
    if n <= 0 or m == 0:
        return torch.zeros(0, dtype=torch.long, device=w.device)
    if n >= m:
        return torch.randperm(m, device=w.device, generator=generator)
    pos = torch.nonzero(w > 0).flatten()
    if len(pos) <= n:
        zero = torch.nonzero(w <= 0).flatten()
        rest = zero[torch.randperm(len(zero), device=w.device, generator=generator)[: n - len(pos)]]
        return torch.cat([pos, rest])
    if m <= _MULTINOMIAL_MAX:
        return torch.multinomial(w, n, replacement=False, generator=generator)
    # Gumbel top-k: the same distribution as sequential sampling without replacement.
    u = torch.rand(m, device=w.device, generator=generator).clamp_(1e-20, 1.0)
    keys = torch.log(w) - torch.log(-torch.log(u))
    return keys.topk(n).indices


def _median_normalise(x: torch.Tensor, clip: float) -> torch.Tensor:
    x = _clean(x)
    if x.numel() == 0:
        return x
    med = x.median()
    if med <= 0:
        pos = x[x > 0]
        if pos.numel() == 0:
            return torch.zeros_like(x)
        med = pos.median()
    out = x / med
    return out.clamp_max(clip) if clip and clip > 0 else out


def _edges(gt: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of the grey image, (H, W)."""
    grey = gt[..., :3].mean(-1)[None, None]
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=gt.device, dtype=gt.dtype)
    k = torch.stack([kx, kx.T])[:, None]  # (2, 1, 3, 3)
    g = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), k)
    return g.pow(2).sum(1).sqrt()[0]


def pixel_importance(image: torch.Tensor, gt: torch.Tensor, edge_mix: float) -> torch.Tensor:
    """(H, W) per-pixel importance: a mix of the mean-normalised L1 error and gt edges.
    Uniform ones when both are zero everywhere."""
    err = (image.detach() - gt).abs().mean(-1)
    edge = _edges(gt)
    imp = torch.zeros_like(err)
    em, ee = err.mean(), edge.mean()
    if torch.isfinite(em) and em > 0 and edge_mix < 1:
        imp = imp + (1.0 - edge_mix) * err / em
    if torch.isfinite(ee) and ee > 0 and edge_mix > 0:
        imp = imp + edge_mix * edge / ee
    imp = torch.nan_to_num(imp, nan=0.0, posinf=0.0, neginf=0.0)
    if not (imp.sum() > 0):
        imp = torch.ones_like(err)
    return imp


def view_statistics(params, views, render_fn, edge_mix: float) -> dict[str, torch.Tensor]:
    """Render ``views`` [(camera, gt)] and return per-Gaussian sums: "blend"
    (sum_p imp_p alpha T), "pixels", "inv_depth" (mean of 1/z where visible), "screen" (max
    radius / max(W, H))."""
    means = params["means"]
    n, dev = means.shape[0], means.device
    blend = torch.zeros(n, device=dev)
    pixels = torch.zeros(n, device=dev)
    inv_depth = torch.zeros(n, device=dev)
    seen = torch.zeros(n, device=dev)
    screen = torch.zeros(n, device=dev)
    detached = {k: v.detach() for k, v in params.items()}
    for cam, gt in views:
        with torch.enable_grad():
            extra = torch.ones(n, 1, device=dev, dtype=means.dtype, requires_grad=True)
            out = render_fn(detached, cam, extra)
            gt = torch.as_tensor(gt, device=out.image.device, dtype=out.image.dtype)
            imp = pixel_importance(out.image, gt, edge_mix)
            (imp[..., None] * out.extra).sum().backward()
        if extra.grad is not None:
            blend += _clean(extra.grad[:, 0]).to(dev)
        vis = (out.radii > 0).reshape(n, -1).any(-1).to(dev)
        pixels += _clean(out.n_pixels.reshape(-1)).to(dev)
        z = out.depths.detach().reshape(-1).to(dev).float()
        inv_depth += torch.where(vis & (z > 0), 1.0 / z.clamp_min(1e-6), torch.zeros_like(z))
        seen += vis.float()
        r = out.radii.detach().reshape(n, -1).float().max(-1).values.to(dev)
        screen = torch.maximum(screen, r / float(max(cam.width, cam.height)))
    return {"blend": blend, "pixels": pixels, "inv_depth": inv_depth / seen.clamp_min(1), "screen": screen,
            "seen": seen}


def compute_scores(params, state: dict, cfg, views, render_fn, seen: Optional[dict] = None) -> torch.Tensor:
    """The non-negative score of every Gaussian (formula in the module docstring), weighed by
    ``cfg``'s w_* fields, edge_mix and norm_clip (a ``TamingStrategy``). ``seen``, if
    given, receives "seen": a bool per Gaussian, visible in a score view (in a training step since
    the last densification when there are no score views): the ones whose score has evidence."""
    n = params["means"].shape[0]
    dev = params["means"].device
    zeros = torch.zeros(n, device=dev)

    def st(key):
        v = state.get(key)
        return v.to(dev).float() if isinstance(v, torch.Tensor) and v.shape[0] == n else zeros

    grad = st("grad2d") / st("count").clamp_min(1)
    vs = view_statistics(params, views, render_fn, cfg.edge_mix) if views else {}
    screen = torch.maximum(st("max_radii"), vs.get("screen", zeros))
    if seen is not None:
        seen["seen"] = vs["seen"] > 0 if vs else st("count") > 0
    with torch.no_grad():
        terms = [
            (cfg.w_grad, grad),
            (cfg.w_opacity, torch.sigmoid(params["opacities"].detach().reshape(n, -1)[:, 0].float())),
            (cfg.w_volume, torch.exp(params["scales"].detach().float().sum(-1).clamp(-80, 80))),
            (cfg.w_depth, vs.get("inv_depth", zeros)),
            (cfg.w_screen, screen),
            (cfg.w_pixels, vs.get("pixels", zeros)),
            (cfg.w_blend, vs.get("blend", zeros)),
        ]
        score = zeros.clone()
        for w, x in terms:
            if w:
                score += float(w) * _median_normalise(x, cfg.norm_clip)
        return _clean(score)


# ---------------------------------------------------------------------------------------------


def _count(params) -> int:
    return int(params["means"].shape[0])


def _default_render(p, cam, extra):
    from budget3d.splat import render

    return render(p, cam, backend="auto", extra=extra)


@functools.lru_cache(maxsize=16)
def _densify_steps(start: int, stop: int, every: int) -> tuple[int, ...]:
    steps = tuple(range(start + max(1, every), stop + 1, max(1, every)))
    return steps or (max(start, stop),)


@dataclass
class TamingStrategy(Strategy):
    """Score-based densification to an exact budget (see the module docstring). Its fields are
    its config; steps are training steps as the trainer counts them.

    The schedule has gsplat's names but Taming's own steps: densification at
    ``refine_start_iter + k * refine_every <= refine_stop_iter``, k >= 1 (``densify_steps``).

    ``step_post_backward`` reads gsplat's ``info``: "means2d" (a [C, N, 2] tensor whose .grad
    holds the pixel-space gradient after backward; ``step_pre_backward`` retains it), "radii"
    [C, N, 2], "width", "height". Its view terms come from the call: ``score_views(k)`` returns
    k training views as [(Camera, gt (H, W, 3) float in [0, 1])], called only on the steps that
    score; ``render_fn(params, camera, extra)`` returns a ``RenderOutput`` (backend, SH degree and
    background bound by the caller; default: ``budget3d.splat.render`` on the "auto" backend).
    Without ``score_views`` the view terms are 0. Call ``finalize`` (same extras) once after the
    last training step.
    """

    budget: int  # exact final Gaussian count
    refine_start_iter: int = 500  # first densification at refine_start_iter + refine_every
    refine_stop_iter: int = 15_000  # last densification at the last start + k * refine_every <= stop
    refine_every: int = 100
    reset_every: int = 3000  # opacity reset period while densifying; 0 = off
    n_score_views: int = 6  # training views rendered to score each densification step
    # score weights (see the module docstring)
    w_grad: float = 1.0
    w_opacity: float = 0.5
    w_volume: float = 0.1
    w_depth: float = 0.1
    w_screen: float = 0.1
    w_pixels: float = 0.5
    w_blend: float = 1.0
    edge_mix: float = 0.5  # pixel importance: 0 = L1 error only, 1 = gt edges only
    norm_clip: float = 20.0  # cap on each median-normalised term, so one heavy tail cannot dominate
    grow_grad2d: float = 0.0002  # Gaussians whose mean NDC positional gradient reaches this grow first
    #                              (3DGS's test; Taming samples among them by score); when the schedule
    #                              needs more, the others follow by score; 0 = all alike
    grow_scale3d: float = 0.01  # clone if max scale <= this x scene scale, else split
    prune_opa: float = 0.005  # opacity below which a Gaussian is a pruning candidate
    prune_frac: float = 1.0  # fraction of the candidates pruned per step (chosen prop. to 1/score)
    recycle_frac: float = 0.1  # fraction of the lowest-score Gaussians removed and re-grown each step
    prune_scale2d: float = 0.5  # also prune Gaussians whose screen radius reached this fraction of
    #                            the image since the last densification (haze in front of a camera;
    #                            0.15 also took the background of tight budgets); 0 = off
    revised_opacity: bool = False  # gsplat's split option (arXiv:2404.06109)
    verbose: bool = False
    generator: Optional[torch.Generator] = field(default=None, repr=False, compare=False)  # sampling

    def __post_init__(self):
        if self.budget <= 0:
            raise ValueError(f"budget must be positive, got {self.budget}")

    def densify_steps(self) -> list[int]:
        """The steps at which the strategy densifies: refine_start_iter + k * refine_every <=
        refine_stop_iter, k >= 1 (Taming's N = (stop - start) // every); a single step at
        max(start, stop) if none fit."""
        return list(self._steps())

    @property
    def steps(self) -> list[int]:
        return self.densify_steps()

    def _steps(self) -> tuple[int, ...]:
        return _densify_steps(self.refine_start_iter, self.refine_stop_iter, self.refine_every)

    # -- gsplat's strategy shape ------------------------------------------------------------

    def initialize_state(self, scene_scale: float = 1.0) -> dict[str, Any]:
        """Per-row tensors (grad2d, count, max_radii) are created lazily on the first step, and
        gsplat's ops keep them aligned with the parameters. "history" lists (step, count)."""
        return {"grad2d": None, "count": None, "max_radii": None, "scene_scale": float(scene_scale),
                "n_init": None, "schedule": None, "history": [], "last": {}}

    def check_sanity(self, params, optimizers):
        super().check_sanity(params, optimizers)
        for key in ["means", "scales", "quats", "opacities"]:
            assert key in params, f"{key} is required in params but missing."

    def step_pre_backward(self, params, optimizers, state, step, info):
        m = info.get("means2d") if isinstance(info, dict) else None
        if isinstance(m, torch.Tensor) and m.requires_grad:
            m.retain_grad()

    def step_post_backward(self, params, optimizers, state, step, info, packed: bool = False,
                           score_views: Optional[Callable[[int], list]] = None, render_fn: Optional[Callable] = None):
        if packed:
            raise ValueError("TamingStrategy needs unpacked per-Gaussian info (packed=False)")
        self._ensure_state(params, state)
        steps = self._steps()
        if step > steps[-1]:
            return
        self._update_state(params, state, info)
        if step in steps:
            target = state["schedule"][steps.index(step)]
            self._densify(params, optimizers, state, step, target, score_views=score_views, render_fn=render_fn)
        # Reset after densifying (as 3DGS does), only while pruning still follows.
        if self.reset_every > 0 and 0 < step < steps[-1] and step % self.reset_every == 0:
            reset_opa(params=params, optimizers=optimizers, state=state, value=self.prune_opa * 2.0)

    def finalize(self, params, optimizers, state, step: int, score_views: Optional[Callable[[int], list]] = None,
                 render_fn: Optional[Callable] = None) -> int:
        """Force exactly ``budget`` Gaussians (call once after the last training step; a no-op
        when the count is already right). Returns the count."""
        self._ensure_state(params, state)
        if _count(params) != self.budget:
            self._densify(params, optimizers, state, step, self.budget, prune_low_opacity=False,
                          score_views=score_views, render_fn=render_fn)
        return _count(params)

    # -- internals -------------------------------------------------------------------------

    def _ensure_state(self, params, state):
        n = _count(params)
        if state.get("n_init") is None:
            state["n_init"] = n
            state["schedule"] = budget_schedule(n, self.budget, len(self._steps()))
        state.setdefault("history", [])
        state.setdefault("scene_scale", 1.0)
        dev = params["means"].device
        for key in ("grad2d", "count", "max_radii"):
            v = state.get(key)
            if not isinstance(v, torch.Tensor) or v.shape[0] != n:
                state[key] = torch.zeros(n, device=dev)

    def _update_state(self, params, state, info):
        n = _count(params)
        radii = info.get("radii")
        if radii is None:
            return
        radii = radii.detach().reshape(-1, n, radii.shape[-1]).float()  # (C, N, 2)
        vis = (radii > 0).any(-1)  # (C, N)
        grad = info["means2d"].grad if isinstance(info.get("means2d"), torch.Tensor) else None
        dev = state["grad2d"].device
        if grad is not None:
            g = grad.detach().reshape(-1, n, 2).float().clone()
            g[..., 0] *= info["width"] / 2.0
            g[..., 1] *= info["height"] / 2.0
            state["grad2d"] += (g.norm(dim=-1) * vis).sum(0).to(dev)
        state["count"] += vis.float().sum(0).to(dev)
        r = radii.max(-1).values.max(0).values / float(max(info["width"], info["height"]))
        state["max_radii"] = torch.maximum(state["max_radii"], r.to(dev))

    @torch.no_grad()
    def _densify(self, params, optimizers, state, step, target: int, prune_low_opacity: bool = True,
                 score_views: Optional[Callable[[int], list]] = None, render_fn: Optional[Callable] = None):
        """One decision per densification step, ending at exactly ``target`` Gaussians:

        1. prune low-opacity and screen-filling (``prune_scale2d``) Gaussians, chosen by 1/score,
           but never so many that fewer than half of min(count, target) survive (regrowing from a
           handful of survivors is what emptied forward-facing scenes after an opacity reset). No
           3D-size prune after a reset, as 3DGS has: it took the background of forward-facing
           scenes (35.0 -> 29.7 dB on the forward-facing test scene with one reset);
        2. recycle: when more Gaussians pass the gradient test than the target has room for, up to
           ``recycle_frac`` of the survivors with the lowest scores go too, so their slots are
           re-grown where the score is high (a tight budget moves to where it helps);
        3. trim the lowest scores (shrinking budgets), or grow: Gaussians passing the gradient test
           first, prop. to score, then, if the target needs more, the others prop. to score.
        """
        target = max(1, int(target))
        n0 = _count(params)
        floor = (min(n0, target) + 1) // 2
        bad = torch.sigmoid(params["opacities"].detach().reshape(n0, -1)[:, 0]) < self.prune_opa
        if self.prune_scale2d > 0:
            bad |= state["max_radii"] > self.prune_scale2d
        cand = torch.nonzero(bad).flatten() if prune_low_opacity else bad.new_zeros(0, dtype=torch.long)
        k = min(int(round(len(cand) * min(max(self.prune_frac, 0.0), 1.0))), max(0, n0 - floor))
        n_recycle = 0
        if prune_low_opacity and self.recycle_frac > 0:  # only to serve growth the target has no room for
            demand = int(((state["grad2d"] / state["count"].clamp_min(1)) >= self.grow_grad2d).sum())
            n_recycle = min(int(self.recycle_frac * min(n0 - k, target)), max(0, demand - (target - (n0 - k))))
        if k <= 0 and n_recycle <= 0 and n0 == target:  # nothing to do: skip the score renders
            return self._record(params, state, step, target)
        evidence = {}
        k_views = self.n_score_views if score_views is not None else 0
        views = list(score_views(k_views)) if k_views > 0 else []
        score = compute_scores(params, state, self, views, render_fn or _default_render, seen=evidence)

        n_pruned = 0
        if k > 0:
            s = score[cand]
            eps = float(s[s > 0].median()) * 1e-3 if (s > 0).any() else 1.0
            pick = cand[sample_without_replacement(1.0 / (s + eps), k, self.generator)]
            keep = torch.ones_like(evidence["seen"])
            keep[pick] = False
            evidence["seen"] = evidence["seen"][keep]
            score = self._remove(params, optimizers, state, score, pick)
            n_pruned = k
        n = _count(params)
        n_trimmed = min(max(0, n - target) + n_recycle, n - 1)
        if n_trimmed > 0:  # lowest scores first; Gaussians no score view saw only after all seen ones
            rank = torch.where(evidence["seen"], score, score.max() + 1 + score)
            score = self._remove(params, optimizers, state, score, torch.argsort(rank, stable=True)[:n_trimmed])
        n_clone = n_split = 0
        while _count(params) < target:
            n = _count(params)
            w = score if score.sum() > 0 else torch.ones_like(score)
            if self.grow_grad2d > 0:  # the gradient test ranks first: qualifying rows weigh ~1e6 x more
                qual = (state["grad2d"] / state["count"].clamp_min(1)) >= self.grow_grad2d
                w = torch.where(qual, w + 1e-12 * float(w.max().clamp_min(1e-30)), w * 1e-6)
            pick = sample_without_replacement(w, min(target - n, n), self.generator)
            score, c, s = self._grow(params, optimizers, state, score, pick)
            n_clone, n_split = n_clone + c, n_split + s
        assert _count(params) == target, (_count(params), target)
        self._record(params, state, step, target, n_pruned, n_trimmed, n_clone, n_split)

    def _record(self, params, state, step, target, pruned=0, trimmed=0, cloned=0, split_=0):
        """Reset the running statistics and log the step in ``state["history"]`` / ``state["last"]``."""
        for key in ("grad2d", "count", "max_radii"):
            state[key].zero_()
        n = _count(params)
        state["history"].append((int(step), n))
        state["last"] = {"step": int(step), "pruned": pruned, "trimmed": trimmed, "cloned": cloned,
                         "split": split_, "count": n}
        if self.verbose:
            print(f"[taming] step {step}: -{pruned} low-opacity -{trimmed} trimmed +{cloned} cloned "
                  f"+{split_} split -> {n} (target {target})")

    def _remove(self, params, optimizers, state, score, idx):
        mask = torch.zeros(_count(params), dtype=torch.bool, device=params["means"].device)
        mask[idx.to(mask.device)] = True
        state["_score"] = score
        try:
            remove(params=params, optimizers=optimizers, state=state, mask=mask)
            return state["_score"]
        finally:
            state.pop("_score", None)

    def _grow(self, params, optimizers, state, score, idx):
        """Clone the small picked Gaussians, split the large ones: each adds exactly one."""
        n = _count(params)
        dev = params["means"].device
        pick = torch.zeros(n, dtype=torch.bool, device=dev)
        pick[idx.to(dev)] = True
        small = torch.exp(params["scales"]).max(-1).values <= self.grow_scale3d * state["scene_scale"]
        is_dup, is_split = pick & small, pick & ~small
        n_dup, n_split = int(is_dup.sum()), int(is_split.sum())
        state["_score"] = score
        try:
            if n_dup:
                duplicate(params=params, optimizers=optimizers, state=state, mask=is_dup)
                is_split = torch.cat([is_split, torch.zeros(n_dup, dtype=torch.bool, device=dev)])
            if n_split:
                split(params=params, optimizers=optimizers, state=state, mask=is_split,
                      revised_opacity=self.revised_opacity)
            return state["_score"], n_dup, n_split
        finally:
            state.pop("_score", None)


TamingConfig = TamingStrategy  # its old name, for callers that only score (compute_scores reads the weights)
