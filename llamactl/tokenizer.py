"""SentencePiece tokenizer with the Llama settings, and the Llama 2-Chat prompt format.

Llama's tokenizer is a SentencePiece BPE model: digits split into single pieces, unknown UTF-8
falls back to byte pieces <0x00>..<0xFF>, ids unk 0 / bos 1 / eos 2, no pad piece (pad_id -1),
no normalisation. `Tokenizer` loads any such `tokenizer.model` (Meta's or HF's included);
`train_tokenizer` trains a new one from text / JSONL / folders with those same settings.

The chat format is Meta's `chat_completion` (llama/generation.py) to the token: the system prompt
is folded into the first user turn between <<SYS>> tags, every finished user/assistant pair is its own
BOS ... EOS segment, the open user turn ends the prompt with `[/INST]`.
"""
from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional, Sequence

import sentencepiece as spm

from llamactl.errors import LlamactlError
from llamactl.textfiles import iter_sentences, list_input_files

MODEL_NAME = "tokenizer.model"


# ---- the tokenizer ----------------------------------------------------------------------------------
class Tokenizer:
    """A loaded SentencePiece model; `encode` adds BOS / EOS only when asked, like Meta's tokenizer."""

    def __init__(self, sp: spm.SentencePieceProcessor, path: Optional[Path] = None):
        self.sp = sp
        self.path = path
        self.vocab_size: int = sp.vocab_size()
        self.bos_id: int = sp.bos_id()
        self.eos_id: int = sp.eos_id()
        self.pad_id: int = sp.pad_id()
        self.unk_id: int = sp.unk_id()

    @classmethod
    def load(cls, path, *, where: Optional[str] = None) -> "Tokenizer":
        """Load `path` (a tokenizer.model, or a directory holding one, e.g. a checkpoint)."""
        path = Path(path)
        at = f" ({where})" if where else ""
        if path.is_dir():
            path = path / MODEL_NAME
        if not path.is_file():
            raise LlamactlError(f"tokenizer file not found: {path}{at}")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise LlamactlError(f"cannot read tokenizer {path}: {e.strerror or e}{at}") from None
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(data)
        except RuntimeError:
            hint = "; Hugging Face tokenizer.json files are not supported, use tokenizer.model" \
                if path.suffix == ".json" else ""
            raise LlamactlError(f"not a SentencePiece model: {path}{hint}{at}") from None
        return cls(sp, path)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, with BOS prepended / EOS appended on request."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__}")
        ids = self.sp.encode(text)
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        """`encode` for many texts at once (SentencePiece runs them on several threads)."""
        return self.sp.encode(list(texts), add_bos=bos, add_eos=eos)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; control ids (BOS / EOS) decode to nothing, byte pieces back to UTF-8."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]  # tensors / arrays too
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise LlamactlError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})"
                                f" of {self.path or 'the tokenizer'}")
        return self.sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


# ---- training ---------------------------------------------------------------------------------------
@dataclass
class TrainReport:
    """What `train` did, for the CLI table."""

    path: Path
    vocab_size: int
    sentences: int
    input_bytes: int
    skipped_long: int
    seconds: float
    bytes_per_token: float  # on (up to) the first 1 MB of input lines


def _check_out(out_dir: Path, overwrite: bool) -> None:
    """Refuse, before any work, an --out whose tokenizer.model would be replaced without being asked to.

    A checkpoint (llamactl.json) or prepared data folder (index.json) records its tokenizer by sha256:
    a new tokenizer there would silently break it, so those are refused even with overwrite.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise LlamactlError(f"{out_dir} is a file, not a directory (--out)")
    parent = next(p for p in [*out_dir.parents, Path(".")] if p.exists())  # checked now, not after training
    if not parent.is_dir():
        raise LlamactlError(f"cannot create {out_dir}: {parent} is a file (--out)")
    for marker, what in (("llamactl.json", "a checkpoint"), ("index.json", "a prepared data directory")):
        if (out_dir / marker).is_file():
            raise LlamactlError(f"{out_dir} is {what} ({marker}); its tokenizer must stay the one it was made with: "
                                f"write the new tokenizer to another directory (--out)")
    if (out_dir / MODEL_NAME).exists() and not overwrite:
        raise LlamactlError(f"{out_dir / MODEL_NAME} already exists; pass --overwrite to replace it or choose "
                            f"another directory (--out)")


def _vocab_error(msg: str, vocab_size: int) -> Optional[LlamactlError]:
    """Turn SentencePiece's vocabulary-size complaints into one line naming --vocab-size."""
    import re

    m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg)
    if m:
        return LlamactlError(f"--vocab-size {vocab_size} is too large for this corpus: at most {m.group(2)} "
                             f"pieces can be learned from it; lower --vocab-size or give more text")
    m = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", msg)
    if m:
        return LlamactlError(f"--vocab-size {vocab_size} is too small for this corpus: it needs at least "
                             f"{m.group(2)} (3 special + 256 byte pieces + its characters); raise --vocab-size")
    return None


