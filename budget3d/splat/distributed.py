"""Rendering with the Gaussians sharded across processes (torch.distributed), Grendel's design
("On Scaling Up 3D Gaussian Splatting Training", Zhao et al. 2024).

Each rank holds a shard of the Gaussians and renders its own views of the step's global batch.
Every rank projects its shard into every camera of the batch (projection and SH colour are per
Gaussian, so they split by Gaussian); an all-to-all sends each rank the projected 2-D Gaussians
its cameras see (means, conics, opacity, colour, depth, radii: 12 floats a Gaussian); each rank
composites its own images from what it received (compositing is per pixel, so it splits by
camera); in the backward pass the same all-to-all, reversed, returns each received row's
gradient to the rank that owns the Gaussian. The rasteriser sorts by depth over everything it
received, so a sharded render composites exactly as the whole model in one process does.

Backends: "cpu" and "torch" project and rasterise with our kernels; "cuda" with gsplat's
(``fully_fused_projection``, ``isect_tiles``, ``rasterize_to_pixels``). gsplat's own
``rasterization(..., distributed=True)`` does the same exchange, but its ``meta`` holds the
received rows, not the owner's: the densification strategies need the gradient of each owned
Gaussian's projected centre in every camera, which only the pre-exchange tensors carry.
Collectives: gloo on the CPU, NCCL on GPUs, the process group torchrun sets up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from budget3d.splat.output import RenderOutput, finish

# packed columns of one projected Gaussian: means2d (2), conic (3), opacity, rgb (3), depth, radii (2)
M2D, CONIC, OPAC, RGB, DEPTH, RADII = slice(0, 2), slice(2, 5), 5, slice(6, 9), 9, slice(10, 12)
COLUMNS = 12


@dataclass
class Local:
    """This rank's shard projected into one camera of the batch: what the strategies read."""

    means2d: torch.Tensor  # (n, 2), retains its gradient after backward
    radii: torch.Tensor  # (n, 2) int32, 0 = not visible
    depths: torch.Tensor  # (n,)


