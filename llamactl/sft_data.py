"""SFT samples as the model trains on them: Llama 2-Chat tokens with a loss mask, packed into fixed rows.

`encode_sft` builds on the chat encoder (`tokenizer.dialog_turns`): each finished user/assistant pair is
BOS "[INST] user [/INST]" (mask 0) + " answer " EOS (mask 1), so the loss falls exactly on the answer
tokens of every assistant turn, EOS included, and never on a system, user or format token.
`encode_example` honours an SFT line's "loss" field: "last_turn" keeps the loss on the final answer only.
`encode_pair` gives a preference pair's two sequences (prompt + each answer) the same way.

`pack` concatenates encoded samples, in the order given, into rows of `seq_len + 1` tokens (one window:
inputs [:-1], targets [1:], as in pretraining), carrying the mask along, with a per-token document id
(the sample's index; -1 on padding) so attention can be kept inside each sample. A sample that does not
fit in the rest of a row starts the next one (samples are never split); one longer than a whole row is
truncated or refused, as the caller chooses. The padding is EOS with mask 0.

`SFTBatches` is the trainer's batch source: per epoch a seeded shuffle of the samples, packed; its
state is (seed, epoch, position) like the pretraining sampler, and data-parallel ranks take slices of
the same global rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from llamactl.data import Batch
from llamactl.errors import LlamactlError
from llamactl.tokenizer import Tokenizer, dialog_turns

OVERFLOW = ("truncate", "refuse")


def encode_sft(tok: Tokenizer, messages: Sequence[dict], *, last_turn_only: bool = False) -> tuple[list[int], list[int]]:
    """(tokens, mask) of one dialogue ending with the assistant; mask 1 exactly on answer tokens.

    `last_turn_only` keeps the loss on the final answer alone (GAtt trains only the last turn).
    """
    turns = dialog_turns(tok, messages)
    tokens: list[int] = []
    mask: list[int] = []
    for i, (prompt, answer) in enumerate(turns):
        on = 0 if last_turn_only and i < len(turns) - 1 else 1
        tokens += prompt + answer
        mask += [0] * len(prompt) + [on] * len(answer)
    return tokens, mask


def encode_example(tok: Tokenizer, example) -> tuple[list[int], list[int]]:
    """(tokens, mask) of a `chat_data.SFTExample`, its loss scope applied ("last_turn": GAtt's samples)."""
    return encode_sft(tok, example.messages, last_turn_only=getattr(example, "loss", "all_turns") == "last_turn")


def encode_pair(tok: Tokenizer, prompt: Sequence[dict], chosen: str, rejected: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt + chosen and prompt + rejected in the chat format, each ending with the answer's
    EOS: the sequences a reward model scores (at their last token). Same tokens as `encode_sft`."""
    return tuple(encode_sft(tok, list(prompt) + [{"role": "assistant", "content": a}])[0]  # type: ignore[return-value]
                 for a in (chosen, rejected))


@dataclass
class PackedRows:
    """Rows of seq_len + 1 tokens; `loss_mask` marks answer tokens, `doc_ids` the sample of each token."""

    tokens: np.ndarray     # (N, L) int64
    loss_mask: np.ndarray  # (N, L) bool: the token is an answer token (counts where it is a target)
    doc_ids: np.ndarray    # (N, L) int64: index of the sample the token comes from, -1 on padding

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, rows: Optional[Sequence[int]] = None) -> Batch:
        """A training micro-batch of these rows: targets counted only where they are answer tokens."""
        sel = slice(None) if rows is None else np.asarray(rows, dtype=np.int64)
        t, m, d = self.tokens[sel], self.loss_mask[sel], self.doc_ids[sel]
        return Batch.from_windows(t, m[:, 1:], doc_ids=d[:, :-1])


def positions(doc_ids: np.ndarray) -> np.ndarray:
    """Position of each token inside its own sample (0 at each sample's first token), rows (N, L)."""
    doc_ids = np.asarray(doc_ids)
    n, length = doc_ids.shape
    idx = np.broadcast_to(np.arange(length), (n, length))
    start = np.ones_like(doc_ids, dtype=bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = np.maximum.accumulate(np.where(start, idx, 0), axis=1)
    return idx - first


def _too_long(i: int, n: int, seq_len: int, name: Optional[str]) -> LlamactlError:
    where = f" ({name})" if name else ""
    return LlamactlError(f"sample {i}{where} has {n} tokens, more than a row of --seq-len {seq_len} + 1; "
                         f"raise --seq-len or let long samples be truncated")


def iter_packed(samples: Iterable[tuple[Sequence[int], Sequence[int]]], seq_len: int, *, pad_id: int,
                overflow: str = "truncate", names: Optional[Sequence[str]] = None,
                first_id: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Rows (tokens, mask, doc_ids) of length seq_len + 1, streamed; see the module docstring."""
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow must be one of {OVERFLOW}, got {overflow!r}")
    if seq_len < 1:
        raise LlamactlError(f"sequence length must be at least 1, got {seq_len} (--seq-len)")
    width = seq_len + 1
    tokens = np.full(width, pad_id, dtype=np.int64)
    mask = np.zeros(width, dtype=bool)
    docs = np.full(width, -1, dtype=np.int64)
    used = 0

    def flush():
        nonlocal tokens, mask, docs, used
        row = (tokens, mask, docs)
        tokens = np.full(width, pad_id, dtype=np.int64)
        mask = np.zeros(width, dtype=bool)
        docs = np.full(width, -1, dtype=np.int64)
        used = 0
        return row

    for i, (ids, m) in enumerate(samples):
        if len(ids) != len(m):
            raise ValueError(f"sample {i}: {len(ids)} tokens but {len(m)} mask values")
        if not len(ids):
            continue
        if len(ids) > width:
            if overflow == "refuse":
                raise _too_long(first_id + i, len(ids), seq_len, names[i] if names is not None else None)
            ids, m = ids[:width], m[:width]
        if used + len(ids) > width:
            yield flush()
        tokens[used:used + len(ids)] = ids
        mask[used:used + len(ids)] = np.asarray(m, dtype=bool)
        docs[used:used + len(ids)] = first_id + i
        used += len(ids)
        if used == width:
            yield flush()
    if used:
        yield flush()


def pack(samples: Iterable[tuple[Sequence[int], Sequence[int]]], seq_len: int, *, pad_id: int,
         overflow: str = "truncate", names: Optional[Sequence[str]] = None) -> PackedRows:
    """All rows of `iter_packed` as arrays."""
    rows = list(iter_packed(samples, seq_len, pad_id=pad_id, overflow=overflow, names=names))
    width = seq_len + 1
    if not rows:
        return PackedRows(np.zeros((0, width), np.int64), np.zeros((0, width), bool), np.zeros((0, width), np.int64))
    return PackedRows(*(np.stack(parts) for parts in zip(*rows)))


class SFTBatches:
    """Micro-batches of packed SFT rows for one optimizer step, reshuffled and repacked every epoch.

    The samples (already encoded) are ordered by a permutation drawn from (seed, epoch) and packed; a
    step takes micro_batch * accum * dp rows of the global order and each data-parallel rank keeps its
    slice, so the state is (seed, epoch, position) and does not depend on the number of ranks.
    """

    def __init__(self, samples: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int, *, pad_id: int,
                 micro_batch: int, accum: int = 1, dp: int = 1, dp_rank: int = 0, seed: int = 0,
                 overflow: str = "truncate", names: Optional[Sequence[str]] = None):
        if not samples:
            raise LlamactlError("no SFT samples to train on (--data)")
        self.samples, self.seq_len, self.pad_id, self.overflow = samples, seq_len, pad_id, overflow
        self.micro_batch, self.accum, self.dp, self.dp_rank, self.seed = micro_batch, accum, dp, dp_rank, seed
        if overflow not in OVERFLOW:
            raise ValueError(f"overflow must be one of {OVERFLOW}, got {overflow!r}")
        long = [i for i, (ids, _) in enumerate(samples) if len(ids) > seq_len + 1]
        if long and overflow == "refuse":  # up front, not at the epoch that would reach them
            i = long[0]
            raise _too_long(i, len(samples[i][0]), seq_len, names[i] if names is not None else None)
        self.truncated = len(long)  # samples cut to one row (a stage reports it)
        self.epoch, self.position = 0, 0
        self._rows: Optional[PackedRows] = None

    def rows(self) -> PackedRows:
        """This epoch's packed rows (samples in the epoch's seeded order; doc ids are sample indices)."""
        if self._rows is None:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.samples))
            rows = list(iter_packed((self.samples[i] for i in order), self.seq_len, pad_id=self.pad_id,
                                    overflow=self.overflow))
            packed = PackedRows(*(np.stack(parts) for parts in zip(*rows)))
            packed.doc_ids = np.where(packed.doc_ids >= 0, order[np.maximum(packed.doc_ids, 0)], -1)
            self._rows = packed
        return self._rows

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch * self.accum * self.dp

    def _take(self, n: int) -> list[tuple[int, int]]:
        """(epoch, row) of the next n global rows, crossing epochs as needed."""
        out = []
        for _ in range(n):
            if self.position >= len(self.rows()):
                self.epoch, self.position, self._rows = self.epoch + 1, 0, None
            out.append((self.epoch, self.position))
            self.position += 1
        return out

    def next_step(self) -> list[Batch]:
        per_rank = self.micro_batch * self.accum
        picks = self._take(per_rank * self.dp)[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        cache: dict[int, PackedRows] = {}
        tokens, mask, docs = [], [], []
        for epoch, r in picks:
            if epoch not in cache:
                cache[epoch] = self.rows() if epoch == self.epoch else self._epoch_rows(epoch)
            p = cache[epoch]
            tokens.append(p.tokens[r])
            mask.append(p.loss_mask[r])
            docs.append(p.doc_ids[r])
        allr = PackedRows(np.stack(tokens), np.stack(mask), np.stack(docs))
        mb = self.micro_batch
        return [allr.batch(range(i * mb, (i + 1) * mb)) for i in range(self.accum)]

    def _epoch_rows(self, epoch: int) -> PackedRows:
        saved = self.epoch, self._rows
        self.epoch, self._rows = epoch, None
        try:
            return self.rows()
        finally:
            self.epoch, self._rows = saved

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, s: dict) -> None:
        if int(s["seed"]) != self.seed:
            raise LlamactlError(f"resume with --seed {self.seed} but the run used seed {int(s['seed'])} (--seed)")
        self.epoch, self.position, self._rows = int(s["epoch"]), int(s["position"]), None
