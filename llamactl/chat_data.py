"""The data files of the chat stages: SFT dialogues, preference pairs and prompt sets (JSONL).

One JSON object per line (blank lines skipped), read through `llamactl.textfiles` (UTF-8, binary files
refused) and streamed; every line is validated and a fault is one line naming file, line and field:
`<what> (<file>:<line>, field <field>, <flag>)`.

    SFT          {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
                 or {"prompt": ..., "response": ...}; optional "loss": "all_turns" (default: every
                 assistant turn carries loss) or "last_turn" (only the final answer: Ghost Attention)
    preferences  {"prompt" | "messages", "chosen", "rejected", "rating"?, "safety"?}
    prompts      {"prompt" | "messages", "safety"?, ...task fields (kept as they are)}
    responses    {"prompt" | "messages", "response", ...}   (answers to score, e.g. `rm score`)

Dialogue rules (the chat encoder's, `tokenizer.validate_dialog`): an optional leading system message,
then user / assistant alternating from user; an SFT dialogue ends with the assistant, a prompt (also
the prompt of a pair) with the user; every content is a non-empty string without [INST], [/INST],
<<SYS>> or <</SYS>>. Ratings are the paper's four (`RATINGS`); "unsure" counts as negligibly_better.
`write_jsonl` writes any of these atomically, validating every row first, so a file is whole or absent.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, TypeVar

from llamactl.errors import LlamactlError
from llamactl.textfiles import check_text, iter_jsonl
from llamactl.tokenizer import DialogError, reserved_tag, validate_dialog

LOSS_SCOPES = ("all_turns", "last_turn")  # which assistant turns of an SFT dialogue carry loss
RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")
RATING_ALIASES = {"unsure": "negligibly_better"}


@dataclass
class SFTExample:
    """One dialogue to imitate: system? user assistant (user assistant)*."""

    messages: list[dict]
    where: str = ""                      # "file:line", for messages about this example later on
    extra: dict = field(default_factory=dict)  # other keys of the line, kept
    loss: str = "all_turns"              # one of LOSS_SCOPES: "last_turn" trains the final answer only

    def to_json(self) -> dict:
        out = {"messages": self.messages, **self.extra}
        if self.loss != "all_turns":
            out["loss"] = self.loss
        return out


@dataclass
class PreferencePair:
    """Two answers to one prompt, the chosen one preferred by `rating` (None: not rated)."""

    prompt: list[dict]                   # a dialogue ending with the user turn being answered
    chosen: str
    rejected: str
    rating: Optional[str] = None         # one of RATINGS
    safety: Optional[bool] = None
    where: str = ""
    extra: dict = field(default_factory=dict)

    def dialog(self, which: str) -> list[dict]:
        """The prompt followed by the chosen or rejected answer: what a reward model scores."""
        return self.prompt + [{"role": "assistant", "content": self.chosen if which == "chosen" else self.rejected}]

    def to_json(self) -> dict:
        out = _prompt_json(self.prompt)
        out.update(chosen=self.chosen, rejected=self.rejected)
        if self.rating is not None:
            out["rating"] = self.rating
        if self.safety is not None:
            out["safety"] = self.safety
        return {**out, **self.extra}


@dataclass
class PromptItem:
    """A prompt to answer (rejection sampling, PPO, evaluation) with the task fields its scorer needs."""

    messages: list[dict]                 # a dialogue ending with the user turn
    safety: Optional[bool] = None
    fields: dict = field(default_factory=dict)  # every other key of the line, as it was
    where: str = ""

    @property
    def prompt(self) -> str:
        """The last user message."""
        return self.messages[-1]["content"]

    def to_json(self) -> dict:
        out = _prompt_json(self.messages)
        if self.safety is not None:
            out["safety"] = self.safety
        return {**out, **self.fields}


@dataclass
class ResponseItem:
    """An answer to a prompt, to be scored; every other key of the line is kept (written back with the score)."""

    prompt: list[dict]                   # a dialogue ending with the user turn
    response: str
    where: str = ""
    extra: dict = field(default_factory=dict)

    def dialog(self) -> list[dict]:
        return self.prompt + [{"role": "assistant", "content": self.response}]

    def to_json(self) -> dict:
        return {**_prompt_json(self.prompt), "response": self.response, **self.extra}


def _prompt_json(messages: list[dict]) -> dict:
    """A lone user turn is written back as "prompt", anything longer as "messages"."""
    if len(messages) == 1:
        return {"prompt": messages[0]["content"]}
    return {"messages": messages}


# ---- validation ---------------------------------------------------------------------------------------
class Line:
    """Where a line came from; `fail` makes the one-line error naming file, line and field, `text` checks
    a string field. Readers of other line formats build on it (with `prompt_messages`)."""

    def __init__(self, path: Path, lineno: int, flag: str):
        self.path, self.lineno, self.flag = path, lineno, flag

    def __str__(self) -> str:
        return f"{self.path}:{self.lineno}"

    def fail(self, what: str, field_name: Optional[str] = None) -> LlamactlError:
        at = f", field {field_name}" if field_name else ""
        return LlamactlError(f"{what} ({self.path}:{self.lineno}{at}, {self.flag})")

    def text(self, obj: dict, key: str, field_name: Optional[str] = None) -> str:
        """obj[key] as a non-empty string without the chat format's reserved tags."""
        name = field_name or key
        value = obj.get(key)
        if key not in obj:
            raise self.fail(f'missing "{key}"', name)
        if not isinstance(value, str):
            raise self.fail(f"must be a string, got {type(value).__name__}", name)
        check_text(value, self.path, self.lineno, name, self.flag)
        if not value.strip():
            raise self.fail("must not be empty", name)
        tag = reserved_tag(value)
        if tag:
            raise self.fail(f"contains the reserved tag {tag} (the chat format's own markers are refused)", name)
        return value


