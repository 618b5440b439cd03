"""`llamactl eval tasks`: ground-truth score per task family on a suite's held-out prompts.

The number every later stage (SFT, rejection sampling, PPO) is judged by. Two readings per family:
greedy (one answer at temperature 0) and sampled (N answers at temperature T, their mean score).
"overall" is the mean of the family means, so every family weighs the same whatever its prompt count.

The JSON written with `--out` (what `llamactl report` reads):
    {"families": {name: {"prompts", "safety", "greedy", "sampled"}}, "overall": {"prompts", "greedy",
     "sampled"}, "samples", "temperature", "items": [{"family", "prompt", "gold", "greedy", "greedy_score",
     "sampled_score"?}], "model", "suite", "split", "raw", "top_p", "max_new_tokens", "seed", "limit"}
("sampled" is null with --samples 0.)

`evaluate(items, answer)` does the scoring with any answer function (a model, or a test's fake), so
what the command reports is exactly `tasks.score_responses` of the answers it got.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping, Sequence

from llamactl.errors import LlamactlError
from llamactl.tasks import FAMILIES, score, score_responses

# answer(items, samples, temperature) -> samples answers per item
AnswerFn = Callable[[Sequence[Mapping], int, float], list[list[str]]]


def limit_per_family(items: Sequence[Mapping], limit: int | None) -> list[Mapping]:
    """The first `limit` items of each family (all with None), in file order."""
    if limit is None:
        return list(items)
    if limit < 1:
        raise LlamactlError(f"--limit must be at least 1, got {limit}")
    seen: dict[str, int] = {}
    out = []
    for it in items:
        if seen.get(it["family"], 0) < limit:
            seen[it["family"]] = seen.get(it["family"], 0) + 1
            out.append(it)
    return out


def check_sampling(samples: int, temperature: float) -> None:
    if samples < 0:
        raise LlamactlError(f"--samples must be >= 0, got {samples}")
    if samples and temperature <= 0:
        raise LlamactlError(f"--samples needs --temperature > 0, got {temperature} (--samples 0: greedy only)")


def check_answer_flags(max_new_tokens: int, batch_size: int, out) -> None:
    """The flags every command that answers prompts and writes one result file shares (eval tasks, compare)."""
    if max_new_tokens < 1:
        raise LlamactlError(f"--max-new-tokens must be at least 1, got {max_new_tokens} (--max-new-tokens)")
    if batch_size < 1:
        raise LlamactlError(f"--batch-size must be at least 1, got {batch_size} (--batch-size)")
    if out is not None and Path(out).is_dir():
        raise LlamactlError(f"{out} is a directory (--out names a file)")


def evaluate(items: Sequence[Mapping], answer: AnswerFn, *, samples: int = 0, temperature: float = 1.0) -> dict:
    """Greedy and (with samples > 0) sampled ground-truth scores per family and overall, plus per-item rows."""
    check_sampling(samples, temperature)
    greedy = [a[0] for a in answer(items, 1, 0.0)]
    sampled = answer(items, samples, temperature) if samples else None
    g = score_responses(items, greedy)
    s = None
    if sampled is not None:
        if any(len(a) != samples for a in sampled):
            raise ValueError(f"the answer function must return {samples} answers per item")
        s = score_responses([it for it in items for _ in range(samples)], [x for a in sampled for x in a])
    fams = list(g)
    result = {
        "families": {f: {"prompts": sum(it["family"] == f for it in items), "safety": FAMILIES[f].safety,
                         "greedy": g[f], "sampled": s[f] if s else None} for f in fams},
        "overall": {"prompts": len(items), "greedy": sum(g.values()) / len(g),
                    "sampled": sum(s.values()) / len(s) if s else None},
        "samples": samples, "temperature": temperature if samples else None,
        "items": [{"family": it["family"], "prompt": it["prompt"], "gold": it["answer"], "greedy": greedy[i],
                   "greedy_score": score(it, greedy[i]),
                   **({"sampled_score": sum(score(it, x) for x in sampled[i]) / samples} if sampled else {})}
                  for i, it in enumerate(items)],
    }
    return result


def run_eval_tasks(model_dir, suite, *, split: str = "heldout", samples: int = 4, temperature: float = 0.7,
                   top_p: float = 1.0, max_new_tokens: int = 48, limit: int | None = None, raw: bool = False,
                   seed: int = 0, batch_size: int = 32, device: str = "auto", out=None) -> dict:
    """Load the model, answer the split's prompts, score them; write the JSON result to `out` if given."""
    from llamactl.generation import load_for_generation
    from llamactl.stages.answers import answer_items
    from llamactl.tasks import suite_items
    from llamactl.tasks.suite import write_text_atomic
    from llamactl.ui import progress

    check_sampling(samples, temperature)
    check_answer_flags(max_new_tokens, batch_size, out)
    items = limit_per_family(suite_items(suite, split), limit)
    model, tok = load_for_generation(model_dir, device)
    with progress() as bar:
        def answer(its, n, t):
            task = bar.add_task("greedy" if t == 0 else f"sampled x{n} @ T {t:g}", total=len(its) * n)
            return answer_items(model, tok, its, samples=n, temperature=t, top_p=top_p, seed=seed,
                                max_new_tokens=max_new_tokens, batch_size=batch_size, raw=raw,
                                progress=lambda k: bar.advance(task, k))

        result = evaluate(items, answer, samples=samples, temperature=temperature)
    result.update(model=str(model_dir), suite=str(suite), split=split, raw=raw, top_p=top_p,
                  max_new_tokens=max_new_tokens, seed=seed, limit=limit)
    if out is not None:
        write_text_atomic(out, json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return result


def result_rows(result: Mapping) -> tuple[list[str], list[list]]:
    """Columns and rows of the per-family table (families, then overall)."""
    sampled = result["samples"] > 0
    cols = ["family", "safety", "prompts", "greedy"] + (
        [f"sampled ({result['samples']} @ T {result['temperature']:g})"] if sampled else [])

    def row(name, r, safety=""):
        return [name, safety, r["prompts"], f"{r['greedy']:.3f}"] + ([f"{r['sampled']:.3f}"] if sampled else [])

    rows = [row(f, r, "yes" if r["safety"] else "") for f, r in result["families"].items()]
    return cols, rows + [row("overall", result["overall"])]
