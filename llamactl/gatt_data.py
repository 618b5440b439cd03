"""Ghost Attention's data (paper 3.3): instructions, multi-turn dialogues rolled out with a model, and the
training samples built from them; also the per-turn adherence that `gatt eval` reports.

Instructions are checkable constraints (`tasks.constraints`): the paper's three families made checkable --
hobby ("You enjoy chess." -> the answer mentions chess), language ("Always speak in pig latin."), public
figure ("Always act as Napoleon from now." -> the answer opens with the figure's name, its speaker tag) --
plus the task suite's own (capitals / lower case, start / end with a word, at most N words, mention a word)
and any the user adds (`parse_spec`, e.g. "figure:Napoleon+max_words:6"). Families are combined at random
(1..max_parts, never two of one kind nor contradictory ones) and half of the instructions are written in
their concise form ("Figure: Napoleon"). Figures are the invented people of the prompt set's fact items when
there are any (the model met them in pretraining; the paper likewise asked its own model for the lists, so
no instruction names someone the model never saw), else a short built-in list.

Sampling (`roll`): the instruction is joined to every user turn and the current model answers turn by turn,
each answer going back into the context. A tiny model rarely obeys on its own, so every answer is made to
keep the constraint: of `samples` answers the first that passes `check` is kept as it is (rejection by the
constraint's check, the paper's "process analogous to Rejection Sampling"), else the first is repaired with
`apply` (its content stays the model's own; the rule is enforced on it). Rejection alone would throw away
almost every dialogue of a model that has never seen these rules; repair alone would hide how often the
model already obeys (both counts are reported). The instruction repeated in every turn makes the sampling
context outgrow the training sample (where it appears once), and a tiny model pretrained on short windows
goes quiet far into its context: when the sampling context would overflow, or the model says nothing in
it, the model answers that turn on its own (instruction + user turn, no history). The answer stays the
model's, and the dialogue goes on until its training sample would not fit the context (`fits`); it stops
earlier only when no answer can be repaired (empty).

Training samples (`training_examples`): one dialogue gives samples ending at some of its turns; each keeps
the instruction only as the system message (folded into the first turn by the chat format), the user turns
without it, and `"loss": "last_turn"`: no token of an earlier turn -- assistant answers included -- carries
loss, so the earlier answers, sampled while the instruction was in every turn, are context only.
`ghost=False` is the ablation: the same answers with the instruction left in every user turn.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from llamactl.chat_data import SFTExample
from llamactl.errors import LlamactlError
from llamactl.tasks import constraints as C
from llamactl.tasks.world import HOBBIES
from llamactl.tokenizer import reserved_tag

FIGURES = ("Napoleon", "Cleopatra", "Shakespeare", "Einstein", "Mozart", "Gandhi")
LANGUAGES = ("pig latin",)
# built-in instruction families: the paper's three, then the task suite's
FAMILIES = ("hobby", "language", "figure", "case", "start", "end", "length", "mention")


# ---- the paper's families as checkable constraints ------------------------------------------------------
@dataclass(frozen=True)
class Hobby(C.Mention):
    """"You enjoy chess.": kept when the answer brings the hobby up."""

    @property
    def instruction(self) -> str: return f"You enjoy {self.word}."

    @property
    def short(self) -> str: return f"Hobby: {self.word}"

    @property
    def spec(self) -> str: return f"hobby:{self.word}"


@dataclass(frozen=True)
class Language(C.PigLatin):
    """"Always speak in pig latin." (the one language a program can check here)."""
    instruction = "Always speak in pig latin."
    short = "Language: pig latin"
    spec = "language:pig_latin"


@dataclass(frozen=True)
class Figure(C.Constraint):
    """"Always act as Napoleon from now.": the persona speaks under its own name ("Napoleon: ...").

    Of kind "start" (it owns the answer's first word), so it never combines with another start rule nor
    with pig latin, which would rewrite the name."""
    name: str
    kind = "start"

    @property
    def instruction(self) -> str: return f"Always act as {self.name} from now."

    @property
    def short(self) -> str: return f"Figure: {self.name}"

    @property
    def spec(self) -> str: return f"figure:{self.name}"

    def check(self, response: str) -> bool:
        w = response.split()
        return bool(w) and C._bare(w[0]) == self.name.casefold()

    def apply(self, text: str) -> str:
        return text if self.check(text) else f"{self.name}: {text}".strip()


def family(c: C.Constraint) -> str:
    """The instruction family a constraint belongs to (for per-family figures): hobby, language, figure,
    the suite's kinds, or "combined"."""
    if len(c.parts) > 1:
        return "combined"
    return {Hobby: "hobby", Language: "language", Figure: "figure"}.get(type(c), c.kind)


def parse_spec(spec: str, *, where: str = "--constraint") -> C.Constraint:
    """A constraint spec: the suite's ("capitals", "end:banana", "max_words:5", ...) or hobby:WORD,
    figure:NAME, language:pig_latin, joined with "+"; errors are one line ending in `where`."""
    parts: list[C.Constraint] = []
    for raw in spec.split("+"):
        name, _, arg = raw.strip().partition(":")
        if name in ("hobby", "figure", "language"):
            if name == "language" and arg == "pig_latin":
                parts.append(Language())
            elif name != "language" and re.fullmatch(r"[A-Za-z]+", arg):
                parts.append(Hobby(arg) if name == "hobby" else Figure(arg))
            else:
                want = "language:pig_latin" if name == "language" else f"{name}:WORD (letters only)"
                raise LlamactlError(f"bad constraint {raw.strip()!r}: use {want} ({where})")
        else:
            parts.append(C.parse(raw.strip(), where=where))
    try:
        return C.combine(parts)
    except ValueError as e:
        raise LlamactlError(f"{e} ({where})") from None


def read_constraints_file(path: Path, flag: str = "--constraints") -> list[C.Constraint]:
    """One spec per line (blank lines and # comments skipped); errors name file and line."""
    from llamactl.textfiles import check_text

    path = Path(path)
    if not path.is_file():
        raise LlamactlError(f"constraints file not found ({path}, {flag})")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="strict").splitlines(), 1):
        check_text(line, path, n, "spec", flag)
        s = line.split("#", 1)[0].strip()
        if s:
            out.append(parse_spec(s, where=f"{path}:{n}, {flag}"))
    if not out:
        raise LlamactlError(f"no constraints in {path} ({flag})")
    return out


