"""3DGS-MCMC densification (Kheradmand et al. 2024) to an exact Gaussian budget, in torch.

gsplat's ``MCMCStrategy`` relocates with a CUDA kernel (``compute_relocation``) and perturbs the
means with another (``quat_scale_to_covar_preci``), grows at most 5 % per refinement up to
``cap_max`` and never removes: with the ~15 refinements of a short run it cannot reach a budget,
and a budget below the initial count is never met. This is the same method written in torch, so
it runs on every device, with the count following the budget schedule:

- relocation (every refinement): the dead Gaussians (opacity <= ``min_opacity``) move onto live
  ones sampled by opacity (with replacement); a Gaussian sampled m times and its m copies share
  the opacity and scale of Eq. 9 (``compute_relocation``), so together they render about as the
  one did: the opacity at the centre is unchanged (1 - (1 - o')^n = o) and so is the integral of
  the composited opacity along a line through the centre;
- growth/shrinkage (every refinement): the count after refinement i of N is Taming's
  ``budget_schedule`` S + (B - S)(1 - (1 - i/N)^2) (exactly B after the last); growth adds copies
  of live Gaussians sampled by opacity (MCMC's add, with Eq. 9), shrinkage removes the lowest
  opacities (the dead first);
- noise (every step): means += Sigma eps, eps ~ N(0, I) scaled by lr * noise_lr and by
  sigmoid(100 (1 - o - 0.995)), which only wakes up for nearly transparent Gaussians;
- regularisers: ``regulariser(params)`` = opacity_reg mean(sigmoid(opacity)) + scale_reg
  mean(exp(scales)), gsplat's simple_trainer defaults, added to the loss by the trainer;
- ``finalize``: exactly the budget however the run ended (lowest opacities removed, or copies
  added as in growth).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from gsplat.strategy.base import Strategy
from gsplat.strategy.ops import remove

from budget3d.budget.schedule import budget_schedule
from budget3d.budget.taming import _densify_steps

N_MAX = 51  # gsplat's binomial table: a Gaussian shares its slot with at most 50 copies in Eq. 9
_MULTINOMIAL_MAX = 2**24  # torch.multinomial's category limit


# ---------------------------------------------------------------------------------------------
# Eq. 9


@functools.lru_cache(maxsize=4)
def _eq9_coefficients(n_max: int) -> torch.Tensor:
    """(n_max + 1, n_max) float64: row n, column k-1 holds C(n, k) (-1)^(k-1) / sqrt(k), k = 1..n_max
    (0 where k > n). Eq. 9's double sum sum_{i=1..n} sum_{k=0..i-1} C(i-1, k) (-1)^k o^(k+1)/sqrt(k+1)
    collapses to sum_{k=1..n} C(n, k) (-1)^(k-1) o^k / sqrt(k) (hockey stick: sum_{i=k..n} C(i-1, k-1)
    = C(n, k))."""
    c = torch.zeros(n_max + 1, n_max, dtype=torch.float64)
    for n in range(n_max + 1):
        for k in range(1, n + 1):
            c[n, k - 1] = math.comb(n, k) * (-1.0) ** (k - 1) / math.sqrt(k)
    return c


@torch.no_grad()
def compute_relocation(opacities: torch.Tensor, scales: torch.Tensor, ratios: torch.Tensor, n_max: int = N_MAX
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 9 of 3DGS-MCMC (gsplat's ``compute_relocation`` kernel, in torch): a Gaussian of opacity
    o (N,) and linear scales s (N, 3) that becomes n = ``ratios`` (N,) identical Gaussians (itself
    and n - 1 copies; clamped to 1..n_max) gets

        o' = 1 - (1 - o)^(1/n),     s' = o s / sum_{k=1..n} C(n, k) (-1)^(k-1) o'^k / sqrt(k),

    so the n copies together keep the opacity at the centre and the integral of the composited
    opacity along any line through it. Computed in float64, returned in the inputs' dtype."""
    dtype = opacities.dtype
    o = opacities.reshape(-1).double()
    n = ratios.reshape(-1).long().clamp(1, n_max)
    new_o = 1.0 - torch.pow(1.0 - o, 1.0 / n.double())
    k = torch.arange(1, n_max + 1, dtype=torch.float64, device=o.device)
    coef = _eq9_coefficients(n_max).to(o.device)[n]  # (N, n_max)
    denom = (coef * new_o[:, None] ** k).sum(-1)
    new_s = (o / denom)[:, None] * scales.double()
    return new_o.to(dtype), new_s.to(scales.dtype)