def train(inputs: Sequence[Path], out_dir: Path, vocab_size: int, *, character_coverage: float = 0.99995,
          max_sentences: int = 10_000_000, max_sentence_length: int = 65536, seed: int = 0,
          num_threads: int = 16, show_progress: bool = False, overwrite: bool = False) -> TrainReport:
    """Train a Llama-style SentencePiece BPE model on `inputs`; write out_dir/tokenizer.model atomically.

    At most `max_sentences` lines are used (a seeded random sample when there are more), so the
    result is the same for the same inputs, settings and seed. Lines longer than
    `max_sentence_length` bytes are skipped (and counted). The pieces do not depend on
    `num_threads`, but SentencePiece records it in the model file, so the default is a fixed number
    (not the CPU count): the same inputs give byte-identical files on every machine. An existing
    out_dir/tokenizer.model is refused before anything is read, unless `overwrite`; it is replaced
    only by a complete, loadable model.
    """
    if vocab_size < 260:
        raise LlamactlError(f"--vocab-size {vocab_size} is too small: 3 special + 256 byte pieces need 259, "
                            f"plus the characters of the corpus")
    out_dir = Path(out_dir)
    _check_out(out_dir, overwrite)
    files = list_input_files(inputs)
    total = sum(f.stat().st_size for f in files)
    counts = {"sentences": 0, "bytes": 0, "skipped": 0, "sample_bytes": 0}
    sample: list[str] = []

    from llamactl.ui import progress

    bar = progress(transient=False, disable=not show_progress)
    read_task = bar.add_task("reading", total=max(total, 1))

    def on_bytes(n: int) -> None:
        counts["bytes"] += n
        if counts["bytes"] % (1 << 16) < n or counts["bytes"] == total:
            bar.update(read_task, completed=counts["bytes"])

    failed: list[LlamactlError] = []
    learn_task: list[int] = []

    def sentences() -> Iterator[str]:
        try:
            for f in files:
                for line in iter_sentences(f, on_bytes=on_bytes):
                    n = len(line.encode("utf-8"))
                    if n > max_sentence_length:
                        counts["skipped"] += 1
                        continue
                    counts["sentences"] += 1
                    if counts["sample_bytes"] < (1 << 20):
                        sample.append(line)
                        counts["sample_bytes"] += n
                    yield line
        except LlamactlError as e:  # an exception cannot cross SentencePiece's C++ loop: stop, re-raise after
            failed.append(e)
            return
        bar.update(read_task, completed=max(total, 1))
        learn_task.append(bar.add_task(f"learning {vocab_size:,} pieces", total=None))

    writer = io.BytesIO()
    spm.set_random_generator_seed(seed)
    start = time.perf_counter()
    with bar:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=sentences(), model_writer=writer,
                model_type="bpe", vocab_size=vocab_size, split_digits=True, byte_fallback=True,
                unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True, character_coverage=character_coverage,
                max_sentence_length=max_sentence_length, input_sentence_size=max_sentences,
                shuffle_input_sentence=True, max_sentencepiece_length=16, split_by_unicode_script=True,
                split_by_number=True, split_by_whitespace=True, vocabulary_output_piece_score=True,
                hard_vocab_limit=True, num_threads=num_threads,
                minloglevel=2)
            for t in learn_task:
                bar.update(t, total=1, completed=1)
        except RuntimeError as e:
            if failed:
                raise failed[0] from None
            if counts["sentences"] == 0:
                names = ", ".join(str(p) for p in inputs)
                raise LlamactlError(f"no text in the input ({names}) (--input)") from None
            err = _vocab_error(str(e), vocab_size)
            if err is None:
                raise LlamactlError(f"SentencePiece training failed: {str(e).splitlines()[0]}") from None
            raise err from None
    if failed:
        raise failed[0]
    seconds = time.perf_counter() - start
    data = writer.getvalue()

    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / MODEL_NAME
    tmp = out_dir / f".{MODEL_NAME}.tmp-{os.getpid()}"
    try:
        tmp.write_bytes(data)
        tok = Tokenizer.load(tmp)
        if overwrite:
            os.replace(tmp, final)
        else:
            try:
                os.link(tmp, final)  # fails if a tokenizer appeared meanwhile: never replaced unasked
            except FileExistsError:
                raise LlamactlError(f"{final} already exists; pass --overwrite to replace it (--out)") from None
            except OSError:  # a filesystem without hard links
                if final.exists():
                    raise LlamactlError(f"{final} already exists; pass --overwrite to replace it (--out)") from None
                os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    tok.path = final
    n_tokens = sum(len(t) for t in tok.encode_batch(sample)) if sample else 0
    return TrainReport(path=final, vocab_size=tok.vocab_size, sentences=counts["sentences"],
                       input_bytes=counts["bytes"], skipped_long=counts["skipped"], seconds=seconds,
                       bytes_per_token=counts["sample_bytes"] / max(n_tokens, 1))