def figures_from_prompts(items: Sequence) -> tuple[str, ...]:
    """The invented people the prompt set asks about ("entity" fields), else the built-in FIGURES."""
    names = sorted({it.fields["entity"] for it in items if isinstance(it.fields.get("entity"), str)
                    and re.fullmatch(r"[A-Za-z]+", it.fields["entity"])})
    return tuple(names) or FIGURES


@dataclass
class InstructionPool:
    """Where instructions come from: built-in families (`kinds`) and the user's own constraints."""

    kinds: tuple[str, ...] = FAMILIES
    user: tuple[C.Constraint, ...] = ()
    figures: tuple[str, ...] = FIGURES
    hobbies: tuple[str, ...] = HOBBIES
    max_parts: int = 2

    def __post_init__(self):
        bad = [k for k in self.kinds if k not in FAMILIES]
        if bad:
            raise LlamactlError(f"unknown instruction kind {bad[0]!r}; kinds are {', '.join(FAMILIES)} (--kinds)")
        if not self.kinds and not self.user:
            raise LlamactlError("no instructions to sample: give --kinds or --constraint / --constraints")
        if self.max_parts < 1:
            raise LlamactlError(f"--max-parts must be at least 1, got {self.max_parts} (--max-parts)")

    def _make(self, family: str, rng: random.Random) -> C.Constraint:
        if family == "user":
            return rng.choice(self.user)
        return {"hobby": lambda: Hobby(rng.choice(self.hobbies)),
                "language": Language,
                "figure": lambda: Figure(rng.choice(self.figures)),
                "case": lambda: rng.choice((C.Capitals(), C.Lowercase())),
                "start": lambda: C.StartWith(rng.choice(C.START_WORDS)),
                "end": lambda: C.EndWith(rng.choice(C.END_WORDS)),
                "length": lambda: C.MaxWords(rng.randint(4, 8)),
                "mention": lambda: C.Mention(rng.choice(self.hobbies))}[family]()

    def sample(self, rng: random.Random) -> C.Constraint:
        """1..max_parts families in random order, each kept if it combines with those already chosen."""
        families = list(self.kinds) + (["user"] if self.user else [])
        want = rng.randint(1, self.max_parts)
        chosen: list[C.Constraint] = []
        for fam in rng.sample(families, len(families)):
            if len(chosen) >= want:
                break
            new = self._make(fam, rng)
            try:
                C.combine(chosen + [new])
            except ValueError:
                continue
            chosen.append(new)
        return C.combine(chosen)


