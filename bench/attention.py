"""Causal attention on CPU: llamactl's kernel vs torch's SDPA (its CPU flash attention), same inputs.

    python bench/attention.py [--shapes 4x8x256x64,1x8x1024x64,1x32x512x128] [--reps 15] [--rounds 3]

Shapes are BxHxTxD (kv heads = H). Inputs are laid out as the model passes them (transposed views of
(B, T, H, D) projections). Both run alternately in one process, several rounds; each line gives median
ms per call, forward and forward+backward, and the ratio SDPA / llamactl. Ends with one
`<what>: <ratio>x <peer> (...)` line (the worst shape).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from rich.table import Table

from llamactl.kernels import causal_attention
from llamactl.ui import console


def _median_ms(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def _cases(shape, reps, rounds):
    B, H, T, D = shape
    q, k, v = (torch.randn(B, T, H, D).transpose(1, 2).requires_grad_() for _ in range(3))
    dout = torch.randn(B, H, T, D)
    impls = {"llamactl": causal_attention, "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    ms = {(name, mode): [] for name in impls for mode in ("fwd", "fwd+bwd")}
    for _ in range(rounds):
        for name, fn in impls.items():
            def fwd(fn=fn):
                with torch.no_grad():
                    fn(q, k, v)

            def both(fn=fn):
                torch.autograd.grad(fn(q, k, v), (q, k, v), dout)

            ms[(name, "fwd")].append(_median_ms(fwd, reps))
            ms[(name, "fwd+bwd")].append(_median_ms(both, reps))
    return {key: statistics.median(v) for key, v in ms.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4x8x256x64,1x8x1024x64,1x32x512x128", help="comma-separated BxHxTxD")
    p.add_argument("--reps", type=int, default=15, help="timed calls per implementation and round (median)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (median of the rounds' medians)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    table = Table(title=f"causal attention, fp32, {torch.get_num_threads()} threads (ms, median)")
    for col in ("B x H x T x D", "llamactl fwd", "sdpa fwd", "ratio", "llamactl fwd+bwd", "sdpa fwd+bwd", "ratio"):
        table.add_column(col, justify="right")
    worst = None
    for s in a.shapes.split(","):
        shape = tuple(int(x) for x in s.lower().split("x"))
        m = _cases(shape, a.reps, a.rounds)
        rf = m[("sdpa", "fwd")] / m[("llamactl", "fwd")]
        rb = m[("sdpa", "fwd+bwd")] / m[("llamactl", "fwd+bwd")]
        table.add_row(s, f"{m[('llamactl', 'fwd')]:.2f}", f"{m[('sdpa', 'fwd')]:.2f}", f"{rf:.2f}x",
                      f"{m[('llamactl', 'fwd+bwd')]:.2f}", f"{m[('sdpa', 'fwd+bwd')]:.2f}", f"{rb:.2f}x")
        if worst is None or rb < worst[0]:
            worst = (rb, s, m)
    console.print(table)
    rb, s, m = worst
    console.print(f"attention fwd+bwd: {rb:.2f}x sdpa (worst shape {s}: {m[('llamactl', 'fwd+bwd')]:.2f} vs "
                  f"{m[('sdpa', 'fwd+bwd')]:.2f} ms)")


if __name__ == "__main__":
    main()
