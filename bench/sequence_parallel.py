"""Sequence parallelism on gloo: a tp 2 pretraining step with and without Megatron-SP.

Two tp-2 replicas of the same model (same seed), one with `TrainConfig.sequence_parallel`, one without,
run `Trainer.step` on the same micro-batches alternately, one step each per round, on 2 gloo processes
(one thread each); warm-up rounds excluded. Each step starts after a barrier and is timed on rank 0; the
ratio reported is the median of the per-round ratios SP / plain (other processes share the cores, so single
timings are noisy). The losses of the two are compared every round (SP is exact: they agree to fp32
rounding). Also printed: the tensor-parallel collectives per layer and step of each path.

    python bench/sequence_parallel.py [--size tiny] [--rounds 8] [--micro-batch 4] [--seq-len 128] [--micro 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, port: int, args, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        from llamactl.config import preset
        from llamactl.data import Batch
        from llamactl.model import build_model
        from llamactl.parallel.context import ParallelContext
        from llamactl.trainer import TrainConfig, Trainer

        ctx = ParallelContext.from_world(2, 1)
        cfg = preset(args.size)
        g = torch.Generator().manual_seed(0)
        micro = [Batch.from_windows(torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq_len + 1),
                                                  generator=g).numpy()) for _ in range(args.micro)]
        trainers = {}
        for sp in (False, True):
            model = build_model(cfg, ctx, seed=0)
            trainers[sp] = Trainer(model, ctx, TrainConfig(steps=10**9, lr=1e-4, schedule="constant",
                                                           sequence_parallel=sp))
        times = {False: [], True: []}
        worst = 0.0
        for r in range(args.warmup + args.rounds):
            losses = {}
            for sp in ((False, True) if r % 2 == 0 else (True, False)):  # alternate who goes first
                dist.barrier()
                t0 = time.perf_counter()
                losses[sp] = trainers[sp].step(micro).loss
                dt = time.perf_counter() - t0
                if r >= args.warmup:
                    times[sp].append(dt)
            worst = max(worst, abs(losses[True] - losses[False]) / abs(losses[False]))
        if rank == 0:
            out.put((times, worst, cfg.n_layers))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args) -> None:
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(_free_port(), args, out), nprocs=2, join=True, start_method="spawn")
    times, worst, n_layers = out.get()
    plain, sp = times[False], times[True]
    ratios = [s / p for s, p in zip(sp, plain)]
    print(f"tp 2 on gloo, {args.size} ({n_layers} layers), {args.micro} micro-batches of {args.micro_batch} x "
          f"{args.seq_len} tokens per step, {len(plain)} rounds")
    print(f"  plain tensor parallel   {1e3 * statistics.median(plain):8.1f} ms/step (median)")
    print(f"  sequence parallel       {1e3 * statistics.median(sp):8.1f} ms/step (median)")
    print(f"  SP / plain              {statistics.median(ratios):8.3f} (median of per-round ratios; "
          f"min {min(ratios):.3f}, max {max(ratios):.3f})")
    print(f"  max relative loss difference SP vs plain: {worst:.2e}")
    print("  tp collectives per layer and micro-batch: plain 7 all-reduces (2 fwd: wo, w2; 5 bwd: the inputs of q, k, "
          "v, w1, w3), 14 units of (tp-1)/tp x activation bytes; SP 2 all-gathers + 2 reduce-scatters fwd, 4 "
          "all-gathers (2 re-gathers) + 2 reduce-scatters bwd, 10 units, + 2 all-reduces of the norm gains "
          "(dim floats)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro", type=int, default=2, help="micro-batches per step")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
