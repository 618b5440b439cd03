"""Spawn gloo worker processes on 127.0.0.1 for multi-process tests.

Process start-up (importing torch) costs seconds, so each spawn should run many checks: a test calls
`spawn(fn, world, *args)` once and `fn(rank, world, *args)` does all its checks. A failure in any
worker fails the test with that worker's traceback. Workers use the reference kernels (the parallel
layers are what is under test; both sides of every comparison use the same kernels).
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn, world: int, port: int, args: tuple) -> None:
    os.environ.setdefault("LLAMACTL_KERNELS", "reference")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args) -> None:
    """Run fn(rank, world, *args) on `world` gloo processes; raise if any of them fails."""
    mp.start_processes(_worker, args=(fn, world, free_port(), args), nprocs=world, join=True, start_method="spawn")


def gather_full(local: torch.Tensor, spec, group, world: int) -> torch.Tensor:
    """All-gather a tensor-parallel shard (TPShard spec; None = replicated) back into the full tensor."""
    if spec is None or group is None:
        return local.detach().clone()
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    if spec.length * world == spec.full:
        return torch.cat(parts, dim=spec.dim)
    # replicated slices (GQA kv heads on several ranks): keep one copy of each distinct slice
    out_parts, starts = [], []
    specs = [None] * world
    dist.all_gather_object(specs, (spec.start, spec.length), group=group)
    for (start, _), p in sorted(zip(specs, parts), key=lambda z: z[0][0]):
        if start not in starts:
            starts.append(start)
            out_parts.append(p)
    return torch.cat(out_parts, dim=spec.dim)
