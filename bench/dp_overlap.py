"""Data-parallel overlap: a tp 2 x dp 2 training step on gloo (4 CPU processes) with the gradient buckets
all-reduced from backward hooks (--overlap-grad-reduce, the default) against all of them after backward.

Both sides are whole `Trainer.step`s of the same model from the same seed (fp32, AdamW, clip 1.0), built
side by side in each rank and stepped alternately, one step at a time, for many rounds (which side goes
first alternates too); warm-up steps excluded. A step's time is the slowest rank's (a barrier before, a
max over ranks after). Reported: the median step time of each side, the median of the per-round ratios
(off / on: above 1 means the overlap saves time) and their spread, the noise of a shared machine, and the
exposed dp communication: the time the step still waits for the buckets after backward (GradReducer.__call__).
The step's dp traffic per rank (the ring formula, 2 (dp-1)/dp N fp32) is printed for scale.

    OMP_NUM_THREADS=1 python bench/dp_overlap.py [--rounds 10] [--dim 256] [--layers 4] [--seq-len 128]
        [--micro-batch 4] [--micro 2] [--bucket-mb 1] [--zero]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TP, WORLD = 2, 4


def _batches(args, dp_rank, step):
    """This dp rank's micro-batches of a global batch (random tokens, every target counts)."""
    from llamactl.data import Batch

    g = torch.Generator().manual_seed(1000 * step + dp_rank)
    out = []
    for _ in range(args.micro):
        w = torch.randint(0, args.vocab, (args.micro_batch, args.seq_len + 1), generator=g)
        out.append(Batch(w[:, :-1].contiguous(), w[:, 1:].contiguous(),
                         torch.ones(args.micro_batch, args.seq_len, dtype=torch.bool)))
    return out


class _Timed:
    """The trainer's GradReducer, timing its __call__: the dp communication left after backward (exposed)."""

    def __init__(self, reducer):
        self.reducer, self.seconds = reducer, 0.0

    def __getattr__(self, name):
        return getattr(self.reducer, name)

    def __call__(self):
        t0 = time.perf_counter()
        out = self.reducer()
        self.seconds = time.perf_counter() - t0
        return out


def _rank(rank, port, args, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=600))
    try:
        from llamactl.config import preset
        from llamactl.model import build_model
        from llamactl.parallel.context import ParallelContext
        from llamactl.trainer import TrainConfig, Trainer

        ctx = ParallelContext.from_world(tp=TP)
        cfg = preset("tiny", dim=args.dim, n_layers=args.layers, vocab_size=args.vocab, max_seq_len=args.seq_len)
        sides = {}
        for overlap in (True, False):
            tcfg = TrainConfig(steps=10**9, lr=1e-4, schedule="constant", bucket_mb=args.bucket_mb, zero=args.zero,
                               overlap_grad_reduce=overlap)
            sides[overlap] = Trainer(build_model(cfg, ctx, seed=0), ctx, tcfg)
            sides[overlap]._reduce = _Timed(sides[overlap]._reduce)
        tr = sides[True]
        n = sum(p.numel() for p in tr.params)
        times = {True: [], False: []}
        exposed = {True: [], False: []}
        step = 0
        for r in range(args.warmup + args.rounds):
            order = (True, False) if r % 2 == 0 else (False, True)
            for overlap in order:
                micro = _batches(args, ctx.dp_rank, step // 2)
                step += 1
                dist.barrier()
                t0 = time.perf_counter()
                sides[overlap].step(micro)
                dt = torch.tensor([time.perf_counter() - t0, sides[overlap]._reduce.seconds], dtype=torch.float64)
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)
                if r >= args.warmup:
                    times[overlap].append(float(dt[0]))
                    exposed[overlap].append(float(dt[1]))
        if rank == 0:
            queue.put({"times": times, "exposed": exposed, "params": n, "buckets": len(tr._reduce.buckets), "dp": ctx.dp})
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--micro", type=int, default=2, help="micro-batches per step and dp rank")
    ap.add_argument("--bucket-mb", type=float, default=1.0)
    ap.add_argument("--zero", action="store_true", help="ZeRO-1 on both sides (reduce-scatter + all-gather)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_rank, args=(port, args, queue), nprocs=WORLD, join=True, start_method="spawn")
    res = queue.get()
    on, off = res["times"][True], res["times"][False]
    ratios = [b / a for a, b in zip(on, off)]
    dp = res["dp"]
    wire = 2 * (dp - 1) / dp * res["params"] * 4
    print(f"tp {TP} x dp {dp} on gloo, {WORLD} processes; dim {args.dim}, {args.layers} layers, vocab {args.vocab}; "
          f"{args.micro} micro-batches of {args.micro_batch} x {args.seq_len} per dp rank; "
          f"{'ZeRO-1, ' if args.zero else ''}{res['buckets']} buckets of <= {args.bucket_mb} MB")
    print(f"parameters per rank {res['params']:,}; dp bytes sent per rank and step {wire / 2**20:.2f} MiB "
          f"(2 (dp-1)/dp N fp32)")
    print(f"{'side':<12}{'median s/step':>15}{'min':>10}{'max':>10}{'exposed dp comm (median s)':>30}")
    for name, side in (("overlap on", True), ("overlap off", False)):
        t = res["times"][side]
        print(f"{name:<12}{statistics.median(t):>15.4f}{min(t):>10.4f}{max(t):>10.4f}"
              f"{statistics.median(res['exposed'][side]):>30.4f}")
    print(f"ratio off/on: median {statistics.median(ratios):.3f} (per-round range {min(ratios):.3f} - "
          f"{max(ratios):.3f}, {len(ratios)} rounds)")


if __name__ == "__main__":
    main()
