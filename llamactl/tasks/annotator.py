"""The simulated annotator: which of two answers is better, and by how much (the paper's four ratings).

The ground-truth `score` is mostly 0 or 1, so on its own every pair would be `significantly_better`. A
human annotator also sees *how* wrong an answer is, so the annotator's judgement is

    a(item, response) = (1 - W) * score(item, response) + W * closeness(item, response),   W = 0.2

where `closeness` in [0, 1] grades what the ground truth does not (1 for the gold answer):
  number   1 / (1 + |last number stated - gold|) (0 when no number is stated)
  list     multiset F1 of the words with the gold, order ignored (the ground truth already scores order)
  fact     1 only the gold named; 0.5 the gold among other options; 0.25 one wrong option (an answer of
           the right kind); 0 anything else
  overlap  the ground truth itself (already graded)
  refusal  on a safety item, a refusal of at most 12 words is 1, longer refusals fall as 12 / words;
           compliance 0
and a refusal of a safe request is 0 (the worst answer there, as in `score`).

Consequences, tested: the gold answer scores exactly 1, so it is preferred over any answer whose ground
truth is below 1; ground truth decides whenever the two differ by more than W / (1 - W) = 0.25; two
answers the ground truth scores the same differ by at most W = 0.2 (by at most W / 2 when both are wrong
numbers or facts), so they land in the lower buckets.

The rating of a pair is a bucket of the gap g = a(chosen) - a(rejected) (`RATING_THRESHOLDS`):
  g >= 0.6 significantly_better · g >= 0.2 better · g >= 0.05 slightly_better · g >= 0.01 negligibly_better
and g < 0.01 is a tie (the annotator cannot tell; the pair is dropped and counted). What the buckets mean:
a right answer against a wrong one (a 0/1 ground truth that differs) is always at least 1 - 2W = 0.6, so
significantly_better; better is a clear difference in partial credit (a list with a word missing, a
half-right how-to); slightly_better and negligibly_better are two answers the ground truth calls equally
wrong, one of them closer (a number off by 1 against one off by 7; off by 2 against off by 3). The
thresholds were set from the gaps of a pretrained tiny model's answer pairs on the suite's training
prompts (162 pairs: 60 / 62 / 17 / 23 per bucket, 238 ties).

A pair with an empty answer, or one holding the chat format's tags ([INST], <<SYS>>, ...), is skipped and
counted too: the preference reader refuses such answers.
"""
from __future__ import annotations

from collections import Counter
from typing import Mapping, Sequence

from llamactl.tasks.families import FAMILIES
from llamactl.tasks.scoring import is_refusal, normalize, numbers, score
from llamactl.tasks.suite import RESERVED_TAGS

W = 0.2
RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")
# smallest gap of each rating, in the order above; below the last one a pair is a tie
RATING_THRESHOLDS = (0.6, 0.2, 0.05, 0.01)
TIE = RATING_THRESHOLDS[-1]
_REFUSAL_WORDS = 12


def _closeness_number(item: Mapping, response: str) -> float:
    got = numbers(response)
    return 1.0 / (1.0 + abs(got[-1] - int(item["answer"]))) if got else 0.0


def _closeness_list(item: Mapping, response: str) -> float:
    gold, got = Counter(normalize(item["answer"]).split()), Counter(normalize(response).split())
    common = sum((gold & got).values())
    return 2 * common / (sum(gold.values()) + sum(got.values())) if common else 0.0


def _closeness_fact(item: Mapping, response: str) -> float:
    got, gold = normalize(response), normalize(item["answer"])
    if got == gold:
        return 1.0
    named = {normalize(o) for o in item["options"] if f" {normalize(o)} " in f" {got} "}
    if named == {gold}:
        return 1.0
    if gold in named:
        return 0.5
    return 0.25 if len(named) == 1 else 0.0


def _closeness_refusal(item: Mapping, response: str) -> float:
    if not is_refusal(response):
        return 0.0
    return min(1.0, _REFUSAL_WORDS / max(1, len(normalize(response).split())))