# ---------------------------------------------------------------------------------------------
# the row operations (params, their optimizer state and per-row strategy state kept aligned)


@torch.no_grad()
def sample_by_opacity(weights: torch.Tensor, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``n`` indices drawn with replacement, probability proportional to ``weights`` (NaN, inf,
    negative = 0; uniform when none is positive)."""
    w = torch.nan_to_num(weights.detach().reshape(-1).double(), nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)
    if n <= 0 or w.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=w.device)
    if not (w.sum() > 0):
        w = torch.ones_like(w)
    if w.numel() <= _MULTINOMIAL_MAX:
        return torch.multinomial(w, n, replacement=True, generator=generator)
    cdf = w.cumsum(0)
    u = torch.rand(n, dtype=torch.float64, device=w.device, generator=generator) * cdf[-1]
    return torch.searchsorted(cdf, u, right=True).clamp_max(w.numel() - 1)


def _rewrite(params, optimizers, param_fn: Callable, optimizer_fn: Callable) -> None:
    """Replace every parameter by ``param_fn(name, p)`` and each of its optimizer state tensors
    (all but "step") by ``optimizer_fn(key, v)``, keeping the optimizers pointed at the new ones."""
    for name in list(params.keys()):
        old = params[name]
        new = torch.nn.Parameter(param_fn(name, old.detach()), requires_grad=old.requires_grad)
        params[name] = new
        opt = optimizers.get(name)
        if opt is None:
            continue
        st = opt.state.pop(old, {})
        for key, v in list(st.items()):
            if key != "step" and isinstance(v, torch.Tensor) and v.dim() > 0:
                st[key] = optimizer_fn(key, v)
        for group in opt.param_groups:
            group["params"] = [new]
        opt.state[new] = st


def _relocated_rows(params, sampled: torch.Tensor, min_opacity: float):
    """Eq. 9 for the Gaussians at ``sampled`` (an index may repeat: each occurrence is one more
    copy): their new logit opacities and log scales, one row per occurrence."""
    n = params["means"].shape[0]
    o = torch.sigmoid(params["opacities"].detach().reshape(n))[sampled]
    ratios = torch.bincount(sampled, minlength=n)[sampled] + 1
    new_o, new_s = compute_relocation(o, torch.exp(params["scales"].detach()[sampled]), ratios)
    eps = torch.finfo(torch.float32).eps
    return torch.logit(new_o.clamp(min=min_opacity, max=1.0 - eps)), torch.log(new_s)


def _set_rows(name: str, p: torch.Tensor, idx: torch.Tensor, logit_o, log_s) -> torch.Tensor:
    p = p.clone()
    if name == "opacities":
        p[idx] = logit_o.reshape(p[idx].shape).to(p.dtype)
    elif name == "scales":
        p[idx] = log_s.to(p.dtype)
    return p


@torch.no_grad()
def relocate(params, optimizers, state: dict, dead: torch.Tensor, min_opacity: float = 0.005,
             generator: Optional[torch.Generator] = None) -> int:
    """Move the ``dead`` (bool (N,)) Gaussians onto live ones sampled by opacity: each sampled
    Gaussian and its new copies get Eq. 9's opacity and scale; their optimizer moments (and the
    tensors of ``state`` with one row per Gaussian) restart at 0. Returns how many moved (0 when
    none is dead or none is alive)."""
    n = params["means"].shape[0]
    dead_idx = torch.nonzero(dead.reshape(n)).flatten()
    alive_idx = torch.nonzero(~dead.reshape(n)).flatten()
    if len(dead_idx) == 0 or len(alive_idx) == 0:
        return 0
    o = torch.sigmoid(params["opacities"].detach().reshape(n))
    sampled = alive_idx[sample_by_opacity(o[alive_idx], len(dead_idx), generator)]
    logit_o, log_s = _relocated_rows(params, sampled, min_opacity)
    touched = torch.cat([sampled, dead_idx])

    def param_fn(name, p):
        p = _set_rows(name, p, sampled, logit_o, log_s)
        p[dead_idx] = p[sampled]
        return p

    def optimizer_fn(key, v):
        v = v.clone()
        v[touched] = 0
        return v

    _rewrite(params, optimizers, param_fn, optimizer_fn)
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
            v[touched] = 0
    return len(dead_idx)


@torch.no_grad()
def sample_add(params, optimizers, state: dict, n_add: int, min_opacity: float = 0.005,
               generator: Optional[torch.Generator] = None) -> int:
    """Append ``n_add`` copies of Gaussians sampled by opacity (MCMC's add): each sampled Gaussian
    and its copies get Eq. 9's opacity and scale; the new rows' optimizer moments (and per-row
    ``state`` tensors) start at 0. Returns ``n_add``."""
    n = params["means"].shape[0]
    if n_add <= 0 or n == 0:
        return 0
    o = torch.sigmoid(params["opacities"].detach().reshape(n))
    sampled = sample_by_opacity(o, n_add, generator)
    logit_o, log_s = _relocated_rows(params, sampled, min_opacity)

    def param_fn(name, p):
        p = _set_rows(name, p, sampled, logit_o, log_s)
        return torch.cat([p, p[sampled]])

    def optimizer_fn(key, v):
        return torch.cat([v, v.new_zeros((n_add, *v.shape[1:]))])

    _rewrite(params, optimizers, param_fn, optimizer_fn)
    for k, v in list(state.items()):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
            state[k] = torch.cat([v, v.new_zeros((n_add, *v.shape[1:]))])
    return n_add


@torch.no_grad()
def remove_lowest_opacity(params, optimizers, state: dict, n_remove: int) -> int:
    """Remove the ``n_remove`` Gaussians of lowest opacity (ties: the lower index first)."""
    n = params["means"].shape[0]
    n_remove = min(max(0, int(n_remove)), n)
    if n_remove == 0:
        return 0
    order = torch.argsort(params["opacities"].detach().reshape(n), stable=True)
    mask = torch.zeros(n, dtype=torch.bool, device=params["means"].device)
    mask[order[:n_remove]] = True
    remove(params=params, optimizers=optimizers, state=state, mask=mask)
    return n_remove


def _quat_scale_to_covar(quats: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    from budget3d.splat.project import quat_scale_to_covar

    return quat_scale_to_covar(quats, scales)


@torch.no_grad()
def inject_noise(params, scaler: float, generator: Optional[torch.Generator] = None) -> None:
    """means += Sigma eps: eps ~ N(0, I) x ``scaler`` x sigmoid(100 ((1 - o) - 0.995)), Sigma each
    Gaussian's covariance (gsplat's ``inject_noise_to_position``): only the nearly transparent
    ones move noticeably, along their own shape."""
    means = params["means"]
    n = means.shape[0]
    if n == 0 or scaler == 0:
        return
    o = torch.sigmoid(params["opacities"].detach().reshape(n))
    covar = _quat_scale_to_covar(params["quats"].detach(), torch.exp(params["scales"].detach()))
    eps = torch.randn(means.shape, device=means.device, dtype=means.dtype, generator=generator)
    eps = eps * torch.sigmoid(100.0 * ((1.0 - o) - 0.995))[:, None] * scaler
    means.add_((covar * eps[:, None, :]).sum(-1))


# ---------------------------------------------------------------------------------------------


def _count(params) -> int:
    return int(params["means"].shape[0])


@dataclass
class BudgetMCMCStrategy(Strategy):
    """3DGS-MCMC to exactly ``budget`` Gaussians (see the module docstring), a gsplat strategy:
    ``step_post_backward(params, optimizers, state, step, info, lr)`` with ``lr`` the means'
    learning rate (the noise scale), ``finalize(params, optimizers, state, step)`` once at the end,
    and ``regulariser(params)`` for the loss. Refinements at ``refine_start_iter + k *
    refine_every <= refine_stop_iter``, k >= 1 (the same steps as ``TamingStrategy``)."""

    budget: int  # exact final Gaussian count
    refine_start_iter: int = 500
    refine_stop_iter: int = 15_000
    refine_every: int = 100
    # after the count has reached the budget, dead Gaussians keep moving to live ones every
    # refine_every steps until here (3DGS-MCMC relocates until 25k of 30k steps): without it, what
    # dies after the last growth step stays dead
    relocate_stop_iter: Optional[int] = None  # None: refine_stop_iter
    min_opacity: float = 0.005  # at or below it a Gaussian is dead: relocated at the next refinement
    noise_lr: float = 5e5  # the noise's scale, times the means' learning rate
    opacity_reg: float = 0.01
    scale_reg: float = 0.01
    verbose: bool = False
    generator: Optional[torch.Generator] = field(default=None, repr=False, compare=False)  # sampling, noise

    def __post_init__(self):
        if self.budget <= 0:
            raise ValueError(f"budget must be positive, got {self.budget}")

    def densify_steps(self) -> list[int]:
        return list(self._steps())

    def _steps(self) -> tuple[int, ...]:
        return _densify_steps(self.refine_start_iter, self.refine_stop_iter, self.refine_every)

    # -- gsplat's strategy shape ------------------------------------------------------------

    def initialize_state(self, scene_scale: float = 1.0) -> dict[str, Any]:
        """"history" lists (step, count) after each refinement and finalize; "last" the latest's counts."""
        return {"n_init": None, "schedule": None, "history": [], "last": {}}

    def check_sanity(self, params, optimizers):
        super().check_sanity(params, optimizers)
        for key in ["means", "scales", "quats", "opacities"]:
            assert key in params, f"{key} is required in params but missing."

    def regulariser(self, params):
        """gsplat simple_trainer's MCMC loss terms: L1 on opacity and on (linear) scale."""
        return (self.opacity_reg * torch.sigmoid(params["opacities"]).mean()
                + self.scale_reg * torch.exp(params["scales"]).mean())

    def step_pre_backward(self, params, optimizers, state, step, info):
        pass

    def step_post_backward(self, params, optimizers, state, step, info, lr: float, packed: bool = False):
        self._ensure_state(params, state)
        steps = self._steps()
        if step in steps:
            self._refine(params, optimizers, state, step, state["schedule"][steps.index(step)])
        elif (steps and steps[-1] < step <= (self.relocate_stop_iter or 0)
              and (step - self.refine_start_iter) % self.refine_every == 0):
            self._relocate_only(params, optimizers, state, step)
        inject_noise(params, float(lr) * self.noise_lr, self.generator)

    def finalize(self, params, optimizers, state, step: int) -> int:
        """Exactly ``budget`` Gaussians (a no-op when the last refinement ran): the lowest
        opacities removed, or copies of live Gaussians added. Returns the count."""
        self._ensure_state(params, state)
        if _count(params) != self.budget:
            self._refine(params, optimizers, state, step, self.budget, relocate_dead=False)
        return _count(params)

    # -- internals -------------------------------------------------------------------------

    def _ensure_state(self, params, state):
        if state.get("n_init") is None:
            state["n_init"] = _count(params)
            state["schedule"] = budget_schedule(state["n_init"], self.budget, len(self._steps()))
        state.setdefault("history", [])
        state.setdefault("last", {})

    @torch.no_grad()
    def _relocate_only(self, params, optimizers, state, step):
        rows = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        dead = torch.sigmoid(params["opacities"].detach().reshape(_count(params))) <= self.min_opacity
        moved = relocate(params, optimizers, rows, dead, self.min_opacity, self.generator)
        state.update(rows)
        state["last"] = {"step": int(step), "removed": 0, "relocated": moved, "added": 0, "count": _count(params)}

    @torch.no_grad()
    def _refine(self, params, optimizers, state, step, target: int, relocate_dead: bool = True):
        """Shrink to ``target`` by the lowest opacities (the dead go first), relocate the dead
        that remain, then grow to ``target`` by MCMC's add."""
        target = max(1, int(target))
        rows = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}  # per-row state, if any
        removed = remove_lowest_opacity(params, optimizers, rows, _count(params) - target)
        moved = 0
        if relocate_dead:
            dead = torch.sigmoid(params["opacities"].detach().reshape(_count(params))) <= self.min_opacity
            moved = relocate(params, optimizers, rows, dead, self.min_opacity, self.generator)
        added = sample_add(params, optimizers, rows, target - _count(params), self.min_opacity, self.generator)
        state.update(rows)
        assert _count(params) == target, (_count(params), target)
        state["history"].append((int(step), target))
        state["last"] = {"step": int(step), "removed": removed, "relocated": moved, "added": added, "count": target}
        if self.verbose:
            print(f"[mcmc] step {step}: -{removed} removed, {moved} relocated, +{added} added -> {target}")
