"""Rejection sampling's pool and its arithmetic (paper section 3.2.3).

The pool keeps, for every prompt ever sampled, the best answer found in this and all earlier iterations
(the paper's fix for the forgetting of RLHF V3, which had selected only from the previous iteration's
"bag"): a prompt's entry is replaced only by a strictly higher reward, so merging the same samples twice
changes nothing and a rerun after a crash is harmless. It is one JSON file, `DIR/pool.json`, written
through a temporary file and a rename:

    {"version": 1,
     "iterations": [{"iteration": i, "run": RUN, "stats": {...rs.json's entry...}}, ...],
     "entries": {KEY: {"messages": [...], "safety": bool, "response": str, "reward": R_c,
                       "reward_helpful": R_h, "reward_safety": R_s, "iteration": i, "temperature": T,
                       "fields": {the prompt line's other keys}}}}

KEY identifies a prompt by its dialogue (sha256 of the messages' JSON), so the same prompt read from
another prompt file still meets its entry. Two runs that share a pool merge one after the other: each
holds `DIR/.pool.lock` (an exclusive flock) from reading the pool to writing it (`locked`), so neither
overwrites what the other added.

`best_of_n` is Figure 7's arithmetic: the mean over prompts of the max and of the median reward among the
first N samples of each prompt, N = 1..K.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from llamactl.errors import LlamactlError

POOL_FILE = "pool.json"
LOCK_FILE = ".pool.lock"
VERSION = 1


@contextlib.contextmanager
def locked(directory, flag: str = "--pool", notify=None):
    """Hold the pool directory's lock (created with the directory when missing) for the block; another run
    holding it is waited for (`notify(message)` is called once first)."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise LlamactlError(f"{d} is not a directory ({flag})")
    d.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no POSIX locks on this platform: one run per pool at a time is the user's to keep
        yield
        return
    with open(d / LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if notify is not None:
                notify(f"waiting for another rejection-sampling run to finish merging into {d}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prompt_key(messages: Sequence[dict]) -> str:
    """A prompt's identity in the pool: sha256 of its dialogue (roles and contents)."""
    text = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def best_of_n(rewards: Sequence[Sequence[float]]) -> tuple[list[float], list[float]]:
    """(max, median) per N = 1..K: mean over prompts of the max / median of each prompt's first N rewards
    (the median of an even count is the mean of the middle two). Every prompt needs the same K >= 1."""
    import numpy as np

    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] == 0 or r.shape[1] == 0:
        raise ValueError(f"need a (prompts, K) table of rewards with K >= 1, got shape {r.shape}")
    k = r.shape[1]
    mx = [float(r[:, :n].max(axis=1).mean()) for n in range(1, k + 1)]
    md = [float(np.median(r[:, :n], axis=1).mean()) for n in range(1, k + 1)]
    return mx, md


@dataclass
class Candidate:
    """One scored answer offered to the pool."""

    key: str
    messages: list
    safety: bool
    response: str
    reward: float
    reward_helpful: float
    reward_safety: float
    temperature: float
    fields: dict = field(default_factory=dict)


@dataclass
class Pool:
    """The best answer per prompt across iterations (see the module doc)."""

    path: Path
    entries: dict = field(default_factory=dict)
    iterations: list = field(default_factory=list)

    @classmethod
    def load(cls, directory, flag: str = "--pool") -> "Pool":
        """The pool in `directory` (an empty one when it has no pool.json yet)."""
        d = Path(directory)
        if d.exists() and not d.is_dir():
            raise LlamactlError(f"{d} is not a directory ({flag})")
        p = d / POOL_FILE
        if not p.is_file():
            return cls(p)
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise LlamactlError(f"cannot read the pool: {e} ({p}, {flag})") from None
        if not isinstance(obj, dict) or obj.get("version") != VERSION or not isinstance(obj.get("entries"), dict):
            raise LlamactlError(f"not a rejection-sampling pool (version {VERSION}) ({p}, {flag})")
        return cls(p, obj["entries"], list(obj.get("iterations", [])))

    def next_iteration(self) -> int:
        return max((int(it["iteration"]) for it in self.iterations), default=0) + 1

    def merge(self, candidates: Sequence[Candidate], iteration: int) -> dict:
        """Offer every candidate; a prompt's entry changes only for a strictly higher reward. Returns the
        counts {"added", "replaced", "kept"} (per prompt: new, improved, unchanged)."""
        best: dict[str, Candidate] = {}
        for c in candidates:  # the best of this iteration per prompt (the first of equals)
            if c.key not in best or c.reward > best[c.key].reward:
                best[c.key] = c
        counts = {"added": 0, "replaced": 0, "kept": 0}
        for key, c in best.items():
            old = self.entries.get(key)
            if old is not None and not c.reward > float(old["reward"]):
                counts["kept"] += 1
                continue
            counts["replaced" if old is not None else "added"] += 1
            self.entries[key] = {"messages": c.messages, "safety": bool(c.safety), "response": c.response,
                                 "reward": float(c.reward), "reward_helpful": float(c.reward_helpful),
                                 "reward_safety": float(c.reward_safety), "iteration": int(iteration),
                                 "temperature": float(c.temperature), "fields": c.fields}
        return counts

    def record(self, iteration: int, run: str, stats: dict) -> None:
        """Note an iteration's figures (replacing an earlier note of the same iteration number)."""
        self.iterations = [it for it in self.iterations if int(it["iteration"]) != iteration]
        self.iterations.append({"iteration": int(iteration), "run": str(run), "stats": stats})
        self.iterations.sort(key=lambda it: int(it["iteration"]))

    @property
    def mean_reward(self) -> Optional[float]:
        return sum(float(e["reward"]) for e in self.entries.values()) / len(self.entries) if self.entries else None

    def save(self) -> Path:
        from llamactl.tasks.suite import write_text_atomic

        obj = {"version": VERSION, "iterations": self.iterations, "entries": self.entries}
        return write_text_atomic(self.path, json.dumps(obj, ensure_ascii=False) + "\n", "--pool")

    def sft_rows(self) -> list[dict]:
        """The pool as SFT dialogues (prompt dialogue + best answer), in a stable order (by key); the prompt's
        own fields are kept beside, as the SFT reader keeps unknown keys."""
        rows = []
        for key in sorted(self.entries):
            e = self.entries[key]
            rows.append({"messages": list(e["messages"]) + [{"role": "assistant", "content": e["response"]}],
                         "rs_key": key, "rs_reward": e["reward"], "rs_iteration": e["iteration"]})
        return rows
