"""`llamactl eval ...`: a checkpoint's held-out loss (the default sub-command) and its task-suite scores."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from llamactl.cli.app import eval_app
from llamactl.errors import LlamactlError
from llamactl.ui import console, table


# ---- eval loss (issue 3) ----
@eval_app.command("loss")
def eval_cmd(
    model: Path = typer.Option(..., "--model", help="Checkpoint directory to score."),
    data: Path = typer.Option(..., "--data", help="Prepared data directory (llamactl data prepare)."),
    split: str = typer.Option("val", "--split", help="Split to score: val or train."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Window length (default: the training one)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Windows per forward pass."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Score at most this many tokens."),
):
    """Loss (nats/token) and perplexity of a checkpoint on held-out tokens."""
    from llamactl.stages.evaluate import run_eval

    for flag, value in (("--seq-len", seq_len), ("--batch-size", batch_size), ("--max-tokens", max_tokens)):
        if value is not None and value < 1:  # given values are used or refused, never replaced by a default
            raise LlamactlError(f"{flag} must be >= 1, got {value} ({flag})")
    r = run_eval(model, data, split=split, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens)
    console.print(table(f"eval of {model} on {data} ({r.split})", ["metric", "value"],
                        [["loss (nats/token)", f"{r.loss:.4f}"], ["perplexity", f"{r.perplexity:.3f}"],
                         ["tokens", f"{r.tokens:,}"], ["seq_len", r.seq_len]]))


# ---- eval tasks (issue 14) ----
@eval_app.command("tasks")
def eval_tasks_cmd(
    model: Path = typer.Option(..., "--model", help="Checkpoint to evaluate."),
    suite: Path = typer.Option(..., "--suite", help="Task suite directory (llamactl data tasks)."),
    split: str = typer.Option("heldout", "--split", help="Prompt split: heldout or train."),
    samples: int = typer.Option(4, "--samples", help="Sampled answers per prompt, scored by their mean (0: greedy only)."),
    temperature: float = typer.Option(0.7, "--temperature", help="Temperature of the sampled answers (greedy is always temperature 0)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass of the sampled answers."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", help="Most tokens per answer."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N prompts of each family."),
    raw: bool = typer.Option(False, "--raw", help='Prompt a base model as "Question: ... Answer:" (its first sentence kept) instead of the chat template.'),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampled answers."),
    batch_size: int = typer.Option(32, "--batch-size", help="Answers decoded together."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, or auto."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the result (per family, overall, per prompt) as JSON."),
):
    """Ground-truth score per task family on a suite's held-out prompts, greedy and sampled (overall: mean of families)."""
    from llamactl.stages.eval_tasks import result_rows, run_eval_tasks

    r = run_eval_tasks(model, suite, split=split, samples=samples, temperature=temperature, top_p=top_p,
                       max_new_tokens=max_new_tokens, limit=limit, raw=raw, seed=seed, batch_size=batch_size,
                       device=device, out=out)
    cols, rows = result_rows(r)
    console.print(table(f"task scores of {model} on {suite} ({split}{', raw' if raw else ''})"
                        + (f" -> {out}" if out else ""), cols, rows))
