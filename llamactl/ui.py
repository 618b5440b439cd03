"""What users see: one rich console, progress bars with ETA, result tables. Only rank 0 prints."""
from __future__ import annotations

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
