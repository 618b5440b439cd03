"""What users see: one rich console, progress bars with ETA, result tables, and the training loop's progress
(a bar on a terminal, plain log lines in a cluster job's log or behind `| tee`). Only rank 0 prints."""
from __future__ import annotations

import time
from datetime import timedelta

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def progress(*extra_columns, transient: bool = False, disable: bool = False) -> Progress:
    """A progress bar with count, percentage, elapsed time and ETA, plus any extra text columns."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TaskProgressColumn(), *extra_columns, TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=err_console, transient=transient, disable=disable)


def table(title: str, columns: list[str], rows: list[list], *, justify_numbers: bool = True) -> Table:
    """A rich table; numbers right-aligned."""
    t = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        numeric = justify_numbers and rows and all(isinstance(r[i], (int, float)) or _looks_numeric(r[i]) for r in rows)
        t.add_column(c, justify="right" if numeric else "left")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    return t


def _looks_numeric(s) -> bool:
    s = str(s).replace(",", "").replace("%", "").replace(" ", "").rstrip("xGMKTiBs/")
    try:
        float(s)
        return True
    except ValueError:
        return False


# ---- the training loop's progress --------------------------------------------------------------------
def _hms(seconds: float) -> str:
    return str(timedelta(seconds=round(max(0.0, seconds))))


class TrainProgress:
    """Progress of a training loop on the main rank. On a terminal: the rich bar with the step's stats. When
    stdout is not a terminal (a cluster job's log, `| tee`), where a bar prints nothing useful: one plain line
    on stdout every `every` steps and after the first and the last step of the run:

        pretrain step 20/100 | loss 7.2434 | lr 6.95e-04 | grad norm 4.805 | 1,316 tokens/s | MFU 41.2% | elapsed 0:00:31 | ETA 0:02:04

    An MFU above 100 % means the peak it divides by is wrong (measured too low on a busy machine): it is shown
    as '-' and why is said once. `peak` (FLOP/s per device) and `measured` only serve that note.
    """

    def __init__(self, stage: str, total: int, done: int = 0, *, every: int = 1, enabled: bool = True,
                 plain: bool | None = None, peak: float | None = None, measured: bool = True):
        from rich.progress import TextColumn

        self.stage, self.total, self.every, self.enabled = stage, total, max(1, int(every)), enabled
        self.plain = (not console.is_terminal) if plain is None else plain
        self.peak, self.measured, self._noted = peak, measured, False
        self._start, self._first = time.perf_counter(), done
        self._bar = progress(TextColumn("{task.fields[stats]}"), disable=not enabled or self.plain)

    def __enter__(self) -> "TrainProgress":
        self._bar.__enter__()
        self._task = self._bar.add_task(self.stage, total=self.total, completed=self._first, stats="")
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def mfu_text(self, mfu: float | None) -> str:
        """'41.2%', or '-' (unknown, or above 100 %: the note says why, once)."""
        if mfu is None:
            return "-"
        if mfu > 1.0:
            self._note(mfu)
            return "-"
        return f"{100 * mfu:.1f}%"

    def _note(self, mfu: float) -> None:
        if self._noted or not self.enabled:
            return
        self._noted = True
        peak = f"{self.peak / 1e12:,.3g} TFLOP/s per device" if self.peak else "unknown"
        why = ("it was measured too low (a busy machine at the start of the run); give the device's peak with "
               "--peak-tflops" if self.measured else "the peak given with --peak-tflops / --peak-flops is too low")
        line = f"MFU shown as '-': a step came out at {100 * mfu:,.0f}% of the peak ({peak}): {why}"
        (console if self.plain else self._bar.console).print(line, markup=False, highlight=False, soft_wrap=True)

    def step(self, step: int, *, loss: float, lr: float, grad_norm: float, tokens_per_s: float,
             mfu: float | None) -> None:
        """After optimizer step `step` (1-based, counting resumed steps): update the bar or print the line."""
        if not self.enabled:
            return
        mfu_s = self.mfu_text(mfu)
        if not self.plain:
            stats = f"loss {loss:.4f} lr {lr:.2e} gnorm {grad_norm:.3f} {tokens_per_s:,.0f} tok/s"
            if mfu is not None:
                stats += f" MFU {mfu_s}"
            self._bar.update(self._task, completed=step, stats=stats)
            return
        if step % self.every and step != self.total and step != self._first + 1:
            return
        elapsed = time.perf_counter() - self._start
        eta = elapsed / max(1, step - self._first) * (self.total - step)
        console.print(f"{self.stage} step {step}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | grad norm "
                      f"{grad_norm:.3f} | {tokens_per_s:,.0f} tokens/s | MFU {mfu_s} | elapsed {_hms(elapsed)} | "
                      f"ETA {_hms(eta)}", markup=False, highlight=False, soft_wrap=True)
