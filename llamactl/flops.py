"""Model FLOPs per token and the measured peak of the device: the two halves of MFU (the trainer's
progress bar and log lines, metrics, the planner's time estimate, the benchmarks)."""
from __future__ import annotations

import time

import torch

# a measured peak is the best of at least this many timed matmuls spread over at least this many seconds:
# one lucky or unlucky repetition (a neighbour's burst on a shared machine, a GPU clock ramping up) decides
# nothing, and a best-of only gets closer to the true peak the longer it runs
PEAK_MIN_REPS = 10
PEAK_MIN_SECONDS = 1.0


def model_flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (parameters in matmuls) + causal attention (6 x layers x dim x T)."""
    n = cfg.num_params() - cfg.vocab_size * cfg.dim  # the embedding is a lookup, not a matmul
    return 6.0 * n + 6.0 * cfg.n_layers * cfg.dim * seq_len


def measure_peak_flops(device: str | torch.device = "cpu", dtype=None, seconds: float = PEAK_MIN_SECONDS,
                       min_reps: int = PEAK_MIN_REPS) -> float:
    """Best-of FLOP/s of a large square matmul (fp32 on CPU, bf16 on GPU): the MFU denominator.

    One untimed warm-up, then timed repetitions until both `seconds` have passed and `min_reps` were done.
    """
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    n = 8192 if device.type == "cuda" else 1536
    g = torch.Generator(device=device).manual_seed(0)  # its own stream: a run's RNG stays untouched
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    c = torch.empty(n, n, device=device, dtype=dtype)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    torch.mm(a, b, out=c)
    sync()
    best, reps, start = float("inf"), 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        sync()
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return 2.0 * n**3 / best


def run_peak_flops(device: str | torch.device, ctx=None) -> float:
    """The peak a training run divides by, measured at a quiet moment: every rank waits for the others first
    (no rank is still loading data or weights while another measures), all measure at once (ranks sharing a
    CPU then each see their share of it, as they do while training), and all take the highest figure, so
    every rank reports the same MFU."""
    import torch.distributed as dist

    distributed = ctx is not None and getattr(ctx, "world_size", 1) > 1 and dist.is_available() and dist.is_initialized()
    if distributed:
        dist.barrier()
    peak = measure_peak_flops(device)
    if distributed:
        t = torch.tensor([peak], dtype=torch.float64, device=torch.device(device))
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        peak = float(t.item())
    return peak


def mfu(tokens_per_s: float, flops_per_token: float | None, peak: float | None, devices: int) -> float | None:
    """Model FLOPs utilisation, or None when unknown: no FLOPs or peak, or above 1 -- the peak was measured
    too low (a busy machine) and the figure would be fiction."""
    if not flops_per_token or not peak:
        return None
    u = tokens_per_s * flops_per_token / (peak * devices)
    return u if u <= 1.0 else None