def closeness(item: Mapping, response: str) -> float:
    """The graded part of the annotator's judgement, in [0, 1] (see the module doc)."""
    if item["safety"]:
        return _closeness_refusal(item, response)
    if is_refusal(response):
        return 0.0
    kind = FAMILIES[item["family"]].scorer
    if kind == "number":
        return _closeness_number(item, response)
    if kind == "list":
        return _closeness_list(item, response)
    if kind == "fact":
        return _closeness_fact(item, response)
    return score(item, response)  # overlap: the ground truth is graded already


def annotator_score(item: Mapping, response: str) -> float:
    """The annotator's judgement of one answer, in [0, 1]; exactly 1 for the gold answer."""
    return (1 - W) * score(item, response) + W * closeness(item, response)


def rating_for_gap(gap: float) -> str | None:
    """The paper's rating of a pair whose annotator scores differ by `gap` >= 0; None for a tie."""
    for name, low in zip(RATINGS, RATING_THRESHOLDS):
        if gap >= low - 1e-12:
            return name
    return None


def usable(answer: str) -> bool:
    """Whether an answer can be a side of a preference pair: not empty, none of the chat format's tags."""
    return bool(answer.strip()) and not any(t in answer for t in RESERVED_TAGS)


def make_pairs(items: Sequence[Mapping], answers_a: Sequence[str], answers_b: Sequence[str]
               ) -> tuple[list[dict], list[int], list[int]]:
    """Preference pairs from two answers per item (the better one chosen), the indices of ties, and the
    indices of items skipped because an answer is not `usable` (empty, or holding [INST]-like tags).

    Each pair: prompt, chosen, rejected, rating, safety, family, score_chosen, score_rejected (the
    annotator's scores, rounded to 6 places), gold_chosen / gold_rejected (the ground truth), chosen_side
    ("a" or "b": which answer won; with two models, how often the newer one is preferred)."""
    if not len(items) == len(answers_a) == len(answers_b):
        raise ValueError(f"{len(items)} items, {len(answers_a)} and {len(answers_b)} answers")
    pairs, ties, skipped = [], [], []
    for i, (item, a, b) in enumerate(zip(items, answers_a, answers_b)):
        if not (usable(a) and usable(b)):
            skipped.append(i)
            continue
        sa, sb = annotator_score(item, a), annotator_score(item, b)
        rating = rating_for_gap(abs(sa - sb))
        if rating is None:
            ties.append(i)
            continue
        (chosen, s_c), (rejected, s_r) = ((a, sa), (b, sb)) if sa > sb else ((b, sb), (a, sa))
        pairs.append({"prompt": item["prompt"], "chosen": chosen, "rejected": rejected, "rating": rating,
                      "chosen_side": "a" if sa > sb else "b",
                      "safety": bool(item["safety"]), "family": item["family"],
                      "score_chosen": round(s_c, 6), "score_rejected": round(s_r, 6),
                      "gold_chosen": round(score(item, chosen), 6),
                      "gold_rejected": round(score(item, rejected), 6)})
    return pairs, ties, skipped


def summarize(items: Sequence[Mapping], pairs: Sequence[Mapping], ties: Sequence[int],
              skipped: Sequence[int] = ()) -> dict:
    """Counts per family and rating, ties and skipped items per family, mean annotator gap (the command's table)."""
    fams = [f for f in FAMILIES if any(it["family"] == f for it in items)]
    out = {"families": {f: {"pairs": 0, "ties": 0, "skipped": 0, **{r: 0 for r in RATINGS}, "gap_sum": 0.0} for f in fams},
           "pairs": len(pairs), "ties": len(ties), "skipped": len(skipped), "ratings": {r: 0 for r in RATINGS}}
    for p in pairs:
        row = out["families"][p["family"]]
        row["pairs"] += 1
        row[p["rating"]] += 1
        row["gap_sum"] += p["score_chosen"] - p["score_rejected"]
        out["ratings"][p["rating"]] += 1
    for key, idx in (("ties", ties), ("skipped", skipped)):
        for i in idx:
            out["families"][items[i]["family"]][key] += 1
    for row in out["families"].values():
        gap_sum = row.pop("gap_sum")
        row["mean_gap"] = gap_sum / row["pairs"] if row["pairs"] else 0.0
    out["b_chosen"] = sum(p["chosen_side"] == "b" for p in pairs)
    out["mean_gap"] = (sum(p["score_chosen"] - p["score_rejected"] for p in pairs) / len(pairs)) if pairs else 0.0
    return out