def train_tokenizer(inputs: Sequence[Path], out_dir: Path, vocab_size: int, **kwargs) -> Path:
    """Train with the Llama settings (see `train`) and return the path of out_dir/tokenizer.model."""
    return train(inputs, out_dir, vocab_size, **kwargs).path


def piece_counts(tok: Tokenizer) -> dict[str, int]:
    """How the vocabulary splits: special ids, byte-fallback pieces, single characters, merged pieces."""
    sp = tok.sp
    out = {"special": 0, "byte": 0, "character": 0, "merged": 0}
    for i in range(tok.vocab_size):
        if sp.is_control(i) or sp.is_unknown(i):
            out["special"] += 1
        elif sp.is_byte(i):
            out["byte"] += 1
        elif len(sp.id_to_piece(i)) == 1:
            out["character"] += 1
        else:
            out["merged"] += 1
    return out


# ---- the Llama 2-Chat format ------------------------------------------------------------------------
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
ROLES = ("system", "user", "assistant")

Message = Mapping[str, str]


class DialogError(LlamactlError):
    """A dialog rule broken by one message: `index` is the message, `key` its "role" / "content" (or None).

    Readers of chat data files turn these into `file:line, field messages[i].content` locations.
    """

    def __init__(self, message: str, index: Optional[int] = None, key: Optional[str] = None):
        super().__init__(message)
        self.index, self.key = index, key


def reserved_tag(text: str) -> Optional[str]:
    """The first of [INST], [/INST], <<SYS>>, <</SYS>> in `text` (they would forge turn boundaries), or None."""
    return next((tag for tag in SPECIAL_TAGS if tag in text), None)


def validate_dialog(dialog: Sequence[Message], *, last: Optional[str] = None) -> None:
    """Refuse what Meta's chat_completion refuses (or silently mis-formats), with one clear line.

    Roles: an optional system message first, then user / assistant alternating, starting with user.
    `last` ("user" or "assistant") requires the dialog to end with that role. No message may
    contain [INST], [/INST], <<SYS>> or <</SYS>>: they would let content forge turn boundaries.
    Raises `DialogError` naming the message (and key) at fault.
    """
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise DialogError("a dialog is a non-empty list of {\"role\", \"content\"} messages")
    for i, msg in enumerate(dialog):
        if not isinstance(msg, Mapping):
            raise DialogError(f"message {i} must be an object with string \"role\" and \"content\"", i)
        for key in ("role", "content"):
            if not isinstance(msg.get(key), str):
                raise DialogError(f"message {i} must be an object with string \"role\" and \"content\"", i, key)
        if msg["role"] not in ROLES:
            raise DialogError(f"message {i} has role {msg['role']!r}; roles are system, user, assistant", i, "role")
        tag = reserved_tag(msg["content"])
        if tag:
            raise DialogError(f"message {i} ({msg['role']}) contains the reserved tag {tag}; "
                              f"messages may not contain {', '.join(SPECIAL_TAGS)}", i, "content")
    turns = dialog[1:] if dialog[0]["role"] == "system" else dialog
    if not turns:
        raise DialogError("a dialog needs a user message after the system message", len(dialog) - 1, "role")
    for i, msg in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != want:
            at = i + (len(dialog) - len(turns))
            what = "only the first message may be the system prompt" if msg["role"] == "system" else \
                "roles must alternate user / assistant, starting with user"
            raise DialogError(f"message {at} is {msg['role']!r} where {want!r} was expected: {what}", at, "role")
    if last is not None and turns[-1]["role"] != last:
        raise DialogError(f"the last message must be from the {last}, got {turns[-1]['role']!r}",
                          len(dialog) - 1, "role")


