"""PNG line and bar charts for reports (rejection-sampling curves, PPO reward / KL, GAtt adherence, losses).

matplotlib is an optional extra (`pip install llamactl[plots]`): every function returns False and writes
nothing when it is missing, so callers keep their tables and say how to get the plots (`MISSING`).
Files are written under a temporary name and renamed, so a half-drawn PNG never looks finished.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Mapping, Sequence

MISSING = "plots need matplotlib: pip install 'llamactl[plots]'"


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; set before pyplot is imported
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


@contextmanager
def _figure(path: Path, width: float, *, legend: bool, grid_axis: str = "both"):
    """A figure's axes; on leaving: grid, a legend when several series share it, saved to `path`, closed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(width, 3.6))
    try:
        yield ax
        ax.grid(axis=grid_axis, alpha=0.3)
        if legend:
            ax.legend(fontsize=8)
        _save(fig, path)
    finally:
        plt.close(fig)


def line_plot(path: Path, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, title: str,
              xlabel: str, ylabel: str, logy: bool = False) -> bool:
    """One line per series name (x values, y values). False (nothing written) without matplotlib."""
    if not available():
        return False
    with _figure(path, 6, legend=len(series) > 1) as ax:
        for name, (xs, ys) in series.items():
            ax.plot(list(xs), list(ys), marker="o" if len(xs) <= 30 else None, markersize=3, label=name)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        if logy:
            ax.set_yscale("log")
    return True


def bar_plot(path: Path, groups: Sequence[str], bars: Mapping[str, Sequence[float]], *, title: str,
             ylabel: str) -> bool:
    """Grouped bars: one group per label in `groups`, one bar per series in `bars` (values in group order)."""
    if not available():
        return False
    with _figure(path, max(6, 0.9 * len(groups)), legend=len(bars) > 1, grid_axis="y") as ax:
        width = 0.8 / max(1, len(bars))
        for i, (name, values) in enumerate(bars.items()):
            ax.bar([g + i * width for g in range(len(groups))], list(values), width=width, label=name)
        # ticks at each group's centre; slanted labels anchored at their right end so long ones do not collide
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], list(groups), rotation=20, ha="right")
        ax.set(title=title, ylabel=ylabel)
    return True
