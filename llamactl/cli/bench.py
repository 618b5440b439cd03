"""`llamactl bench ...`: benchmarks of llamactl's building blocks."""
from __future__ import annotations

from typing import Optional

import typer

from llamactl.cli.app import bench_app
from llamactl.errors import LlamactlError
from llamactl.ui import console


# ---- bench (issue 5) -----------------------------------------------------------------------------------
@bench_app.command("kernels")
def bench_kernels(
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda if available, else cpu)."),
    dtypes: str = typer.Option("float32,bfloat16", "--dtypes", help="Comma-separated dtypes: float32, bfloat16."),
    mb: int = typer.Option(64, "--mb", min=1, help="Size of each case's main input tensor in MiB."),
    reps: int = typer.Option(7, "--reps", min=1, help="Timed repetitions per implementation (median)."),
    no_malloc_tune: bool = typer.Option(False, "--no-malloc-tune",
                                        help="Keep glibc's default malloc (large outputs faulted in page by page)."),
):
    """Fused RMSNorm/RoPE/SwiGLU vs eager and torch.compile (GB/s against the measured copy bandwidth)."""
    from llamactl.kernels.bench import DTYPES, report
    from llamactl.ui import progress

    names = tuple(d.strip() for d in dtypes.split(",") if d.strip())
    bad = [d for d in names if d not in DTYPES]
    if bad or not names:
        raise LlamactlError(f"unknown dtype {', '.join(bad) or dtypes!r} (--dtypes: {', '.join(DTYPES)})")
    if device not in (None, "cpu", "cuda"):
        raise LlamactlError(f"unknown device {device!r} (--device: cpu or cuda)")
    try:
        report(console, device=device, dtypes=names, target_mb=mb, reps=reps, progress_factory=progress,
               malloc_tune=not no_malloc_tune)
    except RuntimeError as e:
        if "no fused backend" in str(e):
            raise LlamactlError(f"{e} (llamactl bench kernels)") from None
        raise
