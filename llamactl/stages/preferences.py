"""`llamactl data preferences`: the paper's iterative preference collection (Figure 4), simulated.

Two answers per prompt from the current model (answer A at temperature t_a; answer B at t_b, from
`--model-b` when given -- the paper varies temperature and model between the two), judged by the
simulated annotator (`tasks.annotator`: ground truth plus a graded closeness), written as preference
pairs with the paper's four ratings. So reward-model data always comes from the current policy's
distribution. `--pairs-per-prompt N` judges N independent pairs of every prompt (each answer its own
generator), as annotators rate several pairs of one prompt: a policy that mostly answers alike gives few
pairs that are not ties, and the reward model needs those to rank the policy's own answers. Ties are
dropped and counted, and so are pairs with an empty answer (or one holding the chat format's tags), which
the preference reader would refuse.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from llamactl.errors import LlamactlError


def parse_temperatures(text: str) -> tuple[float, float]:
    """'0.7,1.0' -> (0.7, 1.0); one value serves both answers (different seeds still differ)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise LlamactlError(f"bad temperatures {text!r}: give one or two numbers, e.g. 0.7,1.0 (--temperatures)") from None
    if len(vals) not in (1, 2):
        raise LlamactlError(f"bad temperatures {text!r}: give one or two numbers, e.g. 0.7,1.0 (--temperatures)")
    if any(v < 0 for v in vals):
        raise LlamactlError(f"temperatures must be >= 0, got {text!r} (--temperatures)")
    return (vals[0], vals[-1])


def collect(model_a, tok_a, items: Sequence[dict], *, model_b=None, tok_b=None, temperatures=(0.7, 1.0),
            top_p: float = 1.0, seed: int = 0, max_new_tokens: int = 48, batch_size: int = 32, raw: bool = False,
            bar=None, seed_offset: int = 0, label: str = "") -> tuple[list[str], list[str]]:
    """Answer A and answer B for every item (B from model_b when given; its own seeds either way): answer A
    of item i draws from seed row seed_offset + i, answer B from seed_offset + len(items) + i."""
    from llamactl.stages.answers import answer_items

    def one(model, tok, t, offset, side):
        task = bar.add_task(f"answers {side}{label} @ T {t:g}", total=len(items)) if bar is not None else None
        got = answer_items(model, tok, items, samples=1, temperature=t, top_p=top_p, seed=seed, seed_offset=offset,
                           max_new_tokens=max_new_tokens, batch_size=batch_size, raw=raw,
                           progress=(lambda k: bar.advance(task, k)) if bar is not None else None)
        return [a[0] for a in got]

    a = one(model_a, tok_a, temperatures[0], seed_offset, "A")
    b = one(model_b if model_b is not None else model_a, tok_b if tok_b is not None else tok_a,
            temperatures[1], seed_offset + len(items), "B")
    return a, b


def run_preferences(model_dir, prompts, out, *, model_b_dir=None, temperatures: str = "0.7,1.0",
                    top_p: float = 1.0, seed: int = 0, max_new_tokens: int = 48, batch_size: int = 32,
                    limit: int | None = None, raw: bool = False, device: str = "auto",
                    pairs_per_prompt: int = 1) -> dict:
    """Sample, judge, write `out` (JSONL, atomically); returns the summary (tasks.annotator.summarize).
    With `pairs_per_prompt` N the prompts are judged N times over, round j drawing from seed rows j * 2P
    onwards (P prompts), so N = 1 is the single-pair collection and a larger N only adds pairs."""
    from llamactl.generation import load_for_generation
    from llamactl.stages.eval_tasks import limit_per_family
    from llamactl.tasks import load_items
    from llamactl.tasks.annotator import make_pairs, summarize
    from llamactl.tasks.suite import write_text_atomic
    from llamactl.ui import progress

    temps = parse_temperatures(temperatures)
    if batch_size < 1:
        raise LlamactlError(f"--batch-size must be at least 1, got {batch_size}")
    if pairs_per_prompt < 1:
        raise LlamactlError(f"--pairs-per-prompt must be at least 1, got {pairs_per_prompt}")
    if Path(out).is_dir():
        raise LlamactlError(f"{out} is a directory (--out names a file)")
    items = limit_per_family(load_items(prompts), limit)
    model_a, tok_a = load_for_generation(model_dir, device)
    model_b = tok_b = None
    if model_b_dir is not None:
        if not Path(model_b_dir).is_dir():
            raise LlamactlError(f"checkpoint directory not found: {model_b_dir} (--model-b)")
        model_b, tok_b = load_for_generation(model_b_dir, device)
    a, b = [], []
    with progress() as bar:
        for j in range(pairs_per_prompt):
            got = collect(model_a, tok_a, items, model_b=model_b, tok_b=tok_b, temperatures=temps, top_p=top_p,
                          seed=seed, max_new_tokens=max_new_tokens, batch_size=batch_size, raw=raw, bar=bar,
                          seed_offset=2 * len(items) * j, label=f" {j + 1}" if pairs_per_prompt > 1 else "")
            a += got[0]
            b += got[1]
    rounds = items * pairs_per_prompt
    pairs, ties, skipped = make_pairs(rounds, a, b)
    write_text_atomic(out, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    summary = summarize(rounds, pairs, ties, skipped)
    summary.update(out=str(out), prompts=len(items), pairs_per_prompt=pairs_per_prompt,
                   temperatures=list(temps))
    return summary


def summary_rows(summary: dict) -> tuple[list[str], list[list]]:
    """Columns and rows of the command's table: per family, pairs per rating, ties, mean gap; then a total."""
    from llamactl.tasks.annotator import RATINGS

    short = {"significantly_better": "signif.", "better": "better", "slightly_better": "slightly",
             "negligibly_better": "neglig."}
    cols = ["family", "pairs", *[short[r] for r in RATINGS], "ties", "skipped", "mean gap"]
    rows = [[f, r["pairs"], *[r[k] for k in RATINGS], r["ties"], r["skipped"], f"{r['mean_gap']:.3f}"]
            for f, r in summary["families"].items()]
    rows.append(["total", summary["pairs"], *[summary["ratings"][k] for k in RATINGS], summary["ties"],
                 summary["skipped"], f"{summary['mean_gap']:.3f}"])
    return cols, rows
