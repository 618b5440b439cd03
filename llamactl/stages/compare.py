"""`llamactl rlhf compare`: model-based evaluation (paper 3.4.1, Figure 11) of checkpoint A against B.

Both models answer the same prompts with the same per-sample seeds (stages/answers.py). Two judges decide,
per prompt, whether A's answer beats B's:
  reward_model  the paper's judge: helpfulness prompts by the helpfulness RM, safety-tagged prompts by the
                safety RM, both in sigma space (R = sigma(score) in [0, 1], llamactl.rewards).
  ground_truth  the neutral judge (the paper's GPT-4 column): the task suite's scorer
                (llamactl.tasks.score, in [0, 1]); it needs the suite's task fields ("family", "answer", ...),
                so a prompt file without them gets no ground-truth column and the result says why.
With --samples N each model answers N times per prompt and a judge compares the mean of the N values.
A and B tie on a prompt when those values differ by at most TIE_EPS (both judges' values lie in [0, 1]:
0.01 is one point on a 100-point scale, below what either judge can tell apart on a tiny model).
Win / tie / loss are fractions of the prompts of that kind (helpfulness = not safety-tagged).

The JSON written with --out (what `llamactl report` reads):
    {"a", "b", "prompts": n, "judges": {"reward_model": {"helpfulness": {"win", "tie", "loss", "prompts",
     "mean_a", "mean_b"} | null, "safety": ...}, "ground_truth": {...} | null}, "ground_truth_absent"?: why,
     "epsilon", "samples", "temperature", "top_p", "max_new_tokens", "seed", "limit", "raw_a", "raw_b", "prompts_file",
     "rm_helpful", "rm_safety", "items": [{"prompt", "safety", "family"?, "a": [..], "b": [..],
     "rm_a", "rm_b", "gt_a"?, "gt_b"?}]}
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional, Sequence

from llamactl.errors import LlamactlError

TIE_EPS = 0.01
KINDS = ("helpfulness", "safety")
JUDGES = ("reward_model", "ground_truth")


# ---- the arithmetic ----------------------------------------------------------------------------------
def outcome(a: float, b: float, eps: float = TIE_EPS) -> int:
    """+1 when A is better by more than eps, -1 when B is, 0 for a tie."""
    if abs(a - b) <= eps:
        return 0
    return 1 if a > b else -1


def win_rates(a: Sequence[float], b: Sequence[float], safety: Sequence[bool], eps: float = TIE_EPS) -> dict:
    """Per kind (helpfulness / safety): win, tie, loss as fractions of that kind's prompts, the prompt count
    and the mean judge value of A and B; None for a kind without prompts."""
    if not len(a) == len(b) == len(safety):
        raise ValueError(f"{len(a)}, {len(b)} and {len(safety)} values: one per prompt each")
    out = {}
    for kind in KINDS:
        idx = [i for i, s in enumerate(safety) if s == (kind == "safety")]
        if not idx:
            out[kind] = None
            continue
        res = [outcome(a[i], b[i], eps) for i in idx]
        n = len(idx)
        out[kind] = {"win": res.count(1) / n, "tie": res.count(0) / n, "loss": res.count(-1) / n, "prompts": n,
                     "mean_a": sum(a[i] for i in idx) / n, "mean_b": sum(b[i] for i in idx) / n}
    return out


def per_prompt(values: Sequence[float], samples: int) -> list[float]:
    """Mean of each prompt's `samples` consecutive values."""
    return [sum(values[i:i + samples]) / samples for i in range(0, len(values), samples)]


