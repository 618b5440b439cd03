"""A model's answers to task-suite items: the one sampling path of `eval tasks` and `data preferences`.

Prompts go in with the Llama 2 chat template (a chat model after SFT). `raw` instead feeds a base model
the pretraining text's own question form, `Question: <prompt> Answer:`, and cuts the continuation at
the first line break, the end of the first sentence, or a capitalised word other than "I" after the
first word ("17 The list ...", "sun dog Question: ..."): a base model does not stop by itself, and the
pretraining text runs several worked examples together. Every gold answer survives this cut.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping, Sequence

from llamactl.errors import LlamactlError

RAW_TEMPLATE = "Question: {prompt} Answer:"


def encode_items(tok, items: Sequence[Mapping], *, raw: bool, where: str = "") -> list[list[int]]:
    from llamactl.generation import encode_prompt

    out = []
    for i, it in enumerate(items):
        rec = {"prompt": RAW_TEMPLATE.format(prompt=it["prompt"]) if raw else it["prompt"]}
        out.append(encode_prompt(tok, rec, raw=raw, system=None, where=f" (item {i + 1}{where})"))
    return out


def clean_answer(text: str, *, raw: bool) -> str:
    """The answer a scorer sees: stripped; for raw prompts cut where the next worked example begins."""
    if raw:
        text = re.split(r"(?<=[.!?])\s", text.split("\n", 1)[0].strip(), maxsplit=1)[0]
        words = text.split(" ")
        # a capitalised word (other than "I") after the first starts the next worked example: "17 The list ..."
        cut = next((i for i, w in enumerate(words) if i and w[:1].isupper() and not re.match(r"I\b", w)), len(words))
        text = " ".join(words[:cut])
    return text.strip()


def answer_items(model, tok, items: Sequence[Mapping], *, samples: int = 1, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, seed_offset: int = 0, max_new_tokens: int = 48,
                 batch_size: int = 32, raw: bool = False, ctx=None,
                 progress: Callable[[int], None] | None = None) -> list[list[str]]:
    """`samples` answers per item (out[i][k]); every sample has its own generator, seeded from
    (seed, seed_offset + i * samples + k), so answers do not depend on batching."""
    from llamactl.generation import generate, sequence_seed

    if samples < 1:
        raise LlamactlError(f"samples must be at least 1, got {samples}")
    if temperature < 0:
        raise LlamactlError(f"--temperature must be >= 0, got {temperature}")
    prompts = encode_items(tok, items, raw=raw)
    flat = [p for p in prompts for _ in range(samples)]
    seeds = [sequence_seed(seed, seed_offset + j) for j in range(len(flat))]
    got = generate(model, flat, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                   seeds=seeds, eos_id=tok.eos_id, batch_size=batch_size, ctx=ctx, progress=progress)
    texts = [clean_answer(tok.decode(s.tokens[:-1] if s.finish_reason == "stop" else s.tokens), raw=raw)
             for s in got]
    return [texts[i * samples:(i + 1) * samples] for i in range(len(items))]
