"""`llamactl report` and `llamactl demo`: the whole recipe on one machine, and the report of any run."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from llamactl.cli.app import app
from llamactl.ui import console


# ---- report and demo (issue 16) ----
@app.command("report")
def report_cmd(
    run_dir: Path = typer.Argument(..., help="A run directory of any stage, a folder of runs, or the demo's directory."),
    out: Optional[Path] = typer.Option(None, "--out", help="Markdown file to write (default RUN_DIR/report.md); PNG plots go to plots/ beside it."),
    with_files: Optional[list[Path]] = typer.Option(None, "--with", help="Result JSON kept elsewhere (rm eval, eval tasks, gatt eval, rlhf compare, rs.json) to include; repeatable."),
):
    """report.md with PNG plots from whatever the directory holds: loss curves, RM accuracy per rating, RS max / median, PPO reward and KL, GAtt adherence, and the table of held-out score and win rates per stage."""
    from llamactl import plots
    from llamactl.report import rich_tables, run_report

    from rich.console import Console

    r = run_report(run_dir, out, with_files or ())
    # into a log or a pipe: wide lines rather than columns cut to rich's default of 80 characters
    out_console = console if console.is_terminal else Console(highlight=False, width=max(console.width, 160))
    for t in rich_tables(r):
        out_console.print(t)
    if not r.plots_available:
        console.print(plots.MISSING, markup=False, soft_wrap=True)
    console.print(f"report: {r.path}", soft_wrap=True)


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Demo directory: one sub-directory per stage, demo.json (progress), report.md."),
    minutes: float = typer.Option(12.0, "--minutes", help="Budget in minutes on 2 idle cores (calibrated; more cores are faster): scales every stage's steps and samples (default 12)."),
    size: str = typer.Option("tiny", "--size", help="Model preset the step counts are tuned for: tiny."),
    seed: int = typer.Option(0, "--seed", help="Seed of every stage (the same seed gives the same results)."),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="End with a one-shot chat answer from the final model."),
):
    """The whole Llama 2-Chat recipe on this machine: task suite, tokenizer, pretrain, SFT, preferences, helpfulness and safety RMs, rejection sampling, PPO, GAtt, report, chat.

    Every step is a public llamactl command, printed before it runs. Run it again after Ctrl-C or a crash to continue: finished steps are kept (demo.json), an unfinished training stage resumes from its checkpoint.

    Exit status: 0 when the demo finished; 130 / 143 when Ctrl-C / SIGTERM stopped it after the running stage saved (run it again to continue); 1 when a stage failed or was killed.
    """
    from llamactl.stages.demo import run_demo
    from llamactl.stages.demo_plan import DemoConfig

    run_demo(DemoConfig(out=out, minutes=minutes, size=size, seed=seed), chat=chat)