class _Exchange(torch.autograd.Function):
    """all_to_all of per-destination row blocks (one ``all_to_all_single`` with split sizes, which
    gloo and NCCL both take); backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, send_counts, recv_counts, group, *blocks):
        ctx.send_counts, ctx.recv_counts, ctx.group = send_counts, recv_counts, group
        return tuple(_all_to_all(list(blocks), send_counts, recv_counts, group))

    @staticmethod
    def backward(ctx, *grads):
        like = next((g for g in grads if g is not None), None)
        grads = [g if g is not None else torch.zeros(n, COLUMNS, dtype=like.dtype if like is not None else None,
                                                     device=like.device if like is not None else None)
                 for g, n in zip(grads, ctx.recv_counts)]
        return (None, None, None, *_all_to_all(grads, ctx.recv_counts, ctx.send_counts, ctx.group))


def _all_to_all(blocks: list, send_counts: list, recv_counts: list, group) -> list:
    flat = torch.cat([b.reshape(-1, COLUMNS) for b in blocks]).contiguous()
    out = flat.new_empty(sum(recv_counts), COLUMNS)
    dist.all_to_all_single(out, flat, output_split_sizes=list(recv_counts), input_split_sizes=list(send_counts),
                           group=group)
    return list(out.split(list(recv_counts)))


def _project(params, camera, backend: str, sh_degree: int, near: float, far: float):
    """(means2d, conics, depths, radii, rgb, opacities) of every Gaussian of ``params`` in ``camera``."""
    means = params["means"]
    dev, dt = means.device, means.dtype
    viewmat, K = camera.viewmat(dev, dt), camera.K(dev, dt)
    W, H = camera.width, camera.height
    scales, opac, quats = torch.exp(params["scales"]), torch.sigmoid(params["opacities"]), params["quats"]
    shN = params["shN"]
    deg = min(sh_degree, int(round((shN.shape[1] + 1) ** 0.5)) - 1)
    if backend == "cpu":
        from budget3d.splat.cpu import project_sh_posed

        m2d, conics, depths, radii, rgb = project_sh_posed(means, quats, scales, opac, params["sh0"], shN, viewmat,
                                                           K, W, H, near, far, deg)
        return m2d, conics, depths, radii, rgb, opac
    from budget3d.splat.project import sh_to_rgb

    cam_center = -viewmat[:3, :3].T @ viewmat[:3, 3]
    rgb = sh_to_rgb(params["sh0"], shN, F.normalize(means - cam_center, dim=-1), deg)
    if backend == "cuda":
        from gsplat import fully_fused_projection

        radii, m2d, depths, conics, _ = fully_fused_projection(
            means, None, quats, scales, viewmat[None], K[None], W, H, near_plane=near, far_plane=far,
            opacities=opac)
        radii = radii[0] if radii.dim() == 3 else radii[0][:, None].expand(-1, 2)
        return m2d[0], conics[0], depths[0], radii.int(), rgb, opac
    from budget3d.splat.project import project

    p = project(means, quats, scales, opac, viewmat, K, W, H, near, far)
    return p.means2d, p.conics, p.depths, p.radii, rgb, opac


def _rasterize(rows: torch.Tensor, W: int, H: int, background, backend: str):
    """Composite received rows: (image (H, W, 4) colour + depth, alpha, n_pixels)."""
    m2d, conics, opac = rows[:, M2D], rows[:, CONIC], rows[:, OPAC]
    feats = torch.cat([rows[:, RGB], rows[:, DEPTH:DEPTH + 1]], -1)
    depths, radii = rows[:, DEPTH].detach(), rows[:, RADII].detach().round().int()
    bg = None if background is None else torch.cat([background, background.new_zeros(1)])
    if backend == "cuda":
        from gsplat import isect_offset_encode, isect_tiles, rasterize_to_pixels

        tile = 16
        tw, th = (W + tile - 1) // tile, (H + tile - 1) // tile
        m2d, conics, opac = m2d.contiguous(), conics.contiguous(), opac.contiguous()
        _, isect_ids, flatten_ids = isect_tiles(m2d[None], radii[None], depths.contiguous()[None], tile, tw, th)
        offsets = isect_offset_encode(isect_ids, 1, tw, th)
        img, alpha = rasterize_to_pixels(m2d[None], conics[None], feats[None], opac[None], W, H, tile, offsets,
                                         flatten_ids, backgrounds=None if bg is None else bg[None])
        return img[0], alpha[0], torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device)
    if backend == "cpu":
        from budget3d.splat.cpu import rasterize_cpu

        return rasterize_cpu(m2d, conics, opac, feats, depths, radii, W, H, bg)
    from budget3d.splat.rasterize_torch import rasterize_torch

    return rasterize_torch(m2d, conics, opac, feats, depths, radii, W, H, bg)


def render_sharded(params, cameras: list, *, backend: str, sh_degree: int, backgrounds: list,
                   near: float = 0.01, far: float = 1e10, group=None) -> tuple[list[RenderOutput], list[Local], dict]:
    """Render the step's global batch with the Gaussians sharded over the ranks of ``group``.

    ``cameras``: every camera of the batch, the same list on every rank, in rank order: rank r
    renders ``cameras[r * per:(r + 1) * per]`` (per = len(cameras) // world), ``backgrounds`` their
    (3,) backgrounds. Returns this rank's images (``RenderOutput``; its means2d / radii / n_pixels
    refer to the received rows), this shard's projection into every camera of the batch
    (``Local``: the strategies' information), and the exchange's sizes (rows and bytes sent)."""
    world, me = dist.get_world_size(group), dist.get_rank(group)
    per = len(cameras) // world
    assert per * world == len(cameras), (len(cameras), world)
    mine = range(me * per, (me + 1) * per)
    local, blocks = [], [[] for _ in range(world)]
    for j, cam in enumerate(cameras):
        m2d, conics, depths, radii, rgb, opac = _project(params, cam, backend, sh_degree, near, far)
        if m2d.requires_grad:
            m2d.retain_grad()
        local.append(Local(m2d, radii, depths))
        vis = (radii > 0).any(-1).nonzero().flatten()  # only what the camera sees travels
        row = torch.cat([m2d[vis], conics[vis], opac[vis, None], rgb[vis], depths[vis, None],
                         radii[vis].to(m2d.dtype)], -1)
        blocks[j // per].append(row)
    send = [torch.cat(b) for b in blocks]  # to rank r: its cameras' rows, in order
    # one collective for the sizes: table[src][j] = rows rank src sends for camera j
    percam = torch.tensor([int(r.shape[0]) for b in blocks for r in b], dtype=torch.int64,
                          device=params["means"].device)
    gathered = [torch.empty_like(percam) for _ in range(world)]
    dist.all_gather(gathered, percam, group=group)
    table = [t.tolist() for t in gathered]
    recv_counts = [sum(table[src][j] for j in mine) for src in range(world)]
    received = _Exchange.apply([int(x.shape[0]) for x in send], recv_counts, group, *send)
    outs = []
    for c_local, j in enumerate(mine):
        parts = []
        for src in range(world):
            off = sum(table[src][i] for i in mine[:c_local])
            parts.append(received[src][off:off + table[src][j]])
        rows = torch.cat(parts)
        cam = cameras[j]
        img, alpha, n_pixels = _rasterize(rows, cam.width, cam.height, backgrounds[c_local], backend)
        outs.append(finish(img, alpha, rows[:, M2D], rows[:, RADII].detach().round().int(), n_pixels,
                           rows[:, DEPTH].detach(), False))
    stats = {"rows_sent": int(sum(x.shape[0] for x in send)), "rows_received": int(sum(recv_counts)),
             "bytes_sent": int(sum(x.shape[0] for x in send)) * COLUMNS * 4 * 2}  # forward and backward
    return outs, local, stats


def row_counts(t: torch.Tensor, group=None) -> list[int]:
    """Every rank's number of rows of its ``t``."""
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    counts = [torch.empty_like(n) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, n, group=group)
    return [int(c) for c in counts]


def gather_rows(tensors: dict, group=None) -> tuple[dict, list[int]]:
    """Every rank's rows of ``tensors`` (same keys and trailing shapes on every rank, any number of
    rows), concatenated in rank order on every rank; and each rank's row count."""
    world = dist.get_world_size(group)
    counts = row_counts(next(iter(tensors.values())), group)
    top = max(counts)
    out = {}
    for k, v in tensors.items():
        v = v.detach().contiguous()
        pad = torch.cat([v, v.new_zeros(top - v.shape[0], *v.shape[1:])]) if v.shape[0] < top else v
        parts = [torch.empty_like(pad) for _ in range(world)]
        dist.all_gather(parts, pad, group=group)
        out[k] = torch.cat([p[:c] for p, c in zip(parts, counts)])
    return out, counts


@torch.no_grad()
def rebalance(params, optimizers: dict, state: dict, tolerance: float = 1.2, group=None) -> bool:
    """When a rank holds more than ``tolerance`` x the mean count, split the whole model (the ranks'
    rows in rank order) evenly again: each rank sends the rows that now belong elsewhere, with their
    optimizer moments and the strategy's per-row state, in one ``all_to_all_single``. Returns
    whether anything moved. The order of the rows over all ranks is kept."""
    from gsplat.strategy.ops import _update_param_with_optimizer

    world, me = dist.get_world_size(group), dist.get_rank(group)
    dev = params["means"].device
    n = int(params["means"].shape[0])
    counts = row_counts(params["means"], group)
    total = sum(counts)
    if total == 0 or max(counts) <= tolerance * total / world:
        return False
    starts = [sum(counts[:r]) for r in range(world)]
    new = [shard_slice(total, r, world) for r in range(world)]

    def overlap(a0, a1, b):
        return max(0, min(a1, b.stop) - max(a0, b.start))

    send = [overlap(starts[me], starts[me] + n, new[r]) for r in range(world)]
    recv = [overlap(starts[r], starts[r] + counts[r], new[me]) for r in range(world)]
    # every per-row tensor, as float columns: parameters, their optimizer moments, strategy state
    rows = []
    for k, p in params.items():
        rows.append(("param", k, None, p.data))
        st = optimizers[k].state.get(p, {}) if k in optimizers else {}
        rows += [("opt", k, key, v) for key, v in st.items() if isinstance(v, torch.Tensor) and v.dim() > 0
                 and v.shape[0] == n]
    rows += [("state", k, None, v) for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() > 0
             and v.shape[0] == n]
    widths = [int(v[0].numel()) if n else int(torch.Size(v.shape[1:]).numel()) for *_, v in rows]
    flat = torch.cat([v.reshape(n, -1).float() for *_, v in rows], 1) if n else torch.zeros(0, sum(widths), device=dev)
    out = flat.new_empty(sum(recv), flat.shape[1])
    dist.all_to_all_single(out, flat.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    m = out.shape[0]
    cols = out.split(widths, 1)
    moved = {(kind, k, key): c.reshape(m, *v.shape[1:]).to(v.dtype) for (kind, k, key, v), c in zip(rows, cols)}
    for k in list(params.keys()):
        _update_param_with_optimizer(lambda name, p, k=k: torch.nn.Parameter(moved[("param", k, None)],
                                                                             requires_grad=p.requires_grad),
                                     lambda key, v, k=k: moved.get(("opt", k, key), v), params, optimizers, [k])
    for (kind, k, _key), v in moved.items():
        if kind == "state":
            state[k] = v
    return True


def shard_slice(n: int, rank: int, world: int) -> slice:
    """The rows of ``n`` that rank ``rank`` of ``world`` holds: contiguous, sizes differ by at most one."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return slice(lo, lo + base + (1 if rank < extra else 0))


def share(total: int, rank: int, world: int) -> int:
    """Rank ``rank``'s part of ``total``; the parts sum to ``total`` exactly."""
    s = shard_slice(total, rank, world)
    return s.stop - s.start


def replicated_render(render_fn, own: dict, others: dict, offset: int):
    """A render function over the whole model for a rank that holds ``own`` rows at ``offset`` of
    the gathered model (``others``: every rank's rows, own included, read-only): what Taming's
    score views need. ``fn(params, camera, extra)`` renders all rows with ``extra`` on the own rows
    (zeros elsewhere) and returns a ``RenderOutput`` cut to the own rows, so its pixel counts,
    radii and depths, and ``extra``'s gradient, are per own Gaussian. No collective: every rank
    renders on its own."""
    import dataclasses

    def fn(params, camera, extra=None):
        n = params["means"].shape[0]
        full = {k: torch.cat([others[k][:offset], params[k], others[k][offset + n:]]) for k in params}
        ex = None
        if extra is not None:
            ex = torch.cat([extra.new_zeros(offset, extra.shape[1]), extra,
                            extra.new_zeros(full["means"].shape[0] - offset - n, extra.shape[1])])
        out = render_fn(full, camera, ex)
        cut = slice(offset, offset + n)
        return dataclasses.replace(out, radii=out.radii[cut], counts=out.n_pixels[cut], depths=out.depths[cut])

    return fn


__all__ = ["COLUMNS", "Local", "rebalance", "row_counts", "gather_rows", "render_sharded", "replicated_render", "shard_slice",
           "share"]
