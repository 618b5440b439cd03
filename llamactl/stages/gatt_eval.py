"""`llamactl gatt eval`: does the model keep an instruction over many turns? (paper 3.3, GAtt evaluation)

Each dialogue gets a checkable instruction (the user's --constraint specs in turn, else sampled like the
training ones) as its system message only -- as at inference, never repeated in the user turns -- and
user turns drawn from --prompts; every model answers the same dialogues turn by turn from its own earlier
answers (greedy by default). Adherence at turn t is the share of the dialogues that reached turn t whose
answer keeps the constraint; a dialogue stops cleanly when its next turn would overflow the model's
context (the paper: "consistent up to 20+ turns, until the maximum context length is reached"), so
`reached` says how many dialogues each figure rests on.

JSON (--out, read by `llamactl report`): {"turns": [1..T], "models": {label: {"adherence": [per turn, null
where no dialogue reached it], "reached": [...], "by_family": {family: [...]}, "by_family_turn_5_plus",
"mean_turn_5_plus", "model", "examples"}}, "constraints": distinct instructions, "dialogues": N, ...settings}; the PNG next to it.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from llamactl.errors import LlamactlError


@dataclass
class GattEvalConfig:
    """The dialogues of an evaluation. With constraints given and no kinds, exactly those instructions are
    used, in turn; else they join the sampled families."""

    prompts: str = ""
    dialogues: int = 32
    turns: int = 20
    max_new_tokens: int = 24
    temperature: float = 0.0           # greedy: the answer the model believes in
    top_p: float = 1.0
    kinds: list = field(default_factory=lambda: ["hobby", "language", "figure", "case", "start", "end",
                                                 "length", "mention"])
    constraints: list = field(default_factory=list)
    constraints_file: Optional[str] = None
    max_parts: int = 2
    concise: float = 0.0               # the long instruction, unless asked
    seed: int = 1                      # other dialogues than training's default seed 0
    batch_size: int = 64


def mean_from(values: Sequence[Optional[float]], reached: Sequence[int], start: int) -> Optional[float]:
    """Adherence over all answers from turn `start` on (weighted by the dialogues that reached each turn)."""
    pairs = [(a, n) for a, n in list(zip(values, reached))[start - 1:] if a is not None and n]
    total = sum(n for _, n in pairs)
    return sum(a * n for a, n in pairs) / total if total else None


def evaluate(dialogues, answer, fits, turns: int) -> dict:
    """One model's figures on (a fresh copy of) the planned dialogues."""
    from llamactl.gatt_data import adherence_per_turn, family, roll

    ds = copy.deepcopy(list(dialogues))
    roll(ds, answer, fits, every_turn=False, repair=False)
    adherence, reached = adherence_per_turn(ds, turns)
    by_family = {}
    for fam in sorted({family(d.constraint) for d in ds}):
        by_family[fam] = adherence_per_turn([d for d in ds if family(d.constraint) == fam], turns)[0]
    reach = {fam: adherence_per_turn([d for d in ds if family(d.constraint) == fam], turns)[1] for fam in by_family}
    return {"adherence": adherence, "reached": reached, "by_family": by_family,
            "by_family_turn_5_plus": {f: mean_from(by_family[f], reach[f], 5) for f in by_family},
            "mean_turn_5_plus": mean_from(adherence, reached, 5),
            "stopped_by_context": sum(d.stopped == "context" for d in ds),
            "examples": [{"instruction": d.instruction, "answers": d.answers[:6]} for d in ds[:3]]}


