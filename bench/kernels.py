"""Fused RMSNorm / RoPE vs eager and torch.compile'd reference (and apex / Liger-Kernel if importable).

    python bench/kernels.py [--device cpu|cuda] [--dtypes float32,bfloat16] [--mb 64] [--reps 7] [--no-malloc-tune]

Same as `llamactl bench kernels`. Prints one table (ms, GB/s, share of the measured copy bandwidth,
speed-up vs eager and vs torch.compile) and ends with `<what>: <ratio>x <peer> (<details>)` lines.
"""
from __future__ import annotations

import argparse

from llamactl.kernels.bench import report
from llamactl.ui import console, progress


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    p.add_argument("--mb", type=int, default=64, help="size of the main input tensor per case, MiB")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions per implementation (median)")
    p.add_argument("--no-malloc-tune", action="store_true", help="keep glibc's default malloc (every large output is faulted in page by page, for every implementation)")
    a = p.parse_args()
    report(console, device=a.device, dtypes=tuple(a.dtypes.split(",")), target_mb=a.mb, reps=a.reps,
           progress_factory=progress, malloc_tune=not a.no_malloc_tune)


if __name__ == "__main__":
    main()
