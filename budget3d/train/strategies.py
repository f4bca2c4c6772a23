"""The densification strategies a run can use, as gsplat strategies, and the glue the trainer calls.

Every strategy is a gsplat ``Strategy`` dataclass whose fields are its config, called with
``step_pre_backward`` / ``step_post_backward(params, optimizers, state, step, info)`` where
``info`` has the shape gsplat's ``rasterization`` returns (``gsplat_info`` builds it from our
``RenderOutput``):

- ``taming``: ``budget3d.budget.TamingStrategy``, score-based densification to an exact budget;
- ``default``: ``CappedDefaultStrategy``, gsplat's ``DefaultStrategy`` (classic 3DGS) with its
  opacity reset made to fire on gsplat 1.5.3, optionally capped at a budget;
- ``mcmc``: ``budget3d.budget.BudgetMCMCStrategy``, 3DGS-MCMC (relocation, MCMC's add, noise,
  gsplat's opacity and scale regularisers) in torch on every device, its count following the
  budget schedule to exactly the budget (gsplat's ``MCMCStrategy`` grows 5 % per refinement, never
  shrinks, and needs CUDA kernels).

Beyond gsplat's arguments a strategy may name extras in its ``step_post_backward`` / ``finalize``:
``lr`` (the means' learning rate: MCMC's noise), ``score_views`` and ``render_fn`` (Taming's score
views and how to render them; the trainer supplies both per call, the strategy keeps neither).
``step_post_backward`` / ``finalize`` here pass each strategy the extras it names, so the trainer
calls every strategy the same way.

To add one: write it as a gsplat ``Strategy`` dataclass, make it
in ``make_strategy`` (``_MAKERS``), and give it a ``regulariser(params)`` method if its loss wants one.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Optional

import gsplat
import torch
from gsplat import DefaultStrategy
from gsplat.strategy.ops import remove, reset_opa, split

from budget3d.errors import UserError

STRATEGIES = ("taming", "default", "mcmc")


def make_strategy(cfg, budget: Optional[int], *, device) -> object:
    """The strategy ``cfg.strategy`` names (a resolved ``TrainConfig``: its densify_* schedule,
    opacity_reset_every, score, recycle_frac, prune_scale2d), to ``budget`` Gaussians."""
    if cfg.strategy not in _MAKERS:
        raise UserError(f"unknown strategy {cfg.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    return _MAKERS[cfg.strategy](cfg, budget, torch.device(device))


def _taming(cfg, budget, device):
    from budget3d.budget import TamingStrategy

    weights = {}
    if cfg.score == "grad":  # the ablation: sample by positional gradient alone, no score renders
        weights = dict(w_opacity=0.0, w_volume=0.0, w_depth=0.0, w_screen=0.0, w_pixels=0.0, w_blend=0.0,
                       n_score_views=0)
    return TamingStrategy(budget=budget, refine_start_iter=cfg.densify_start, refine_stop_iter=cfg.densify_stop,
                          refine_every=cfg.densify_every, reset_every=cfg.opacity_reset_every,
                          recycle_frac=cfg.recycle_frac, prune_scale2d=cfg.prune_scale2d, **weights)


def _default(cfg, budget, device):
    reset = cfg.opacity_reset_every or 10 * cfg.iters + 1  # 0 = never
    return CappedDefaultStrategy(refine_start_iter=cfg.densify_start, refine_stop_iter=cfg.densify_stop,
                                 refine_every=cfg.densify_every, reset_every=reset, cap=budget)


def _mcmc(cfg, budget, device):
    from budget3d.budget import BudgetMCMCStrategy

    return BudgetMCMCStrategy(budget=budget, refine_start_iter=cfg.densify_start, refine_stop_iter=cfg.densify_stop,
                              refine_every=cfg.densify_every,
                              relocate_stop_iter=max(cfg.densify_stop, cfg.iters * 5 // 6))  # 3DGS-MCMC: 25k of 30k


_MAKERS = {"taming": _taming, "default": _default, "mcmc": _mcmc}


# ----------------------------------------------------------------------------- the glue


def gsplat_info(radii: list, depths: list, camera) -> dict:
    """gsplat's ``info`` for the C views of a step (one ``radii`` (N, 2) and ``depths`` (N,) per
    view, of the Gaussians this process holds): [C, N, ...] tensors, and a ``means2d`` whose .grad
    ``set_means2d_grad`` fills after backward (our renderers keep the projected centres' gradient
    on their outputs). Sizes are ``camera``'s (the training views share one)."""
    n = radii[0].shape[0]
    means2d = torch.zeros(len(radii), n, 2, device=radii[0].device, requires_grad=True)
    return {"means2d": means2d, "radii": torch.stack([r.reshape(n, 2) for r in radii]),
            "depths": torch.stack([d.reshape(n) for d in depths]), "width": camera.width, "height": camera.height,
            "n_cameras": len(radii), "gaussian_ids": None}


def set_means2d_grad(info: dict, grads: list) -> None:
    """After backward: the pixel-space gradient of the projected centres, one (N, 2) or None (nothing
    drawn) per view, as ``info["means2d"].grad``."""
    m = info["means2d"]
    info["means2d"].grad = torch.stack([torch.zeros_like(m[0]) if g is None else g.reshape(-1, 2) for g in grads])


def initialize_state(strategy, scene_scale: float) -> dict:
    return _call(strategy.initialize_state, scene_scale=scene_scale)