def _fold_system(dialog: Sequence[Message]) -> list[dict]:
    """Meta's folding: system text goes into the first user turn between <<SYS>> tags."""
    dialog = [dict(role=m["role"], content=m["content"]) for m in dialog]
    if dialog[0]["role"] == "system":
        first = {"role": dialog[1]["role"], "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}
        dialog = [first] + dialog[2:]
    return dialog


def _pair_texts(user: str, answer: str) -> tuple[str, str]:
    """(prompt text, whole pair text) of one finished turn; the prompt text is a prefix of the pair."""
    prompt = f"{B_INST} {user.strip()} {E_INST}"
    return prompt, f"{prompt} {answer.strip()} "


def encode_dialog(tok: Tokenizer, dialog: Sequence[Message]) -> list[int]:
    """The prompt Meta's chat_completion feeds the model: finished pairs, then BOS [INST] user [/INST]."""
    validate_dialog(dialog, last="user")
    d = _fold_system(dialog)
    ids: list[int] = []
    for u, a in zip(d[:-1:2], d[1::2]):
        ids += tok.encode(_pair_texts(u["content"], a["content"])[1], bos=True, eos=True)
    ids += tok.encode(_pair_texts(d[-1]["content"], "")[0], bos=True, eos=False)
    return ids


def dialog_turns(tok: Tokenizer, dialog: Sequence[Message]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per finished user/assistant pair, for SFT loss masks.

    prompt = BOS "[INST] {user} [/INST]", answer = " {answer} " EOS, and prompt + answer is exactly
    the pair's tokens as `encode_dialog` / Meta encode it (the whole pair is encoded at once and split
    where the prompt's own tokens end). Concatenating all pairs gives the training sequence. The
    dialog must end with an assistant message.
    """
    validate_dialog(dialog, last="assistant")
    d = _fold_system(dialog)
    out = []
    for u, a in zip(d[0::2], d[1::2]):
        prompt_text, pair_text = _pair_texts(u["content"], a["content"])
        whole = tok.encode(pair_text, bos=True, eos=True)
        prompt = tok.encode(prompt_text, bos=True)
        k = len(prompt)
        if whole[:k] != prompt:  # cannot happen with whitespace pre-splitting; be exact anyway
            k = next(i for i, (x, y) in enumerate(zip(whole, prompt)) if x != y)
        out.append((whole[:k], whole[k:]))
    return out


# ---- helpers for the command line -------------------------------------------------------------------
def read_dialog(path) -> list[dict]:
    """A dialog JSON file: a list of {"role", "content"} messages (or {"messages": [...]}), validated."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LlamactlError(f"dialog file not found: {path} (--chat)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LlamactlError(f"cannot read dialog file {path}: {e} (--chat)") from None
    except json.JSONDecodeError as e:
        raise LlamactlError(f"bad JSON in {path}:{e.lineno}: {e.msg} (--chat)") from None
    if isinstance(obj, dict) and "messages" in obj:
        obj = obj["messages"]
    try:
        validate_dialog(obj, last="user")
    except LlamactlError as e:
        raise LlamactlError(f"{e} ({path}, --chat)") from None
    return obj


def parse_ids(values: Sequence[str]) -> list[int]:
    """Token ids given as separate arguments, comma/space separated, or one JSON list."""
    text = " ".join(values).strip()
    try:
        if text.startswith("["):
            ids = json.loads(text)
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise ValueError
            return ids
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise LlamactlError(f"token ids must be integers (as arguments or a JSON list), got {text[:60]!r}") from None