# ---- dialogues ----------------------------------------------------------------------------------------
# answer(dialogs ending with the user, k) -> k answers per dialog; fits(dialog) -> room left for an answer
AnswerFn = Callable[[list[list[dict]], int], list[list[str]]]
FitsFn = Callable[[list[dict]], bool]


def join(instruction: str, user: str) -> str:
    """The instruction concatenated to a user message (the sampling context)."""
    return f"{instruction} {user}"


def clean(text: str) -> str:
    """A model answer as dialogue content: cut at any chat-format tag it produced, stripped."""
    tag = reserved_tag(text)
    return (text[:text.index(tag)] if tag else text).strip()


@dataclass
class Dialogue:
    """One dialogue under one instruction: the user turns planned, the answers so far, and why it ended."""

    constraint: C.Constraint
    instruction: str                       # the text used (long or concise form)
    users: list[str]
    answers: list[str] = field(default_factory=list)
    kept: list[bool] = field(default_factory=list)   # per answer: True obeyed as sampled, False repaired
    stopped: Optional[str] = None          # None (running), "turns", "context", "empty"

    def context(self, every_turn: bool, alone: bool = False) -> list[dict]:
        """The dialogue up to the next user turn: the instruction in every user turn (sampling) or only as
        the system message (evaluation, as at inference); `alone`: the next user turn without the history."""
        msgs = [] if every_turn else [{"role": "system", "content": self.instruction}]
        for u, a in [] if alone else zip(self.users, self.answers):
            msgs += [{"role": "user", "content": join(self.instruction, u) if every_turn else u},
                     {"role": "assistant", "content": a}]
        u = self.users[len(self.answers)]
        return msgs + [{"role": "user", "content": join(self.instruction, u) if every_turn else u}]


def plan_dialogues(pool: InstructionPool, prompts: Sequence[str], *, dialogues: int, turns: int,
                   concise: float, seed: int, fixed: Sequence[C.Constraint] = ()) -> list[Dialogue]:
    """Instructions (from `fixed` in turn when given, else sampled; concise with probability `concise`) and
    user turns drawn from the prompts, all from one seeded generator."""
    if not prompts:
        raise LlamactlError("no prompts to build dialogues from (--prompts)")
    rng = random.Random(seed)
    out = []
    for i in range(dialogues):
        c = fixed[i % len(fixed)] if fixed else pool.sample(rng)
        text = c.text(short=rng.random() < concise)
        out.append(Dialogue(c, text, [rng.choice(prompts) for _ in range(turns)]))
    return out