def regulariser(strategy, params):
    """The strategy's loss term (``strategy.regulariser(params)``), 0.0 for those without one."""
    fn = getattr(strategy, "regulariser", None)
    return 0.0 if fn is None else fn(params)


def step_post_backward(strategy, params, optimizers, state, step: int, info: dict, **extras) -> None:
    """``strategy.step_post_backward`` with those of ``extras`` (lr, score_views, render_fn) it names."""
    _call(strategy.step_post_backward, params, optimizers, state, step, info, **extras)


def finalize(strategy, params, optimizers, state, step: int, **extras) -> None:
    """``strategy.finalize`` (exactly the budget, for strategies that have one) with the extras it names."""
    if hasattr(strategy, "finalize"):
        _call(strategy.finalize, params, optimizers, state, step, **extras)


def _call(fn, *args, **extras):
    named = {p.name for p in inspect.signature(fn).parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return fn(*args, **{k: v for k, v in extras.items() if k in named})


# ----------------------------------------------------------------------------- Default, capped


def _version(v: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])


def _gsplat_reset_is_broken() -> bool:
    """Whether gsplat's ``DefaultStrategy`` never resets opacities: in 1.5.3 (only) its test
    ``step % self.reset_every == 0 & step > 0`` parses as a chained comparison that is never true.
    The fix (gsplat #776) is in the releases after 1.5.3; a git install between the fix and the
    next version bump still says 1.5.3, so there the source decides when it can be read."""
    if _version(gsplat.__version__) != (1, 5, 3):
        return False
    try:
        src = inspect.getsource(DefaultStrategy.step_post_backward)
    except (OSError, TypeError):
        return True
    return "== 0 & step > 0" in src


def _grow_gs_fits() -> bool:
    """Whether gsplat's ``DefaultStrategy._grow_gs`` still takes (params, optimizers, state, step, ...)
    (1.6 adds ``scene=``, passed through), as ``CappedDefaultStrategy._grow_gs`` assumes."""
    names = list(inspect.signature(DefaultStrategy._grow_gs).parameters)
    return names[:5] == ["self", "params", "optimizers", "state", "step"]


_RESET_IS_BROKEN = _gsplat_reset_is_broken()


@dataclass
class CappedDefaultStrategy(DefaultStrategy):
    """gsplat's DefaultStrategy, with its opacity reset made to fire where gsplat's does not
    (1.5.3: ``_gsplat_reset_is_broken``; elsewhere gsplat's own reset runs, once).

    With a ``cap`` (a budget given to ``--strategy default``) it is "Default made to end at the
    count", the baseline of the quality-vs-budget sweep: each refinement grows only the
    highest-gradient candidates that fit under the cap (its gradient threshold raised to fit),
    and the last refinement then trims the lowest-opacity Gaussians, or splits the largest ones,
    to the cap, so the rest of the run trains them (``finalize`` does it again only if the count
    moved since). Splitting at the very end instead, untrained, cost ethiopian_head 1.6 dB at
    47,273 (20.84 vs 22.42 dB) for just 186 split Gaussians."""

    cap: Optional[int] = None

    def __post_init__(self):
        if self.cap is not None and not _grow_gs_fits():
            raise UserError(f"gsplat {gsplat.__version__}'s DefaultStrategy._grow_gs no longer takes (params, "
                            "optimizers, state, step), which --strategy default with a --budget needs; install "
                            "gsplat==1.5.3 or train --strategy default without --budget")

    def step_post_backward(self, params, optimizers, state, step, info, packed=False, **kwargs):
        super().step_post_backward(params, optimizers, state, step, info, packed=packed, **kwargs)
        if _RESET_IS_BROKEN and 0 < step < self.refine_stop_iter and step % self.reset_every == 0:
            reset_opa(params=params, optimizers=optimizers, state=state, value=self.prune_opa * 2.0)
        last = (self.refine_stop_iter - 1) // self.refine_every * self.refine_every  # gsplat's last refinement
        if self.cap is not None and step == last and step > self.refine_start_iter:
            self.finalize(params, optimizers, state, step)

    def _grow_gs(self, params, optimizers, state, step, *args, **kwargs):
        if self.cap is not None and state["count"] is not None:
            grads = state["grad2d"] / state["count"].clamp_min(1)
            room = max(0, self.cap - len(params["means"]))
            if int((grads > self.grow_grad2d).sum()) > room:  # keep the `room` largest
                keep = torch.zeros_like(grads, dtype=torch.bool)
                keep[grads.topk(room).indices] = True
                state["grad2d"] = torch.where(keep, state["grad2d"], torch.zeros_like(grads))
        return super()._grow_gs(params, optimizers, state, step, *args, **kwargs)

    @torch.no_grad()
    def finalize(self, params, optimizers, state, step):
        n = len(params["means"])
        if self.cap is None or n == self.cap:
            return
        if n > self.cap:
            mask = torch.zeros(n, dtype=torch.bool, device=params["means"].device)
            mask[params["opacities"].reshape(n).argsort()[: n - self.cap]] = True
            remove(params=params, optimizers=optimizers, state=state, mask=mask)
        while len(params["means"]) < self.cap:
            n = len(params["means"])
            mask = torch.zeros(n, dtype=torch.bool, device=params["means"].device)
            mask[params["scales"].amax(-1).topk(min(self.cap - n, n)).indices] = True
            split(params=params, optimizers=optimizers, state=state, mask=mask)


__all__ = ["STRATEGIES", "CappedDefaultStrategy", "finalize", "gsplat_info",
           "initialize_state", "make_strategy", "regulariser", "set_means2d_grad", "step_post_backward"]
