"""Ghost Attention's instructions as checkable rules: "Always answer in capitals", "End with X", ...

A constraint has an instruction (the long form joined to a user turn), a short form (the paper shortens
half of them), `check(response) -> bool`, and `apply(text) -> text` that rewrites a plain answer so it
keeps the rule (GAtt's training targets when a tiny model cannot follow the rule yet). Constraints combine
(`Combined`), one per kind at most; kinds that would contradict each other do not combine. Each has a
`spec` string ("capitals+end:banana") that `parse` reads back, for JSONL files and command lines.
The paper's kinds map to: language -> pig latin, hobby -> mention a word, style -> case / start / end /
length.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Sequence

from llamactl.errors import LlamactlError
from llamactl.tasks.world import HOBBIES

_VOWELS = "aeiou"


def _words(text: str) -> list[str]:
    return text.split()


def _bare(word: str) -> str:
    """A word without surrounding punctuation, case-folded."""
    return re.sub(r"^[^\w]+|[^\w]+$", "", word).casefold()


def _pig_word(word: str) -> str:
    m = re.fullmatch(r"([^A-Za-z]*)([A-Za-z]+)([^A-Za-z]*)", word)
    if not m:
        return word  # numbers and mixed tokens stay as they are
    pre, w, post = m.groups()
    low = w.lower()
    if low[0] in _VOWELS:
        out = low + "way"
    else:
        k = next((i for i, c in enumerate(low) if c in _VOWELS + "y" and i > 0), len(low))
        out = low[k:] + low[:k] + "ay"
    if w.isupper() and len(w) > 1:
        out = out.upper()
    elif w[0].isupper():
        out = out.capitalize()
    return pre + out + post


def to_pig_latin(text: str) -> str:
    """cat dog -> atcay ogday; apple -> appleway; numbers and punctuation kept."""
    return " ".join(_pig_word(w) for w in _words(text))


class Constraint:
    """One rule the answers of a whole dialogue must keep."""
    kind: str = ""

    @property
    def instruction(self) -> str: raise NotImplementedError

    @property
    def short(self) -> str: raise NotImplementedError

    @property
    def spec(self) -> str: raise NotImplementedError

    def check(self, response: str) -> bool: raise NotImplementedError

    def apply(self, text: str) -> str: raise NotImplementedError

    @property
    def parts(self) -> tuple["Constraint", ...]:
        return (self,)

    def text(self, short: bool = False) -> str:
        return self.short if short else self.instruction


@dataclass(frozen=True)
class Capitals(Constraint):
    kind = "case"
    instruction = "Always answer in capital letters."
    short = "Answer in capitals."
    spec = "capitals"

    def check(self, response: str) -> bool:
        return bool(_words(response)) and not any(c.islower() for c in response)

    def apply(self, text: str) -> str:
        return text.upper()


@dataclass(frozen=True)
class Lowercase(Constraint):
    kind = "case"
    instruction = "Always answer in lower case letters."
    short = "Answer in lower case."
    spec = "lowercase"

    def check(self, response: str) -> bool:
        return bool(_words(response)) and not any(c.isupper() for c in response)

    def apply(self, text: str) -> str:
        return text.lower()


@dataclass(frozen=True)
class StartWith(Constraint):
    word: str
    kind = "start"

    @property
    def instruction(self) -> str: return f"Start every answer with the word {self.word}."

    @property
    def short(self) -> str: return f"Start with '{self.word}'."

    @property
    def spec(self) -> str: return f"start:{self.word}"

    def check(self, response: str) -> bool:
        w = _words(response)
        return bool(w) and _bare(w[0]) == self.word.casefold()

    def apply(self, text: str) -> str:
        return f"{self.word} {text}".strip()


@dataclass(frozen=True)
class EndWith(Constraint):
    word: str
    kind = "end"

    @property
    def instruction(self) -> str: return f"End every answer with the word {self.word}."

    @property
    def short(self) -> str: return f"End with '{self.word}'."

    @property
    def spec(self) -> str: return f"end:{self.word}"

    def check(self, response: str) -> bool:
        w = _words(response)
        return bool(w) and _bare(w[-1]) == self.word.casefold()

    def apply(self, text: str) -> str:
        return f"{text} {self.word}".strip()


@dataclass(frozen=True)
class MaxWords(Constraint):
    n: int
    kind = "length"

    @property
    def instruction(self) -> str: return f"Answer in at most {self.n} words."

    @property
    def short(self) -> str: return f"At most {self.n} words."

    @property
    def spec(self) -> str: return f"max_words:{self.n}"

    def check(self, response: str) -> bool:
        return 1 <= len(_words(response)) <= self.n

    def apply(self, text: str) -> str:
        return " ".join(_words(text)[:self.n])


@dataclass(frozen=True)
class PigLatin(Constraint):
    kind = "language"
    instruction = "Always answer in pig latin."
    short = "Answer in pig latin."
    spec = "pig_latin"

    def check(self, response: str) -> bool:
        words = [_bare(w) for w in _words(response)]
        lettered = [w for w in words if re.search(r"[a-z]", w)]
        return bool(words) and all(w.endswith("ay") for w in lettered)

    def apply(self, text: str) -> str:
        return to_pig_latin(text)


@dataclass(frozen=True)
class Mention(Constraint):
    """The paper's hobby instruction: the answer always brings up the hobby."""
    word: str
    kind = "mention"

    @property
    def instruction(self) -> str: return f"You love {self.word}: mention {self.word} in every answer."

    @property
    def short(self) -> str: return f"Mention {self.word}."

    @property
    def spec(self) -> str: return f"mention:{self.word}"

    def check(self, response: str) -> bool:
        return self.word.casefold() in {_bare(w) for w in _words(response)}

    def apply(self, text: str) -> str:
        return text if self.check(text) else f"{text} {self.word}".strip()