def roll(dialogues: Sequence[Dialogue], answer: AnswerFn, fits: FitsFn, *, every_turn: bool, samples: int = 1,
         repair: bool = True, until: Optional[bool] = None,
         on_turn: Callable[[int, int], None] | None = None) -> None:
    """Advance every dialogue turn by turn (all dialogues batched per turn), in place.

    The model answers the `every_turn` form of the context; a dialogue stops when its `until` form (the
    form it will be used in; default the same) would overflow. With `repair` (building training data) a
    context too long to sample from, or one the model says nothing in, is replaced by the turn alone, and
    the kept answer is the first of `samples` that keeps the constraint, else the first repaired by
    `apply`; a dialogue whose answer cannot be made to keep it stops. Without (evaluation) the first answer
    is kept as it is and `kept` records whether it obeyed."""
    until = every_turn if until is None else until
    turns = max((len(d.users) for d in dialogues), default=0)
    for t in range(turns):
        live = []
        for d in dialogues:
            if d.stopped is None and t >= len(d.users):
                d.stopped = "turns"
            if d.stopped is None:
                if not fits(d.context(until)):
                    d.stopped = "context"
                    continue
                ctx = d.context(every_turn)
                if repair and until != every_turn and not fits(ctx):
                    ctx = d.context(every_turn, alone=True)
                live.append((d, ctx))
        if not live:
            break
        got = [[clean(a) for a in outs] for outs in answer([ctx for _, ctx in live], samples)]
        if repair:  # nothing said in the long context: the model answers the turn on its own
            quiet = [i for i, outs in enumerate(got) if not any(outs)]
            if quiet:
                alone = answer([live[i][0].context(every_turn, alone=True) for i in quiet], samples)
                for i, outs in zip(quiet, alone):
                    got[i] = [clean(a) for a in outs]
        for (d, _), outs in zip(live, got):
            if not repair:
                d.answers.append(outs[0])
                d.kept.append(d.constraint.check(outs[0]))
                continue
            pick = next((a for a in outs if a and d.constraint.check(a)), None)
            if pick is not None:
                d.answers.append(pick)
                d.kept.append(True)
                continue
            fixed = clean(d.constraint.apply(outs[0])) if outs[0] else ""
            if fixed and d.constraint.check(fixed):
                d.answers.append(fixed)
                d.kept.append(False)
            else:
                d.stopped = "empty"
        if on_turn is not None:
            on_turn(t + 1, len(live))
    for d in dialogues:
        if d.stopped is None:
            d.stopped = "turns"


def training_examples(d: Dialogue, rng: random.Random, per_dialogue: int, *, ghost: bool = True) -> list[SFTExample]:
    """Samples ending at `per_dialogue` turns of the dialogue drawn at random (0: every turn), loss on the
    last answer only. ghost: the instruction only as the system message; else in every user turn."""
    n = len(d.answers)
    if n == 0:
        return []
    ends = range(1, n + 1) if per_dialogue <= 0 or per_dialogue >= n else sorted(rng.sample(range(1, n + 1), per_dialogue))
    out = []
    for k in ends:
        msgs = [{"role": "system", "content": d.instruction}] if ghost else []
        for u, a in zip(d.users[:k], d.answers[:k]):
            msgs += [{"role": "user", "content": u if ghost else join(d.instruction, u)},
                     {"role": "assistant", "content": a}]
        out.append(SFTExample(msgs, extra={"constraint": d.constraint.spec, "turn": k}, loss="last_turn"))
    return out


# ---- adherence ----------------------------------------------------------------------------------------
def adherence_per_turn(dialogues: Sequence[Dialogue], turns: int) -> tuple[list[Optional[float]], list[int]]:
    """Per turn index 1..turns: the share of the dialogues that reached it whose answer kept the constraint
    (None where none reached it), and how many reached it."""
    adherence, reached = [], []
    for t in range(turns):
        oks = [d.constraint.check(d.answers[t]) for d in dialogues if len(d.answers) > t]
        reached.append(len(oks))
        adherence.append(sum(oks) / len(oks) if oks else None)
    return adherence, reached