def _dialog(obj: dict, at: Line, last: str) -> list[dict]:
    """obj["messages"] checked by the chat encoder's rules plus non-empty content; ends with `last`."""
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise at.fail("must be a non-empty list of {\"role\", \"content\"} messages", "messages")
    try:
        validate_dialog(msgs, last=last)
    except DialogError as e:
        name = "messages" if e.index is None else f"messages[{e.index}]" + (f".{e.key}" if e.key else "")
        raise at.fail(str(e), name) from None
    for i, m in enumerate(msgs):
        at.text(m, "content", f"messages[{i}].content")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def prompt_messages(obj: dict, at: Line) -> tuple[list[dict], set[str]]:
    """The dialogue asked about: "prompt" (one user turn) or "messages" (ending with the user), and the
    key it came from."""
    if "prompt" in obj and "messages" in obj:
        raise at.fail('give "prompt" or "messages", not both', "messages")
    if "messages" in obj:
        return _dialog(obj, at, last="user"), {"messages"}
    if "prompt" not in obj:
        raise at.fail('missing "prompt" (or "messages")', "prompt")
    return [{"role": "user", "content": at.text(obj, "prompt")}], {"prompt"}


def _safety(obj: dict, at: Line) -> Optional[bool]:
    value = obj.get("safety")
    if value is not None and not isinstance(value, bool):
        raise at.fail(f"must be true or false, got {json.dumps(value)}", "safety")
    return value


def parse_sft(obj: dict, at: Line) -> SFTExample:
    if "messages" in obj:
        if "prompt" in obj or "response" in obj:
            raise at.fail('give "messages" or "prompt" + "response", not both', "messages")
        msgs, used = _dialog(obj, at, last="assistant"), {"messages"}
    elif "prompt" in obj or "response" in obj:
        msgs = [{"role": "user", "content": at.text(obj, "prompt")},
                {"role": "assistant", "content": at.text(obj, "response")}]
        used = {"prompt", "response"}
    else:
        raise at.fail('missing "messages" (or "prompt" + "response")', "messages")
    loss = obj.get("loss", "all_turns")
    if loss not in LOSS_SCOPES:
        raise at.fail(f"must be one of {', '.join(LOSS_SCOPES)}, got {json.dumps(loss)}", "loss")
    used |= {"loss"}
    return SFTExample(msgs, str(at), {k: v for k, v in obj.items() if k not in used}, loss)