# kinds that cannot hold together: pig latin rewrites the words start / end / mention must keep verbatim
_CONFLICTS = {frozenset(("language", k)) for k in ("start", "end", "mention")}
# apply order: rewrite words, cut to length (leaving room for added words), add words, then case
_ORDER = ("language", "length", "mention", "start", "end", "case")
_ADDS_WORD = ("mention", "start", "end")


@dataclass(frozen=True)
class Combined(Constraint):
    """Several constraints at once (one per kind), checked together and applied in a safe order."""
    items: tuple[Constraint, ...]
    kind = "combined"

    def __post_init__(self):
        kinds = [c.kind for c in self.items]
        if len(self.items) < 2 or "combined" in kinds:
            raise ValueError("Combined takes two or more plain constraints")
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"constraints of the same kind cannot combine: {self.spec}")
        for a in kinds:
            for b in kinds:
                if frozenset((a, b)) in _CONFLICTS:
                    raise ValueError(f"{a} and {b} constraints contradict each other: {self.spec}")
        length = next((c for c in self.items if isinstance(c, MaxWords)), None)
        if length is not None and length.n <= sum(k in _ADDS_WORD for k in kinds):
            raise ValueError(f"max_words:{length.n} leaves no room for the answer: {self.spec}")

    @property
    def parts(self) -> tuple[Constraint, ...]:
        return self.items

    @property
    def instruction(self) -> str: return " ".join(c.instruction for c in self.items)

    @property
    def short(self) -> str: return " ".join(c.short for c in self.items)

    @property
    def spec(self) -> str: return "+".join(c.spec for c in self.items)

    def check(self, response: str) -> bool:
        return all(c.check(response) for c in self.items)

    def apply(self, text: str) -> str:
        reserve = sum(c.kind in _ADDS_WORD for c in self.items)
        for c in sorted(self.items, key=lambda c: _ORDER.index(c.kind)):
            text = MaxWords(c.n - reserve).apply(text) if isinstance(c, MaxWords) else c.apply(text)
        return text


def combine(constraints: Sequence[Constraint]) -> Constraint:
    flat = [p for c in constraints for p in c.parts]
    return flat[0] if len(flat) == 1 else Combined(tuple(flat))


def parse(spec: str, *, where: str = "constraint") -> Constraint:
    """Read a spec such as "capitals", "end:banana", "max_words:5", "start:Sure+pig_latin" (one-line errors)."""
    parts = []
    for p in spec.split("+"):
        name, _, arg = p.strip().partition(":")
        try:
            if name in ("capitals", "lowercase", "pig_latin") and not arg:
                parts.append({"capitals": Capitals, "lowercase": Lowercase, "pig_latin": PigLatin}[name]())
            elif name in ("start", "end", "mention") and re.fullmatch(r"[A-Za-z]+", arg):
                parts.append({"start": StartWith, "end": EndWith, "mention": Mention}[name](arg))
            elif name == "max_words" and arg.isdigit() and int(arg) >= 1:
                parts.append(MaxWords(int(arg)))
            else:
                raise ValueError(f"unknown constraint {p.strip()!r}: use capitals, lowercase, pig_latin, "
                                 f"start:WORD, end:WORD, mention:WORD, max_words:N, joined with +")
            result = combine(parts)
        except ValueError as e:
            raise LlamactlError(f"{e} ({where})") from None
    return result


def adherence(constraint: Constraint, responses: Sequence[str]) -> float:
    """Share of a dialogue's answers that keep the constraint (GAtt's multi-turn measure)."""
    return sum(constraint.check(r) for r in responses) / len(responses) if responses else 0.0


START_WORDS = ("Sure", "Well", "Okay", "Hello")
END_WORDS = ("banana", "indeed", "friend", "done")


def sample(rng: random.Random, max_parts: int = 2) -> Constraint:
    """A random constraint of 1..max_parts compatible kinds, with random words / lengths."""
    makers = {"case": lambda: rng.choice((Capitals(), Lowercase())),
              "language": PigLatin,
              "start": lambda: StartWith(rng.choice(START_WORDS)),
              "end": lambda: EndWith(rng.choice(END_WORDS)),
              "length": lambda: MaxWords(rng.randint(4, 8)),
              "mention": lambda: Mention(rng.choice(HOBBIES))}
    want = rng.randint(1, max_parts)
    chosen: list[str] = []
    for k in rng.sample(sorted(makers), len(makers)):
        if len(chosen) < want and all(frozenset((k, c)) not in _CONFLICTS for c in chosen):
            chosen.append(k)
    return combine([makers[k]() for k in chosen])