def run_eval(models: dict[str, Path], cfg, *, out: Optional[Path] = None, device: str = "auto",
             show: bool = True) -> dict:
    """Evaluate every model (label -> checkpoint) on the same dialogues; print the table, write JSON + PNG."""
    from llamactl import checkpoint, plots
    from llamactl.chat_data import load_records
    from llamactl.gatt_data import plan_dialogues
    from llamactl.generation import load_for_generation
    from llamactl.stages.gatt import check_config, context_fits, instruction_pool, model_answerer
    from llamactl.tasks.suite import write_text_atomic
    from llamactl.ui import console, table

    check_config(cfg)
    flag = {label: {"gatt": "--model", "baseline": "--baseline"}.get(label, "--also") for label in models}
    for label, path in models.items():
        if not Path(path).exists():
            raise LlamactlError(f"checkpoint not found ({path}, {flag[label]})")
    ckpts = {label: checkpoint.resolve(p, flag[label]) for label, p in models.items()}
    items = load_records(Path(cfg.prompts), "prompts", "--prompts")
    pool, user = instruction_pool(cfg, items)
    dialogues = plan_dialogues(pool, [it.prompt for it in items], dialogues=cfg.dialogues, turns=cfg.turns,
                               concise=cfg.concise, seed=cfg.seed, fixed=user if not cfg.kinds else ())
    result = {"turns": list(range(1, cfg.turns + 1)), "models": {},
              "constraints": len({d.instruction for d in dialogues}), "dialogues": len(dialogues),
              "prompts": str(cfg.prompts), "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
              "seed": cfg.seed}
    for label, ckpt in ckpts.items():
        model, tok = load_for_generation(ckpt, device)
        answer = model_answerer(model, tok, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                top_p=cfg.top_p, seed=cfg.seed, batch_size=cfg.batch_size)
        r = evaluate(dialogues, answer, context_fits(tok, model.cfg.max_seq_len, cfg.max_new_tokens), cfg.turns)
        result["models"][label] = {**r, "model": str(ckpt)}
        del model
    if show:
        console.print(table(f"GAtt adherence per turn ({len(dialogues)} dialogues, {result['constraints']} "
                            f"instructions, system message only)", *table_rows(result)))
        console.print(table("adherence per instruction family (turn 1 / turns 5+)", *family_rows(result)))
    if out is not None:
        write_text_atomic(out, json.dumps(result, indent=1) + "\n")
        png = Path(out).with_suffix(".png")
        series = {label: ([t for t, a in zip(result["turns"], r["adherence"]) if a is not None],
                          [a for a in r["adherence"] if a is not None]) for label, r in result["models"].items()}
        if plots.line_plot(png, series, title="GAtt: instruction kept per turn", xlabel="turn",
                           ylabel="adherence"):
            result["plot"] = str(png)
            if show:
                console.print(f"plot: {png}", markup=False)
        elif show:
            console.print(plots.MISSING, markup=False)
    return result


def table_rows(result: dict) -> tuple[list[str], list[list]]:
    """Columns and rows: turn, then per model its adherence and how many dialogues reached the turn."""
    labels = list(result["models"])
    cols = ["turn"] + [c for lab in labels for c in (lab, f"{lab} n")]

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f} %"

    rows = []
    for i, t in enumerate(result["turns"]):
        rows.append([t] + [x for lab in labels for x in (pct(result["models"][lab]["adherence"][i]),
                                                         result["models"][lab]["reached"][i])])
    rows.append(["5+"] + [x for lab in labels for x in (pct(result["models"][lab]["mean_turn_5_plus"]), "")])
    return cols, rows


def family_rows(result: dict) -> tuple[list[str], list[list]]:
    """Per instruction family and model: adherence at turn 1 and over turns 5+."""
    labels = list(result["models"])
    fams = sorted({f for m in result["models"].values() for f in m["by_family"]})

    def pct(v):
        return "-" if v is None else f"{100 * v:.0f} %"

    rows = []
    for f in fams:
        row = [f]
        for lab in labels:
            m = result["models"][lab]
            row.append(f"{pct(m['by_family'].get(f, [None])[0])} / {pct(m['by_family_turn_5_plus'].get(f))}")
        rows.append(row)
    return ["family"] + labels, rows