# ---- prompts -----------------------------------------------------------------------------------------
def read_prompts(path, limit: Optional[int] = None) -> tuple[list[dict], Optional[str]]:
    """(prompt records, None) for a task-suite prompt file, or (records, why there is no ground truth).

    Every line needs "prompt" (a string); "safety" (a bool, default false) picks the reward model; the
    suite's task fields, on every line, make the ground-truth judge possible. --limit keeps the first N
    prompts of each family (of each kind without families)."""
    from llamactl.stages.eval_tasks import limit_per_family
    from llamactl.tasks import load_items
    from llamactl.textfiles import iter_jsonl

    path = Path(path)
    if not path.is_file():
        raise LlamactlError(f"prompts file not found: {path} (--prompts)")
    recs, missing = [], None
    for n, obj in iter_jsonl(path, "--prompts"):
        where = f"{path}, line {n}, --prompts"
        if not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise LlamactlError(f'each line needs "prompt", a non-empty string ({where})')
        if not isinstance(obj.get("safety", False), bool):
            raise LlamactlError(f'field "safety" must be true or false ({where})')
        if missing is None and not ("family" in obj and "answer" in obj):
            missing = f'{path} has no task-suite fields ("family", "answer" missing on line {n}); the ground-truth ' \
                      f'judge needs a suite prompt file such as prompts.heldout.jsonl'
        recs.append({**obj, "safety": obj.get("safety", False)})
    if not recs:
        raise LlamactlError(f"no prompts in {path} (--prompts)")
    if missing is None:  # every line has task fields: validate them as the suite does
        return limit_per_family(load_items(path), limit), None
    # no families: limit per kind, and no "family" left on the records (it would claim a task)
    kept = limit_per_family([{**r, "family": "safety" if r["safety"] else "helpfulness"} for r in recs], limit)
    return [{k: v for k, v in r.items() if k != "family"} for r in kept], missing


# ---- the comparison ----------------------------------------------------------------------------------
def judge(items: Sequence[Mapping], answers_a: Sequence[Sequence[str]], answers_b: Sequence[Sequence[str]],
          rewards_a: Sequence[float], rewards_b: Sequence[float], *, ground_truth: bool,
          eps: float = TIE_EPS) -> tuple[dict, list[dict]]:
    """Both judges' win rates and the per-prompt rows, from answers (samples per prompt) and their judged
    sigma-space rewards (flat, samples consecutive per prompt: R_h on helpfulness prompts, R_s on safety)."""
    from llamactl.tasks import score

    samples = len(answers_a[0])
    safety = [bool(it["safety"]) for it in items]
    rm_a, rm_b = per_prompt(rewards_a, samples), per_prompt(rewards_b, samples)
    judges = {"reward_model": win_rates(rm_a, rm_b, safety, eps), "ground_truth": None}
    rows = [{"prompt": it["prompt"], "safety": it["safety"], **({"family": it["family"]} if "family" in it else {}),
             "a": list(answers_a[i]), "b": list(answers_b[i]), "rm_a": rm_a[i], "rm_b": rm_b[i]}
            for i, it in enumerate(items)]
    if ground_truth:
        gt_a = [sum(score(it, x) for x in answers_a[i]) / samples for i, it in enumerate(items)]
        gt_b = [sum(score(it, x) for x in answers_b[i]) / samples for i, it in enumerate(items)]
        judges["ground_truth"] = win_rates(gt_a, gt_b, safety, eps)
        for r, ga, gb in zip(rows, gt_a, gt_b):
            r.update(gt_a=ga, gt_b=gb)
    return judges, rows


def _answers(model_dir, items, *, samples, temperature, top_p, seed, max_new_tokens, batch_size, device, bar, label,
             raw=False):
    """One model's answers (loaded, used, freed: only one policy in memory at a time)."""
    from llamactl.generation import load_for_generation
    from llamactl.stages.answers import answer_items

    flag = f"--{label.lower()}"
    try:
        model, tok = load_for_generation(model_dir, device)
    except LlamactlError as e:  # its errors name --model; here the flag is --a / --b
        raise LlamactlError(str(e).replace("--model", flag)) from None
    if model.head != "lm":
        raise LlamactlError(f"{flag} needs a language-model checkpoint, not a {model.head} head ({model_dir})")
    task = bar.add_task(f"answers of {label}", total=len(items) * samples)
    out = answer_items(model, tok, items, samples=samples, temperature=temperature, top_p=top_p, seed=seed,
                       max_new_tokens=max_new_tokens, batch_size=batch_size, raw=raw,
                       progress=lambda k: bar.advance(task, k))
    del model
    return out


