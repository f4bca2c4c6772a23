"""Optimizers and learning-rate schedules for the Gaussians.

``VisibleAdam`` is Adam that touches only the rows (Gaussians) seen in the step. Plain Adam
keeps moving every Gaussian by its stale momentum even when the view did not see it, and
spends time doing so; this one reads, updates and writes back only the visible rows, with a
per-row step count so each row's bias correction counts the updates *it* received.

On the CPU (float32, contiguous) a step is one numba kernel per parameter (``_adam_rows_cpu``):
read, update and write each visible row in one pass. The torch ops (a row gather, ~12 elementwise
ops, four index_copy_) had cost more than the render itself in a 20k-Gaussian training step.

The per-row count lives in the optimizer state as ``row_step`` (float, shape (N,)), next to
``exp_avg`` / ``exp_avg_sq``: gsplat.strategy.ops (duplicate / split / remove / relocate /
reset_opa) rewrite every state tensor except the key ``step``, so ``row_step`` stays aligned
with the rows through densification, and new rows start at 0 (fresh bias correction).
"""

from __future__ import annotations

import math
from typing import Optional

import numba
import numpy as np
import torch

from budget3d.splat import pool as P_
from budget3d.splat.kernels import copts as _copts, opts as _opts


class VisibleAdam(torch.optim.Optimizer):
    """Adam over one (N, ...) parameter whose rows are Gaussians; ``step(visible)`` updates only
    the rows where ``visible`` (bool (N,)) is true. ``visible=None`` updates all rows, which is
    exactly ``torch.optim.Adam`` (same eps placement, same bias correction)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-15):
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps))
        self._tmax = None  # an upper bound on the rows' step counts (for the bias-correction table)

    def load_state_dict(self, state_dict):  # noqa: D102
        super().load_state_dict(state_dict)
        self._tmax = None

    @torch.no_grad()
    def step(self, visible: Optional[torch.Tensor] = None, closure=None):  # noqa: D102
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._tmax is None:
            self._tmax = max([int(st["row_step"].max()) for st in self.state.values()
                              if "row_step" in st and st["row_step"].numel()] or [0])
        self._tmax += 1
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "row_step" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    state["row_step"] = torch.zeros(p.shape[0], device=p.device, dtype=torch.float32)
                m, v, t = state["exp_avg"], state["exp_avg_sq"], state["row_step"]
                if _cpu_ok(p, m, v, t, visible):
                    _adam_cpu(p, m, v, t, visible, group["lr"], beta1, beta2, group["eps"],
                              _bias_table(beta1, beta2, self._tmax + 1))
                    continue
                if visible is None:
                    _adam_rows(p, p.grad, m, v, t, group["lr"], beta1, beta2, group["eps"])
                else:
                    _adam_masked(p, p.grad, m, v, t, visible, group["lr"], beta1, beta2, group["eps"])
        return loss


def _adam_masked(p, g, m, v, t, visible, lr, beta1, beta2, eps):
    """``_adam_rows`` on the rows where ``visible``, the others untouched, without a host sync (no
    ``nonzero()``, no ``bool(...)``: on CUDA the step stays queued): the update is computed for
    every row and selected with ``torch.where``. The same elementwise ops as ``_adam_rows`` on the
    gathered rows, so the same bits (rows never visible divide 0 by 0 in the unselected branch)."""
    p_n, m_n, v_n, t_n = p.clone(), m.clone(), v.clone(), t.clone()
    _adam_rows(p_n, g, m_n, v_n, t_n, lr, beta1, beta2, eps)
    rows = visible.view((-1,) + (1,) * (p.dim() - 1))
    p.copy_(torch.where(rows, p_n, p))
    m.copy_(torch.where(rows, m_n, m))
    v.copy_(torch.where(rows, v_n, v))
    t.copy_(torch.where(visible, t_n, t))


def _adam_rows(p, g, m, v, t, lr, beta1, beta2, eps):
    """In-place Adam on whole tensors whose first dim is the row; ``t`` (rows,) step counts."""
    t.add_(1)
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    shape = (-1,) + (1,) * (p.dim() - 1)
    bc1 = (1 - beta1 ** t).view(shape)
    bc2_sqrt = (1 - beta2 ** t).sqrt().view(shape)
    p.addcdiv_(m / bc1, (v.sqrt() / bc2_sqrt).add_(eps), value=-lr)


def _cpu_ok(p, m, v, t, visible) -> bool:
    ts = (p, p.grad, m, v, t)
    return (all(x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous() for x in ts)
            and p.dim() >= 1 and p.shape[0] == t.shape[0]
            and (visible is None or (visible.device.type == "cpu" and visible.shape == (p.shape[0],))))


_TABLES: dict = {}


@numba.njit(cache=True)
def _bias_corrections(beta1, beta2, n):
    """Row k: Adam's bias corrections after k steps, 1 - beta1^k and sqrt(1 - beta2^k), computed as
    _adam_rows_cpu computes them (float64)."""
    tab = np.empty((n, 2))
    lb1 = math.log(beta1) if beta1 > 0 else -math.inf
    lb2 = math.log(beta2) if beta2 > 0 else -math.inf
    for k in range(n):
        tab[k, 0] = 1.0 - math.exp(lb1 * np.float64(k))
        tab[k, 1] = math.sqrt(1.0 - math.exp(lb2 * np.float64(k)))
    return tab


def _bias_table(beta1, beta2, n):
    """The bias corrections of steps 0 .. >= n-1 (a table per betas, grown by doubling): the kernel
    reads them instead of computing two exps and a sqrt per row (~50 ns a row, most of a small
    parameter's step)."""
    tab = _TABLES.get((beta1, beta2))
    if tab is None or tab.shape[0] < n:
        tab = _TABLES[(beta1, beta2)] = _bias_corrections(float(beta1), float(beta2),
                                                          max(n, 1024, 0 if tab is None else 2 * tab.shape[0]))
    return tab


def _adam_cpu(p, m, v, t, visible, lr, beta1, beta2, eps, tab=None):
    from budget3d.splat.cpu import launch

    N = p.shape[0]

    def flat(x):
        return x.detach().numpy().reshape(N, -1)

    vis = (np.ones(N, dtype=np.bool_) if visible is None
           else np.ascontiguousarray(visible.detach().to(torch.bool).numpy()))
    tab = np.zeros((0, 2)) if tab is None else tab
    launch(_adam_rows_w, flat(p), flat(p.grad), flat(m), flat(v), t.numpy(), vis, float(lr), float(beta1),
           float(beta2), float(eps), tab)


@numba.njit(inline="always", **_opts)
def _adam_rows_cpu(lo, hi, p, g, m, v, t, vis, lr, beta1, beta2, eps, tab):
    """_adam_rows on the rows where vis, in place, one pass (float32 state, bias corrections in
    float64 as torch.optim.Adam computes them; read from ``tab`` (see _bias_table) where it has the
    row's step count)."""
    N, D = p.shape
    b1 = np.float32(beta1)
    b2 = np.float32(beta2)
    c1 = np.float32(1.0 - beta1)
    c2 = np.float32(1.0 - beta2)
    e = np.float32(eps)
    lb1 = math.log(beta1) if beta1 > 0 else -math.inf
    lb2 = math.log(beta2) if beta2 > 0 else -math.inf
    for i in range(lo, hi):
        if not vis[i]:
            continue
        ti = t[i] + np.float32(1.0)
        t[i] = ti
        k = np.int64(ti)
        if k < tab.shape[0]:
            bc1 = tab[k, 0]
            bc2s = np.float32(tab[k, 1])
        else:
            bc1 = 1.0 - math.exp(lb1 * np.float64(ti))  # (exp, not pow: pow cost ~40 ns per row)
            bc2s = np.float32(math.sqrt(1.0 - math.exp(lb2 * np.float64(ti))))
        step = np.float32(lr / bc1)
        for j in range(D):
            gj = g[i, j]
            mj = b1 * m[i, j] + c1 * gj
            vj = b2 * v[i, j] + c2 * (gj * gj)
            m[i, j] = mj
            v[i, j] = vj
            p[i, j] = p[i, j] - step * mj / (math.sqrt(vj) / bc2s + e)
    return 0


@P_.kernel(**_copts)
def _adam_rows_w(data):
    d = P_.words(data)
    p = P_.f32_2(d, 0)
    for lo, hi in P_.spans(d, p.shape[0]):
        _adam_rows_cpu(lo, hi, p, P_.f32_2(d, 1), P_.f32_2(d, 2), P_.f32_2(d, 3), P_.f32_1(d, 4), P_.b1(d, 5),
                       P_.f64(d, 6), P_.f64(d, 7), P_.f64(d, 8), P_.f64(d, 9), P_.f64_2(d, 10))


KERNELS = [_adam_rows_w]  # (for _pool.compile_all)


def exp_decay(step: int, total: int, lr_init: float, lr_final: float) -> float:
    """3DGS's log-linear decay from ``lr_init`` at step 0 to ``lr_final`` at ``total``."""
    if total <= 0 or lr_init <= 0:
        return lr_init
    t = min(max(step / total, 0.0), 1.0)
    return math.exp(math.log(lr_init) * (1 - t) + math.log(max(lr_final, 1e-20)) * t)
