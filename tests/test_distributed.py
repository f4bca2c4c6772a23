"""Training with the Gaussians sharded across processes (torch.distributed, gloo on the CPU).

The collective render itself: 2 ranks, each holding half of the Gaussians and rendering its share
of the batch, give the image and the gradients (of every parameter, and of each Gaussian's
projected centre per camera: what the strategies read) of one process rendering all of them."""

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_render import camera, random_params


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pose(a, x=0.0):
    c2w = np.eye(4)
    c2w[:3, :3] = [[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]]
    c2w[:3, 3] = [x, 0.1 * a, 0.0]
    return c2w


def _batch(per_rank, world):
    cams = [camera(64 + 8 * j, 48, pose=_pose(0.12 * j - 0.2, 0.3 * j)) for j in range(per_rank * world)]
    gen = torch.Generator().manual_seed(5)
    weights = [torch.rand(c.height, c.width, 3, generator=gen) for c in cams]
    bgs = [torch.rand(3, generator=gen) for _ in cams]
    return cams, weights, bgs


def _single(backend, per_rank, world):
    from budget3d.splat import render

    p = {k: v.clone().requires_grad_() for k, v in random_params(2500, seed=2, sh_rest=3).items()}
    cams, weights, bgs = _batch(per_rank, world)
    outs = [render(p, c, backend=backend, background=bg, sh_degree=1) for c, bg in zip(cams, bgs)]
    loss = sum((o.image * w).sum() for o, w in zip(outs, weights))
    loss.backward()
    return ([o.image.detach() for o in outs], {k: v.grad for k, v in p.items()},
            [o.means2d_grad().clone() for o in outs])


def _rank(rank, world, port, backend, per_rank, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from budget3d.splat.distributed import render_sharded, shard_slice

    full = random_params(2500, seed=2, sh_rest=3)
    cut = shard_slice(2500, rank, world)
    p = {k: v[cut].clone().requires_grad_() for k, v in full.items()}
    cams, weights, bgs = _batch(per_rank, world)
    mine = list(range(rank * per_rank, (rank + 1) * per_rank))
    outs, local, stats = render_sharded(p, cams, mine, backend=backend, sh_degree=1,
                                        backgrounds=[bgs[j] for j in mine])
    loss = sum((o.image * weights[j]).sum() for o, j in zip(outs, mine))
    loss.backward()
    torch.save({"images": [o.image.detach() for o in outs], "grads": {k: v.grad for k, v in p.items()},
                "m2d_grads": [loc.means2d.grad for loc in local], "cut": (cut.start, cut.stop), "stats": stats},
               f"{path}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("backend,per_rank", [("cpu", 1), ("cpu", 2), ("torch", 1)])
def test_two_rank_render_equals_one_rank(backend, per_rank, tmp_path):
    world = 2
    mp.spawn(_rank, args=(world, free_port(), backend, per_rank, str(tmp_path / "r")), nprocs=world, join=True)
    images, grads, m2d = _single(backend, per_rank, world)
    res = [torch.load(f"{tmp_path / 'r'}.{r}") for r in range(world)]
    for r, got in enumerate(res):
        for c, img in enumerate(got["images"]):
            j = r * per_rank + c
            assert (img - images[j]).abs().max() < 1e-5, (r, c)
        lo, hi = got["cut"]
        for k, g in got["grads"].items():
            ref = grads[k][lo:hi]
            assert torch.allclose(g, ref, rtol=1e-4, atol=1e-6 * ref.abs().max()), (k, (g - ref).abs().max())
        for j, g in enumerate(got["m2d_grads"]):  # the projected centres' gradient, per camera, per owned row
            assert torch.allclose(g.reshape(-1, 2), m2d[j][lo:hi], rtol=1e-4, atol=1e-7), j
        assert got["stats"]["rows_sent"] > 0
    # both halves really took part: each rank's Gaussians got gradient from the other rank's images
    assert all(r["grads"]["means"].abs().sum() > 0 for r in res)
