"""Model FLOPs per token and the measured peak of the device: the two halves of MFU (the trainer's
progress bar and metrics, the planner's time estimate, the benchmarks)."""
from __future__ import annotations

import time

import torch


def model_flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (parameters in matmuls) + causal attention (6 x layers x dim x T)."""
    n = cfg.num_params() - cfg.vocab_size * cfg.dim  # the embedding is a lookup, not a matmul
    return 6.0 * n + 6.0 * cfg.n_layers * cfg.dim * seq_len


def measure_peak_flops(device: str | torch.device = "cpu", dtype=None, seconds: float = 0.5) -> float:
    """Best-of FLOP/s of a large square matmul (fp32 on CPU, bf16 on GPU): the MFU denominator."""
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    n = 8192 if device.type == "cuda" else 1536
    g = torch.Generator(device=device).manual_seed(0)  # its own stream: a run's RNG stays untouched
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    c = torch.empty(n, n, device=device, dtype=dtype)
    best, start = float("inf"), time.perf_counter()
    torch.mm(a, b, out=c)
    while True:
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > seconds:
            break
    return 2.0 * n**3 / best
