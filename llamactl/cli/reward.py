"""`llamactl rm ...`: train, evaluate and apply helpfulness and safety reward models."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from llamactl.cli.app import StageOptions, rm_app, stage_command
from llamactl.ui import console, table


# ---- reward models (issue 14) -----------------------------------------------------------------------
@rm_app.command("train")
@stage_command("reward", "parallel")
def rm_train(
    kind: Optional[str] = typer.Option(None, "--kind", help="helpfulness (default) or safety: recorded in the checkpoint; a safety RM's eval adds the unsafe detector."),
    init: Optional[Path] = typer.Option(None, "--init", help="Chat (SFT) checkpoint or run dir to start from; its LM head is replaced by the scalar score head."),
    data: Optional[Path] = typer.Option(None, "--data", help='Preference pairs JSONL: {"prompt"|"messages", "chosen", "rejected", "rating"?, "safety"?}.'),
    mix: Optional[str] = typer.Option(None, "--mix", help="Several preference files with proportions, e.g. safety.jsonl:0.9,helpful.jsonl:0.1 (the paper's safety-RM recipe); an epoch holds as many pairs as the files together."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (metrics, config, checkpoints)."),
    val: Optional[Path] = typer.Option(None, "--val", help="Held-out pairs: val loss and accuracy rows in metrics.jsonl (at the end, and every --eval-every)."),
    margin: Optional[str] = typer.Option(None, "--margin", help="Margin set of -log sigma(r_c - r_r - m(rating)), paper Table 27: none, small (1, 2/3, 1/3, 0) or large (3, 2, 1, 0). Default small for both kinds: section 3.2.2 adds the margin to both models and finds it helps most on separable pairs, and the small set does so without hurting similar pairs (A.3.3)."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the data (paper: 1; more over-fits)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (default: --epochs over the data)."),
    batch_pairs: Optional[int] = typer.Option(None, "--batch-pairs", help="Pairs per optimizer step (paper: 512, capped by the data; rounded to micro-batch x dp)."),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="Pairs per forward/backward (2 rows each; default 8)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (paper: 1e-5, 5e-6 for 70b), cosine to 10 %."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Warmup steps (paper: 3 % of the steps, at least 5)."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N steps (0: only at the end)."),
    keep: Optional[int] = typer.Option(None, "--keep", help="Checkpoints kept in the run dir."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the pair order."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Validation on --val every N steps (0: only at the end)."),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="When stdout is not a terminal (a cluster job's log, | tee): a plain log line every N steps instead of the progress bar (default 10)."),
    save_dtype: Optional[str] = typer.Option(None, "--save-dtype", help="Stored weights: bfloat16 (default), float32 or float16."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda."),
    *,
    opts: StageOptions,
):
    """Train a reward model: score = the scalar head at the last token of prompt + response (chat format), loss -log sigma(r_chosen - r_rejected - m(rating)); accuracy in metrics.jsonl. The checkpoint is a Hugging Face LlamaForSequenceClassification.

    Exit status: 0 when the run finished; 130 / 143 when SIGINT / SIGTERM stopped it after a checkpoint (continue with --resume); 1 on an error.
    """
    from llamactl.stages import reward as stage
    from llamactl.stages.runner import run_stage

    flags = dict(kind=kind, init=str(init) if init else None, data=str(data) if data else None, mix=mix,
                 out=str(out) if out else None, val=str(val) if val else None, margin=margin, epochs=epochs,
                 steps=steps, batch_pairs=batch_pairs, micro_batch=micro_batch, lr=lr, warmup=warmup,
                 save_every=save_every, keep=keep, seed=seed, eval_every=eval_every, log_every=log_every, save_dtype=save_dtype,
                 device=device)
    run_stage(stage.resolve, stage.describe, stage.run, flags=flags, launch=opts.launch, config=opts.config,
              dry_run=opts.dry_run, resume=opts.resume)


@rm_app.command("eval")
def rm_eval(
    model: Path = typer.Option(..., "--model", help="Reward checkpoint (or its run dir)."),
    data: Path = typer.Option(..., "--data", help="Held-out preference pairs JSONL."),
    safety: Optional[bool] = typer.Option(None, "--safety/--no-safety", help="Check sigma(score) < 0.15 as an unsafe detector on safety-tagged pairs (default: for a safety RM). Unsafe = the rejected answer of a safety pair (or, with the suite's gold_* fields, a response whose ground truth is < 0.5)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the figures as JSON."),
    batch_size: int = typer.Option(16, "--batch-size", help="Responses scored together."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, or auto."),
):
    """Accuracy overall and per rating (the paper's Table 8), mean score gap; unsafe-detector precision / recall."""
    import json

    from llamactl.stages.reward_eval import run_eval, table8_rows
    from llamactl.tasks.suite import write_text_atomic

    r = run_eval(model, data, safety=safety, batch_size=batch_size, device=device)
    cols, rows = table8_rows(r)
    console.print(table(f"reward model {model} on {data}" + (f" ({r['kind']})" if r.get("kind") else ""), cols, rows))
    console.print(f"mean margin r_chosen - r_rejected: {r['mean_margin']:.3f}")
    s = r.get("safety")
    if s:
        def pct(v):
            return "-" if v is None else f"{100 * v:.1f} %"

        console.print(table(f"unsafe detector sigma(score) < {s['threshold']}", ["", "value"],
                            [["responses", s["responses"]], ["unsafe", s["unsafe"]], ["flagged", s["flagged"]],
                             ["precision", pct(s["precision"])], ["recall", pct(s["recall"])]]))
    if out:
        write_text_atomic(out, json.dumps(r, indent=2) + "\n")


@rm_app.command("score")
def rm_score(
    model: Path = typer.Option(..., "--model", help="Reward checkpoint (or its run dir)."),
    data: Path = typer.Option(..., "--data", help='Responses JSONL: {"prompt"|"messages", "response", ...}.'),
    out: Path = typer.Option(..., "--out", help='JSONL to write: each line with "score" and "sigmoid_score" added.'),
    batch_size: int = typer.Option(16, "--batch-size", help="Responses scored together."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, or auto."),
):
    """Score responses with a reward model (the last token of the chat-format prompt + response)."""
    from llamactl.stages.reward_eval import run_score

    n = run_score(model, data, out, batch_size=batch_size, device=device)
    console.print(f"scored {n} responses -> {out}")
