"""`llamactl data ...`: the files training reads (token shards, the offline corpus, the task suite, preference pairs)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from llamactl.cli.app import data_app
from llamactl.ui import console, table


# ---- data prepare (issue 3) ----
@data_app.command("prepare")
def data_prepare(
    inputs: list[Path] = typer.Option(..., "--input", help="Text file (blank-line separated documents), JSONL ({\"text\": ...}) or folder; repeatable."),
    tokenizer: Path = typer.Option(..., "--tokenizer", help="tokenizer.model (or its folder) to tokenize with."),
    out: Path = typer.Option(..., "--out", help="Output directory for shards + index.json; built beside it and swapped in only on success, so existing prepared data is replaced only by a complete new set (a folder holding other files is refused)."),
    val_fraction: float = typer.Option(0.005, "--val-fraction", help="Fraction of documents held out for validation (chosen by hash)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Tokenizer processes (default: CPU count)."),
    shard_tokens: int = typer.Option(1 << 28, "--shard-tokens", help="Maximum tokens per shard file."),
):
    """Tokenize text into uint16/uint32 shards with a held-out validation split."""
    from llamactl.data import prepare

    idx = prepare(inputs, tokenizer, out, val_fraction=val_fraction, workers=workers, shard_tokens=shard_tokens)
    rows = [[s, f"{v['documents']:,}", f"{v['tokens']:,}", len(v["shards"])] for s, v in idx["splits"].items()]
    console.print(table(f"prepared {out} ({idx['dtype']}, vocab {idx['vocab_size']})",
                        ["split", "documents", "tokens", "shards"], rows))


# ---- offline corpus (demo, tests) -------------------------------------------------------------------
@data_app.command("corpus")
def data_corpus(
    out: Path = typer.Option(..., "--out", help="Text file to write."),
    max_mb: Optional[float] = typer.Option(None, "--max-mb", help="Stop after this many MB of text (default: all, ~2.5 MB)."),
):
    """Write real English text every machine has offline: the docs inside Python's standard library."""
    from llamactl.corpus import write_stdlib_corpus

    path = write_stdlib_corpus(out, max_bytes=int(max_mb * 1e6) if max_mb else None)
    console.print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


# ---- the verifiable task suite and the simulated annotator (issue 14) ----------------------------------
@data_app.command("tasks")
def data_tasks(
    out: Path = typer.Option(..., "--out", help="Directory to write the suite into (made atomically)."),
    seed: int = typer.Option(0, "--seed", help="Seed; the same seed writes byte-identical files."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing non-empty --out."),
    writer_slips: float = typer.Option(
        0.0, "--writer-slips", min=0.0, max=0.99,
        help="Share of the SFT answers a careless writer gets wrong (a number off by one, two words swapped or one "
             "left out; arithmetic, copy, reverse, sort and count only). Prompts and the scorers stay exact."),
):
    """Write the verifiable task suite: pretraining text, SFT and prompt sets (train / held-out), scorers' fields."""
    from llamactl.tasks import SuiteConfig, write_suite

    m = write_suite(out, seed=seed, config=SuiteConfig(writer_slips=writer_slips), overwrite=overwrite)
    c = m["counts"]
    slips = m["slips"]["sft.train"]
    rows = [[f, "yes" if meta["safety"] else "", c["sft.train"][f], slips[f] or "", c["prompts.train"][f],
             c["prompts.heldout"][f]] for f, meta in m["families"].items()]
    console.print(table(f"wrote {out} (seed {m['seed']}; pretrain.txt {m['pretrain']['bytes'] / 1e6:.2f} MB, "
                        f"{m['pretrain']['documents']:,} documents)",
                        ["family", "safety", "sft train", "slips", "prompts train", "held-out"], rows))


@data_app.command("preferences")
def data_preferences(
    model: Path = typer.Option(..., "--model", help="Checkpoint to sample both answers from (the current policy)."),
    prompts: Path = typer.Option(..., "--prompts", help="Task prompts (a suite's prompts.train.jsonl: gold answers and scorer fields)."),
    out: Path = typer.Option(..., "--out", help="Preference pairs JSONL to write (atomically)."),
    model_b: Optional[Path] = typer.Option(None, "--model-b", help="Checkpoint for answer B (default: --model)."),
    temperatures: str = typer.Option("0.7,1.0", "--temperatures", help="Temperatures of answers A and B, e.g. 0.7,1.0 (one value: both)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass of both answers."),
    seed: int = typer.Option(0, "--seed", help="Seed; every answer has its own generator, so batching changes nothing."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", help="Most tokens per answer."),
    batch_size: int = typer.Option(32, "--batch-size", help="Answers decoded together."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N prompts of each family."),
    pairs_per_prompt: int = typer.Option(1, "--pairs-per-prompt", help="Independent answer pairs judged per prompt (more pairs that are not ties from a policy that mostly answers alike)."),
    raw: bool = typer.Option(False, "--raw", help='Prompt a base model as "Question: ... Answer:" instead of the chat template.'),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, or auto."),
):
    """Simulated annotator: two answers per prompt, judged against the gold, written as rated preference pairs.

    Ratings from the annotator's score gap: >= 0.6 significantly_better, >= 0.2 better, >= 0.05 slightly_better,
    >= 0.01 negligibly_better; smaller gaps are ties and are dropped.
    """
    from llamactl.stages.preferences import run_preferences, summary_rows

    s = run_preferences(model, prompts, out, model_b_dir=model_b, temperatures=temperatures, top_p=top_p, seed=seed,
                        max_new_tokens=max_new_tokens, batch_size=batch_size, limit=limit, raw=raw, device=device,
                        pairs_per_prompt=pairs_per_prompt)
    cols, rows = summary_rows(s)
    per = f" x {pairs_per_prompt}" if pairs_per_prompt > 1 else ""
    console.print(table(f"wrote {out}: {s['pairs']:,} pairs from {s['prompts']:,} prompts{per} ({s['ties']:,} ties, "
                        f"{s['skipped']:,} with an empty answer, dropped; T {s['temperatures'][0]:g} vs "
                        f"{s['temperatures'][1]:g}; answer B chosen in {s['b_chosen']:,})", cols, rows))
