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
    outs, local, stats = render_sharded(p, cams, backend=backend, sh_degree=1, backgrounds=[bgs[j] for j in mine])
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


# ----------------------------------------------------------------------------- torchrun end to end

import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

BUDGET, ITERS = 3000, 300


def toy() -> str:
    from budget3d.demo import bundled_scene

    return str(bundled_scene())


def torchrun(out, *extra, nproc=2, wait=True, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port",
           str(free_port()), "-m", "budget3d", "train", "--out", str(out), "--quiet", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "run"
    r = torchrun(out, "--data", toy(), "--budget", str(BUDGET), "--iters", str(ITERS), "--checkpoint-every", "100")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_torchrun_two_ranks_land_on_the_budget_and_match_one_process(two_rank_run, tmp_path):
    """2 ranks (gloo) on the bundled scene: exactly the budget, equal shards, and the test PSNR of
    one process rendering the same 2 views per step with the same seed, within 0.5 dB."""
    from budget3d.splat import load_ply
    from budget3d.train import TrainConfig, train

    m = json.loads((two_rank_run / "metrics.json").read_text())
    conf = json.loads((two_rank_run / "config.json").read_text())
    assert conf["world_size"] == 2 and m["world_size"] == 2 and m["views_per_step"] == 2
    assert m["num_gaussians"] == BUDGET and len(load_ply(two_rank_run / "gaussians.ply")["means"]) == BUDGET
    assert sum(m["shard_counts"]) == BUDGET and max(m["shard_counts"]) <= 1.2 * BUDGET / 2
    assert all(r["bytes_sent_per_step"] > 0 for r in m["per_rank"])
    one = train(TrainConfig(data=toy(), out=str(tmp_path / "one"), budget=str(BUDGET), iters=ITERS, batch=2,
                            checkpoint_every=0, save_renders=False), progress=False)
    print(f"\n2 ranks {m['psnr']:.2f} dB, 1 process (batch 2) {one['psnr']:.2f} dB")
    assert abs(m["psnr"] - one["psnr"]) < 0.5


def _ranks(proc) -> dict:
    """{rank: pid} of a torchrun's workers."""
    out = {}
    for child in Path("/proc").iterdir():
        if not child.name.isdigit():
            continue
        try:
            env = (child / "environ").read_bytes().split(b"\0")
            stat = (child / "stat").read_text().split()
        except OSError:
            continue
        if int(stat[3]) == proc.pid:
            for kv in env:
                if kv.startswith(b"RANK="):
                    out[int(kv[5:])] = int(child.name)
    return out


def _wait_for(path: Path, proc, timeout=240):
    t0 = time.time()
    while not path.is_file():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.5)


