"""The demo's closing figures from the files its stages wrote: held-out ground-truth score per family after
each stage, RM accuracy per rating bucket, PPO's KL and reward, GAtt adherence with and without.

Only scores go into DEMO/summary.md (no timings), so an interrupted and resumed demo of the same seed
writes the same file as an uninterrupted one; `llamactl report DEMO` is the full report with plots.
"""
from __future__ import annotations

import json
from pathlib import Path

STAGES = ("pretrain", "sft", "rs", "ppo", "gatt")
RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def score_table(demo: Path) -> tuple[list[str], list[list[str]]]:
    """Families x stages: greedy ground-truth score on the held-out prompts (`eval tasks`), and the overall score
    of sampled answers when the evals drew them."""
    evals = [(s, _load(demo / "evals" / f"{s}.json")) for s in STAGES]
    evals = [(s, r) for s, r in evals if r]
    if not evals:
        return [], []
    fams = list(evals[0][1]["families"])
    cols = ["family"] + [s + (" (raw)" if r.get("raw") else "") for s, r in evals]
    rows = [[f] + [f"{r['families'][f]['greedy']:.3f}" if f in r["families"] else "-" for _, r in evals] for f in fams]
    rows.append(["overall"] + [f"{r['overall']['greedy']:.3f}" for _, r in evals])
    if any(r.get("samples") for _, r in evals):  # the mean of sampled answers, where the evals drew them
        rows.append([f"overall, sampled (T {next(r['temperature'] for _, r in evals if r.get('samples')):g})"]
                    + [f"{r['overall']['sampled']:.3f}" if r.get("samples") else "-" for _, r in evals])
    rows.append(["change of overall, 95 % CI"] + ["-"] + [change_interval(a, b) for (_, a), (_, b) in zip(evals, evals[1:])])
    return cols, rows


def change_interval(before: dict, after: dict, rounds: int = 2000, seed: int = 0) -> str:
    """The change of the overall greedy score from one stage to the next with a paired bootstrap 95 % interval
    (the same held-out prompts resampled within each family, the overall being the mean of families): a change
    inside the noise of 80 prompts per family shows an interval across 0. '-' when the evals are not paired."""
    import random

    def per_family(r):
        out: dict[str, list[float]] = {}
        for it in r.get("items", []):
            out.setdefault(it["family"], []).append(float(it["greedy_score"]))
        return out

    a, b = per_family(before), per_family(after)
    if not a or a.keys() != b.keys() or any(len(a[f]) != len(b[f]) for f in a):
        return "-"
    diffs = {f: [y - x for x, y in zip(a[f], b[f])] for f in a}

    def overall(pick):
        return sum(sum(d[i] for i in pick[f]) / len(d) for f, d in diffs.items()) / len(diffs)

    rng = random.Random(seed)
    point = overall({f: range(len(d)) for f, d in diffs.items()})
    boot = sorted(overall({f: [rng.randrange(len(d)) for _ in d] for f, d in diffs.items()}) for _ in range(rounds))
    return f"{point:+.3f} ({boot[int(0.025 * rounds)]:+.3f}, {boot[int(0.975 * rounds) - 1]:+.3f})"


def rm_table(demo: Path) -> tuple[list[str], list[list[str]]]:
    cols = ["reward model", "significantly better", "better", "slightly better", "negligibly better", "all", "pairs"]
    rows = []
    # (eval file, label): both RMs on pairs of two model variants, and the helpfulness RM on pairs of the SFT
    # policy's own answers (what rejection sampling and PPO ask of it)
    for name, label in (("rm-helpful", "rm-helpful"), ("rm-safety", "rm-safety"),
                        ("rm-helpful-policy", "rm-helpful, the policy's own answers")):
        r = _load(demo / "evals" / f"{name}.json")
        if not r:
            continue

        def pct(v):
            return "-" if v is None else f"{100 * v:.1f} %"

        row = [label, *[pct(r["buckets"][b]["accuracy"]) for b in RATINGS], pct(r["accuracy"]), str(r["pairs"])]
        rows.append(row)
    return cols, rows


