"""Training under torchrun: ``torchrun --nproc_per_node=N -m budget3d train ...`` (and
``--nnodes`` / ``--rdzv-endpoint`` across machines). One process group (gloo on the CPU, NCCL on
GPUs); each rank holds a contiguous shard of the Gaussians and renders its own views of every
step (splat/distributed.py); the strategy runs on each shard with that rank's part of the global
schedule, so the parts sum to the budget at every densification step and the shards stay equal
(their counts differ by at most one). Rank 0 writes the run folder; each rank checkpoints its own
shard (``checkpoint.pt`` for rank 0, ``checkpoint.rank<R>.pt`` for the others).

Everything a rank needs to agree with the others on is a pure function of (seed, step): the
step's views, the densification steps. What may differ between ranks (a Ctrl-C on one of them)
is agreed on by one all_reduce per step.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from budget3d.errors import UserError

TIMEOUT_S = 60  # a collective that waits longer means a rank is gone


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_env() -> Optional[Dist]:
    """The torchrun rank this process is, or None outside torchrun (or with one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    return Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def start(d: Dist, device: torch.device) -> torch.device:
    """Join the process group; returns this rank's device (``cuda:LOCAL_RANK`` on GPUs)."""
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if d.local_rank >= n:
            raise UserError(f"rank {d.rank}: LOCAL_RANK {d.local_rank} but this machine has {n} GPU(s); start at most "
                            f"{n} processes per machine (--nproc_per_node {n}), or train on the CPU with --device cpu")
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    else:  # the machine's cores, shared between its ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", d.world))))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=TIMEOUT_S))
    signal.signal(signal.SIGTERM, _on_sigterm)
    return device


def _on_sigterm(signum, frame):
    # torchrun stops the survivors this way when a rank dies: one line, and the checkpoints on
    # disk stay as the last completed save left them (writes are atomic)
    rank = os.environ.get("RANK", "?")
    print(f"budget3d train: rank {rank} stopped by torchrun (another rank failed or was stopped); the last "
          "checkpoint is intact: resume with the same torchrun command and --resume", file=sys.stderr, flush=True)
    os._exit(1)


def checkpoint_name(d: Optional[Dist]) -> str:
    return "checkpoint.pt" if d is None or d.rank == 0 else f"checkpoint.rank{d.rank}.pt"


def scene_fingerprint(scene) -> str:
    """What must be the same scene on every rank: the views' names and sizes."""
    h = hashlib.sha1()
    for split in (scene.train, scene.test):
        for v in split:
            h.update(f"{v.name}:{v.camera.width}x{v.camera.height};".encode())
        h.update(b"|")
    return h.hexdigest()[:12]


def check_same_scene(d: Dist, scene, path: str) -> None:
    import socket

    mine = (scene_fingerprint(scene), len(scene.train), socket.gethostname(), path)
    table = [None] * d.world
    dist.all_gather_object(table, mine)
    odd = [r for r, t in enumerate(table) if t[0] != table[0][0]]
    if odd:
        r = odd[0]
        raise UserError(f"rank {r} on {table[r][2]} loaded a different scene from {table[r][3]} ({table[r][1]} training "
                        f"views) than rank 0 on {table[0][2]} from {table[0][3]} ({table[0][1]}); give every machine "
                        "the same scene folder")


def agree(flag: bool, device) -> bool:
    """True on every rank when it is True on any."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_all(values) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, values)
    return out


def lost_peer(d: Dist, e: BaseException, run_dir: Path) -> UserError:
    import re

    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    first = re.sub(r"\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", first)[:160]  # gloo's source locations
    return UserError(f"rank {d.rank}: lost contact with another rank ({first}); the checkpoints in {run_dir} are "
                     "as the last save left them: resume with the same torchrun command and --resume")


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["Dist", "agree", "check_same_scene", "checkpoint_name", "finish", "from_env", "gather_all", "lost_peer",
           "start"]