def test_killed_rank_stops_the_others_and_resume_finishes_exactly(tmp_path):
    """kill -9 of rank 1: the other exits within 60 s with one line from budget3d, the last
    checkpoints load, and --resume with 2 ranks finishes with exactly the budget."""
    from budget3d.train.checkpoint import load_checkpoint

    out = tmp_path / "run"
    p = torchrun(out, "--data", toy(), "--budget", str(BUDGET), "--iters", str(ITERS), "--checkpoint-every", "50",
                 wait=False)
    _wait_for(out / "checkpoint.rank1.pt", p)
    ranks = _ranks(p)
    assert set(ranks) == {0, 1}, ranks
    os.kill(ranks[1], signal.SIGKILL)
    t0 = time.time()
    _, err = p.communicate(timeout=120)
    assert time.time() - t0 < 60 and p.returncode != 0
    ours = [line for line in err.splitlines() if line.startswith("budget3d:") or line.startswith("budget3d train:")]
    assert ours and all("rank 0" in line and "resume" in line for line in ours), err[-2000:]
    steps = {load_checkpoint(out / n)["step"] for n in ("checkpoint.pt", "checkpoint.rank1.pt")}
    assert len(steps) == 1 and steps.pop() >= 50  # both shards from the same completed save
    r = torchrun(out, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["num_gaussians"] == BUDGET


def test_resume_needs_the_same_process_count(two_rank_run, capsys):
    from test_cli import run_cli

    code, _, err = run_cli(capsys, "train", "--out", two_rank_run, "--resume")
    assert code != 0 and "2 process" in err and "torchrun --nproc_per_node 2" in err and err.count("\n") <= 1


def test_ctrl_c_on_one_rank_stops_both_at_the_same_step(tmp_path):
    out = tmp_path / "run"
    p = torchrun(out, "--data", toy(), "--budget", str(BUDGET), "--iters", "3000", "--checkpoint-every", "100",
                 wait=False)
    _wait_for(out / "checkpoint.rank1.pt", p)
    os.kill(_ranks(p)[1], signal.SIGINT)
    _, err = p.communicate(timeout=120)
    from budget3d.train.checkpoint import load_checkpoint

    a, b = (load_checkpoint(out / n) for n in ("checkpoint.pt", "checkpoint.rank1.pt"))
    assert a["step"] == b["step"] < 3000, err[-2000:]
    assert f"interrupted at step {a['step']}/3000" in err and "torchrun --nproc_per_node 2" in err


def _scene_rank(rank, world, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from budget3d.errors import UserError
    from budget3d.train.distributed import Dist, check_same_scene
    from test_train import tiny_scene

    scene = tiny_scene(n_train=2 + rank, n_test=1, points=20)  # rank 1 was given another scene
    try:
        check_same_scene(Dist(rank, world, rank), scene, f"/scenes/{rank}")
        msg = "no error"
    except UserError as e:
        msg = str(e)
    Path(f"{path}.{rank}").write_text(msg)
    dist.destroy_process_group()


def test_a_rank_with_another_scene_is_one_line_on_every_rank(tmp_path):
    mp.spawn(_scene_rank, args=(2, free_port(), str(tmp_path / "m")), nprocs=2, join=True)
    for r in range(2):
        msg = (tmp_path / f"m.{r}").read_text()
        assert "rank 1" in msg and "/scenes/1" in msg and "/scenes/0" in msg and "\n" not in msg, msg


def test_torchrun_on_gpus_that_are_not_there_is_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = torchrun(tmp_path / "run", "--data", toy(), "--budget", "100", "--device", "cuda")
    ours = [line for line in r.stderr.splitlines() if line.startswith("budget3d:")]
    assert r.returncode != 0 and ours and all("no CUDA GPU" in line for line in ours), r.stderr[-2000:]


@pytest.mark.cuda
def test_torchrun_two_gpus_nccl(tmp_path):
    """The NCCL + gsplat path: 2 ranks on 2 GPUs land on exactly the budget (skipped without 2 GPUs)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 NVIDIA GPUs")
    out = tmp_path / "run"
    r = torchrun(out, "--data", toy(), "--budget", str(BUDGET), "--iters", "400", "--device", "cuda")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_gaussians"] == BUDGET and m["world_size"] == 2 and m["backend"] == "cuda" and m["psnr"] > 18


def _rebalance_rank(rank, world, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from budget3d.splat.distributed import rebalance
    from budget3d.train.optim import VisibleAdam

    full = random_params(1300, seed=4, sh_rest=3)
    cut = slice(0, 1000) if rank == 0 else slice(1000, 1300)  # a rank that grew far more than the other
    params = {k: torch.nn.Parameter(v[cut].clone()) for k, v in full.items()}
    opts = {k: VisibleAdam([p], lr=1e-2, eps=1e-15) for k, p in params.items()}
    for k, p in params.items():  # one step, so every row has moments to carry
        p.grad = torch.ones_like(p) * (torch.arange(p.shape[0], dtype=p.dtype) + cut.start).reshape(-1, *[1] * (p.dim() - 1))
        opts[k].step(torch.ones(p.shape[0], dtype=torch.bool))
    state = {"grad2d": torch.arange(cut.start, cut.stop, dtype=torch.float32), "step": torch.tensor(7)}
    moved = rebalance(params, opts, state)
    torch.save({"moved": moved, "params": {k: v.detach() for k, v in params.items()},
                "exp_avg": {k: opts[k].state[params[k]]["exp_avg"] for k in params}, "state": state,
                "opt_param_is_param": all(opts[k].param_groups[0]["params"][0] is params[k] for k in params)},
               f"{path}.{rank}")
    dist.destroy_process_group()


def test_rebalance_evens_the_shards_and_carries_their_state(tmp_path):
    mp.spawn(_rebalance_rank, args=(2, free_port(), str(tmp_path / "b")), nprocs=2, join=True)
    a, b = (torch.load(f"{tmp_path / 'b'}.{r}") for r in range(2))
    assert a["moved"] and b["moved"]
    assert len(a["params"]["means"]) == 650 and len(b["params"]["means"]) == 650
    full = random_params(1300, seed=4, sh_rest=3)
    for k in full:  # the model, in rank order, is what it was (one Adam step of lr 0.01 from it)
        assert torch.allclose(torch.cat([a["params"][k], b["params"][k]]), full[k], atol=0.0101), k
    # the optimizer moments and the strategy's per-row state went with their rows
    rowid = torch.cat([a["state"]["grad2d"], b["state"]["grad2d"]])
    assert torch.equal(rowid, torch.arange(1300, dtype=torch.float32)) and int(a["state"]["step"]) == 7
    m = torch.cat([a["exp_avg"]["opacities"], b["exp_avg"]["opacities"]])
    assert torch.allclose(m, 0.1 * torch.arange(1300, dtype=torch.float32), rtol=1e-5)  # (1 - beta1) x grad
    assert a["opt_param_is_param"] and b["opt_param_is_param"]


def test_torchrun_default_strategy_keeps_the_shards_even(tmp_path):
    """Default densification grows each shard by its own gradients; the trainer evens them out at
    densification steps, so no rank ends above 1.2x the mean."""
    out = tmp_path / "run"
    r = torchrun(out, "--data", toy(), "--strategy", "default", "--iters", "200", "--checkpoint-every", "0",
                 "--eval-max-views", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    counts = json.loads((out / "metrics.json").read_text())["shard_counts"]
    assert max(counts) <= 1.2 * sum(counts) / 2, counts
