"""The simulated writers of the SFT demonstrations: careful most of the time, careless now and then.

The paper's premise for RLHF (sections 3.1 and 3.2): people write demonstrations with varying care, and
"the outputs sampled from the resulting SFT model were often competitive with SFT data handwritten by
human annotators", while comparing two answers is easier than writing the best one. A suite whose SFT
answers are all gold leaves rejection sampling and PPO nothing to add that SFT did not already teach. With
`writer_slips` > 0, that share of the SFT demonstrations of the families where a careless writer errs
carries one slip of the kind people make; prompts, held-out items and the annotator's ground truth stay
exact, so the slips only lower the quality of what SFT imitates:

  number  the answer off by one (never below zero): a miscount, a carry dropped
  list    two neighbouring words swapped, or one word left out (lists of two or more words)

Facts, how-to answers and refusals are copied from the source, so they never slip. Which demonstrations
slip comes from its own seeded stream, so without slips the data files are byte-identical to those
written before this option existed (suite.json gains the setting and a count of slips per family).

Measured with the demo's recipe (seed 0, --minutes 12, pretraining shared): at 0.3, SFT's held-out greedy
score fell 0.794 -> 0.770 (lists: copy 1.00 -> 0.90); the helpfulness RM then ranked the policy's own pairs
79 % right, 92-98 % where a list word was left out, 64-71 % for swapped words, 46-54 % on arithmetic, so
rejection sampling (0.757) and PPO (0.754) recovered lists and lost numbers. In an experiment with list
omissions alone (no number slips; not an option here): SFT 0.774, RS 0.771, PPO 0.768, and RS with the
ground truth choosing among the same samples instead of the RM 0.792. The demo keeps the default, 0.
"""
from __future__ import annotations

import random

from llamactl.tasks.families import FAMILIES


def _slip_number(answer: str, rng: random.Random) -> str:
    n = int(answer)
    step = rng.choice((-1, 1))
    return str(n + 1 if n + step < 0 else n + step)


def _slip_list(answer: str, rng: random.Random) -> str:
    words = answer.split()
    i = rng.randrange(len(words) - 1)
    if rng.random() < 0.5:
        words[i], words[i + 1] = words[i + 1], words[i]
    else:
        del words[rng.randrange(len(words))]
    return " ".join(words)


def can_slip(item: dict) -> bool:
    """Whether a careless writer could get this item's answer wrong (see the module docstring)."""
    scorer = FAMILIES[item["family"]].scorer
    return scorer == "number" or (scorer == "list" and len(item["answer"].split()) >= 2)


def slip(item: dict, rng: random.Random) -> str:
    """A careless writer's answer to `item`: always different from the gold answer."""
    if FAMILIES[item["family"]].scorer == "number":
        return _slip_number(item["answer"], rng)
    return _slip_list(item["answer"], rng)


def write_demonstrations(items: list[dict], rate: float, rng: random.Random) -> list[dict]:
    """The SFT items as the writers hand them in: `rate` of those that can slip carry a slip (a copy with a
    new answer and `"slip": True`); the rest are the items themselves. Draws nothing when `rate` is 0."""
    if rate <= 0:
        return items
    out = []
    for item in items:
        if can_slip(item) and rng.random() < rate:
            out.append({**item, "answer": slip(item, rng), "slip": True})
        else:
            out.append(item)
    return out