def detector_line(demo: Path) -> str:
    """The safety RM as an unsafe detector (sigma(score) < 0.15), when its eval checked it."""
    s = (_load(demo / "evals" / "rm-safety.json") or {}).get("safety")
    if not s:
        return ""

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f} %"

    return (f"rm-safety as an unsafe detector (sigma(score) < {s.get('threshold')}): precision "
            f"{pct(s.get('precision'))}, recall {pct(s.get('recall'))} ({s.get('unsafe')} unsafe of "
            f"{s.get('responses')} responses)")


def ppo_lines(demo: Path) -> list[str]:
    path = demo / "ppo" / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    train = [r for r in rows if r.get("split") != "val" and "kl" in r]
    val = [r for r in rows if r.get("split") == "val"]
    out = []
    if train:
        a, b = train[0], train[-1]
        out.append(f"PPO iterations {a['step']}..{b['step']}: reward R_c {a.get('reward_combined', 0):.4f} -> "
                   f"{b.get('reward_combined', 0):.4f}, KL to the reference {a['kl']:.4f} -> {b['kl']:.4f} "
                   f"(max {max(r['kl'] for r in train):.4f})")
    if val:
        out.append(f"PPO held-out R_c {val[0].get('reward_combined', 0):.4f} -> {val[-1].get('reward_combined', 0):.4f}, "
                   f"KL {val[-1].get('kl', 0):.4f}")
    return out


def gatt_table(demo: Path) -> tuple[list[str], list[list[str]]]:
    r = _load(demo / "evals" / "gatt-adherence.json")
    if not r:
        return [], []
    turns = list(r["turns"])
    shown = [i for i, t in enumerate(turns) if t in (1, 2, 3, 5, 8, 10, 12, 15, 20) or i == len(turns) - 1]
    late = [i for i, t in enumerate(turns) if t >= 5]
    cols = ["model"] + [f"turn {turns[i]}" for i in shown] + (["mean, turns >= 5"] if late else [])

    def row(label, adh):
        cells = [label] + [f"{adh[i]:.2f}" if adh[i] is not None else "-" for i in shown]
        vals = [adh[i] for i in late if adh[i] is not None]
        return cells + ([f"{sum(vals) / len(vals):.2f}" if vals else "-"] if late else [])

    return cols, [row(label, m["adherence"]) for label, m in r["models"].items()]


def summary_markdown(demo: Path) -> str:
    def md(cols, rows):
        if not rows:
            return ""
        return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
                          *["| " + " | ".join(r) + " |" for r in rows]]) + "\n\n"

    text = "# llamactl demo: results\n\nHeld-out ground-truth score per family (greedy), after each stage:\n\n"
    text += md(*score_table(demo))
    text += "Reward models, held-out accuracy per rating:\n\n" + md(*rm_table(demo))
    if detector_line(demo):
        text += detector_line(demo) + "\n\n"
    text += "".join(f"{x}\n\n" for x in ppo_lines(demo))
    g = gatt_table(demo)
    if g[1]:
        text += "GAtt constraint adherence per turn:\n\n" + md(*g)
    return text


def write_summary(demo: Path, state: dict) -> Path:
    from llamactl.tasks.suite import write_text_atomic

    text = summary_markdown(demo)
    missing = state.get("missing") or []
    if missing:
        text += "Not available in this build: " + ", ".join(m["stage"] for m in missing) + "\n"
    return write_text_atomic(demo / "summary.md", text)


def print_summary(demo: Path, state: dict) -> None:
    from llamactl.ui import console, table

    cols, rows = score_table(demo)
    if rows:
        console.print(table("held-out ground-truth score per family (greedy) after each stage", cols, rows))
    cols, rows = rm_table(demo)
    if rows:
        console.print(table("reward models: held-out accuracy per rating", cols, rows))
    if detector_line(demo):
        console.print(detector_line(demo))
    for line in ppo_lines(demo):
        console.print(line)
    cols, rows = gatt_table(demo)
    if rows:
        console.print(table("GAtt: constraint adherence per turn", cols, rows))