def run_compare(a, b, prompts, rm_helpful, rm_safety, *, samples: int = 1, temperature: float = 0.0,
                top_p: float = 1.0, max_new_tokens: int = 48, seed: int = 0, limit: Optional[int] = None,
                batch_size: int = 32, device: str = "auto", eps: float = TIE_EPS, raw_a: bool = False,
                raw_b: bool = False, out=None) -> dict:
    """Answer, judge, and (with `out`) write the JSON result; returns it. raw_a / raw_b: prompt that model
    as a base model ("Question: ... Answer:", stages/answers.py); the judges see the same cleaned answer."""
    from llamactl.rewards import RewardModels
    from llamactl.stages.eval_tasks import check_answer_flags
    from llamactl.tasks.suite import write_text_atomic
    from llamactl.ui import progress

    if samples < 1:
        raise LlamactlError(f"--samples must be at least 1, got {samples} (--samples)")
    if samples > 1 and temperature <= 0:
        raise LlamactlError(f"--samples {samples} needs --temperature > 0 (greedy answers are all the same)")
    if temperature < 0:
        raise LlamactlError(f"--temperature must be >= 0, got {temperature} (--temperature)")
    check_answer_flags(max_new_tokens, batch_size, out)
    for flag, p in (("--a", a), ("--b", b), ("--rm-helpful", rm_helpful), ("--rm-safety", rm_safety)):
        if not Path(p).exists():
            raise LlamactlError(f"checkpoint directory not found: {p} ({flag})")
    items, gt_absent = read_prompts(prompts, limit)
    kw = dict(samples=samples, temperature=temperature, top_p=top_p, seed=seed, max_new_tokens=max_new_tokens,
              batch_size=batch_size, device=device)
    rms = RewardModels.load(Path(rm_helpful), Path(rm_safety), device=device)  # first: a wrong RM fails fast
    with progress() as bar:
        ans_a = _answers(a, items, bar=bar, label="A", raw=raw_a, **kw)
        ans_b = _answers(b, items, bar=bar, label="B", raw=raw_b, **kw)
        task = bar.add_task("reward models", total=2)
        dialogs = [[{"role": "user", "content": it["prompt"]}] for it in items for _ in range(samples)]
        safety = [bool(it["safety"]) for it in items for _ in range(samples)]
        judged = []
        for ans in (ans_a, ans_b):
            r = rms.score(dialogs, [x for s in ans for x in s], safety)
            judged.append([float(s if t else h) for h, s, t in zip(r.helpful.tolist(), r.safety.tolist(), safety)])
            bar.advance(task, 1)
    judges, rows = judge(items, ans_a, ans_b, judged[0], judged[1], ground_truth=gt_absent is None, eps=eps)
    result = {"a": str(a), "b": str(b), "prompts": len(items), "judges": judges,
              **({"ground_truth_absent": gt_absent} if gt_absent else {}),
              "epsilon": eps, "samples": samples, "temperature": temperature, "top_p": top_p,
              "max_new_tokens": max_new_tokens, "seed": seed, "limit": limit, "raw_a": raw_a, "raw_b": raw_b,
              "prompts_file": str(prompts),
              "rm_helpful": str(rm_helpful), "rm_safety": str(rm_safety), "items": rows}
    if out is not None:
        write_text_atomic(out, json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return result


def result_rows(result: Mapping) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of the Figure 11 table: one row per judge and kind."""
    cols = ["judge", "kind", "prompts", "A wins", "tie", "B wins", "mean A", "mean B"]
    rows = []
    for j in JUDGES:
        res = result["judges"].get(j)
        for kind in KINDS:
            r = (res or {}).get(kind)
            if r is None:
                why = "no prompts of this kind" if res is not None else "absent (see below)"
                rows.append([j.replace("_", " "), kind, "0" if res is not None else "-", why, "", "", "", ""])
                continue
            rows.append([j.replace("_", " "), kind, str(r["prompts"]), f"{100 * r['win']:.1f} %",
                         f"{100 * r['tie']:.1f} %", f"{100 * r['loss']:.1f} %", f"{r['mean_a']:.3f}",
                         f"{r['mean_b']:.3f}"])
    return cols, rows