def parse_preference(obj: dict, at: Line) -> PreferencePair:
    prompt, used = prompt_messages(obj, at)
    chosen, rejected = at.text(obj, "chosen"), at.text(obj, "rejected")
    if chosen.strip() == rejected.strip():
        raise at.fail("is the same answer as chosen: a pair needs two different answers", "rejected")
    rating = obj.get("rating")
    if rating is not None:
        if not isinstance(rating, str) or RATING_ALIASES.get(rating, rating) not in RATINGS:
            raise at.fail(f"must be one of {', '.join(RATINGS)} (or unsure), got {json.dumps(rating)}", "rating")
        rating = RATING_ALIASES.get(rating, rating)
    used |= {"chosen", "rejected", "rating", "safety"}
    return PreferencePair(prompt, chosen, rejected, rating, _safety(obj, at), str(at),
                          {k: v for k, v in obj.items() if k not in used})


def parse_prompt(obj: dict, at: Line) -> PromptItem:
    msgs, used = prompt_messages(obj, at)
    used |= {"safety"}
    return PromptItem(msgs, _safety(obj, at), {k: v for k, v in obj.items() if k not in used}, str(at))


def parse_response(obj: dict, at: Line) -> ResponseItem:
    prompt, used = prompt_messages(obj, at)
    response = at.text(obj, "response")
    used |= {"response"}
    return ResponseItem(prompt, response, str(at), {k: v for k, v in obj.items() if k not in used})


# ---- files --------------------------------------------------------------------------------------------
T = TypeVar("T")
PARSERS: dict[str, Callable[[dict, Line], object]] = {
    "sft": parse_sft, "preferences": parse_preference, "prompts": parse_prompt, "responses": parse_response}


def read_records(path: Path, kind: str, flag: str = "--data") -> Iterator:
    """Validated records of one file, streamed in file order ("sft", "preferences", "prompts", "responses")."""
    parse = PARSERS[kind]
    for lineno, obj in iter_jsonl(Path(path), flag):
        yield parse(obj, Line(Path(path), lineno, flag))


def load_records(path: Path, kind: str, flag: str = "--data") -> list:
    """All records of a file (validated whole before anything uses them); an empty file is an error."""
    out = list(read_records(path, kind, flag))
    if not out:
        raise LlamactlError(f"no {kind} records in {path} ({flag})")
    return out


def read_sft(path: Path, flag: str = "--data") -> Iterator[SFTExample]:
    return read_records(path, "sft", flag)


def read_preferences(path: Path, flag: str = "--data") -> Iterator[PreferencePair]:
    return read_records(path, "preferences", flag)


def read_prompts(path: Path, flag: str = "--prompts") -> Iterator[PromptItem]:
    return read_records(path, "prompts", flag)


def write_jsonl(path: Path, rows: Iterable, kind: Optional[str] = None, flag: str = "--out") -> int:
    """Write rows (dicts or records with to_json) as JSONL, atomically; with `kind`, each row is validated
    first by the same parser the readers use. Returns the number of rows; on error nothing changes."""
    path = Path(path)
    if path.is_dir():
        raise LlamactlError(f"{path} is a directory (--out names a file here) ({flag})")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for n, row in enumerate(rows, 1):
                obj = row.to_json() if hasattr(row, "to_json") else row
                if kind is not None:
                    if not isinstance(obj, dict):
                        raise LlamactlError(f"row {n} is a {type(obj).__name__}, not an object ({path}, {flag})")
                    PARSERS[kind](obj, Line(path, n, flag))
                f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n
