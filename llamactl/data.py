"""Token data: `data prepare` (text -> token shards + index.json) and the readers stages train on.

Layout of a prepared data directory:

    index.json          dtype, vocab size, tokenizer sha256, per split the shard files and token counts
    tokenizer.model     a copy of the tokenizer the shards were made with
    train-00000.bin ... flat uint16 (vocab < 65536) or uint32 tokens, documents as BOS + text + EOS
    val-00000.bin ...   the held-out split (documents chosen by a hash of their text: deterministic)

Inputs are text files (documents separated by blank lines), JSONL files (one {"text": ...} per line)
or folders of them, picked and read by `llamactl.textfiles` exactly as `tokenizer train` reads them
(binary or non-UTF-8 files are refused). The output is built in a temporary directory next to `--out`
and swapped in only when complete: on any error the existing data stays as it was. Files are tokenized in parallel (a process pool, results consumed in input order, so
the output never depends on scheduling) and streamed: no file is ever held whole in memory.

Training reads windows of seq_len + 1 tokens through np.memmap in a seeded order; the sampler's
whole state is (seed, epoch, position), which is what exact resume saves.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from llamactl.errors import LlamactlError
from llamactl.textfiles import iter_documents, list_input_files

INDEX = "index.json"
FORMAT_VERSION = 1
_OWN_FILES = re.compile(r"(index\.json|tokenizer\.model|(train|val)-\d{5}\.bin)")  # all `prepare` writes
IGNORE = -100  # target value of positions that carry no loss


# ---- batches ----------------------------------------------------------------------------------------
@dataclass
class Batch:
    """One micro-batch for a language-model loss: targets are -100 where no loss is taken."""

    tokens: torch.Tensor   # (B, T) int64 inputs
    targets: torch.Tensor  # (B, T) int64 next tokens, IGNORE where masked
    loss_mask: torch.Tensor  # (B, T) bool, True where the loss counts
    doc_ids: torch.Tensor | None = None  # (B, T) int64 sample of each input token (packed SFT), -1 padding

    @classmethod
    def from_windows(cls, windows: np.ndarray, mask: np.ndarray | None = None,
                     doc_ids: np.ndarray | None = None) -> "Batch":
        """Windows of T+1 tokens -> inputs [:-1], targets [1:]; mask (B, T) marks targets that count;
        doc_ids (B, T), if given, the document of each input token (attention can stay inside it)."""
        w = torch.from_numpy(windows.astype(np.int64, copy=False))
        tokens, targets = w[:, :-1].contiguous(), w[:, 1:].contiguous()
        loss_mask = torch.ones_like(targets, dtype=torch.bool) if mask is None else \
            torch.from_numpy(np.ascontiguousarray(mask)).bool()
        docs = None if doc_ids is None else torch.from_numpy(np.ascontiguousarray(doc_ids, dtype=np.int64))
        return cls(tokens, targets.masked_fill(~loss_mask, IGNORE), loss_mask, docs)

    @property
    def num_valid(self) -> int:
        """Tokens that carry loss: the unit the trainer normalises the global batch by."""
        return int(self.loss_mask.sum())

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()

    def to(self, device) -> "Batch":
        return Batch(self.tokens.to(device), self.targets.to(device), self.loss_mask.to(device),
                     None if self.doc_ids is None else self.doc_ids.to(device))


# ---- prepare ----------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def list_inputs(inputs: list[Path]) -> list[Path]:
    """Expand folders (recursively, sorted) into text / JSONL files; keep explicit files as given."""
    return list_input_files(inputs)


def is_validation(text: str, fraction: float) -> bool:
    """Deterministic split: a document goes to validation iff its hash falls below the fraction."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return h < fraction * 2.0**64


_WORKER_TOK = {}


def _tokenize_file(job: tuple[int, str, str, str, float, str]) -> dict:
    """Pool worker: tokenize one file into tmp/{i}.train.bin and tmp/{i}.val.bin (streamed)."""
    i, path, tok_path, tmp, fraction, dtype = job
    from llamactl.tokenizer import Tokenizer

    tok = _WORKER_TOK.get(tok_path)
    if tok is None:
        tok = _WORKER_TOK[tok_path] = Tokenizer.load(tok_path)
    out = {"train": Path(tmp) / f"{i}.train.bin", "val": Path(tmp) / f"{i}.val.bin"}
    counts = {"train": [0, 0], "val": [0, 0]}  # tokens, documents
    bufs: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    pending = {"train": 0, "val": 0}
    files = {k: open(v, "wb") for k, v in out.items()}
    try:
        for text in iter_documents(Path(path)):
            split = "val" if is_validation(text, fraction) else "train"
            ids = np.asarray(tok.encode(text, bos=True, eos=True), dtype=dtype)
            bufs[split].append(ids)
            pending[split] += ids.size
            counts[split][0] += ids.size
            counts[split][1] += 1
            if pending[split] >= 1 << 20:
                np.concatenate(bufs[split]).tofile(files[split])
                bufs[split], pending[split] = [], 0
        for split in bufs:
            if bufs[split]:
                np.concatenate(bufs[split]).tofile(files[split])
    finally:
        for f in files.values():
            f.close()
    return {"path": path, "bytes": os.path.getsize(path), "counts": counts, "tmp": {k: str(v) for k, v in out.items()}}


class _ShardWriter:
    """Appends token files into shards of at most `shard_tokens` tokens, in call order."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.limit = out, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.f = None

    def _open(self):
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self.shards.append({"file": name, "tokens": 0})
        self.f = open(self.out / name, "wb")

    def append(self, path: str) -> None:
        data = np.memmap(path, dtype=self.dtype, mode="r") if os.path.getsize(path) else np.empty(0, self.dtype)
        pos = 0
        while pos < data.size:
            if self.f is None or self.shards[-1]["tokens"] >= self.limit:
                self.close()
                self._open()
            n = min(self.limit - self.shards[-1]["tokens"], data.size - pos, 1 << 24)
            np.asarray(data[pos:pos + n]).tofile(self.f)
            self.shards[-1]["tokens"] += int(n)
            pos += n
        del data

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


def _check_out(out: Path) -> None:
    """--out must be new, empty, or a folder `prepare` wrote: replacing it must not delete anything else."""
    if out.exists() and not out.is_dir():
        raise LlamactlError(f"{out} is a file, not a directory (--out)")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not _OWN_FILES.fullmatch(p.name) or not p.is_file())
        if foreign:
            raise LlamactlError(f"{out} is not a prepared data directory (it holds {foreign[0]}"
                                f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); "
                                f"choose a new or empty directory (--out)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _recover(out: Path) -> None:
    """Clean up after a prepare that was killed (its process is gone): its temporary folder is removed;
    an old `out` it had moved aside but not yet replaced is put back."""
    if not out.parent.is_dir():
        return
    for p in sorted(out.parent.glob(f".{out.name}.*-*")):
        m = re.fullmatch(re.escape(f".{out.name}.") + r"(tmp|old)-(\d+)", p.name)
        if not m or not p.is_dir() or _pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not out.exists():
            os.rename(p, out)
        else:
            shutil.rmtree(p, ignore_errors=True)


def _swap_in(tmp: Path, out: Path) -> None:
    """Put the complete `tmp` at `out`; an existing `out` is moved aside first and removed only after."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _missing_ancestor(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (so a failed run can remove what it made)."""
    top = None
    for p in [path, *path.parents]:
        if p.exists():
            break
        top = p
    return top


def prepare(inputs: list[Path], tokenizer: Path, out: Path, *, val_fraction: float = 0.005,
            workers: int | None = None, shard_tokens: int = 1 << 28, show_progress: bool = True) -> dict:
    """Tokenize inputs into out/ (shards + index.json). Deterministic for given inputs and tokenizer.

    Everything is checked and written in `.{out}.tmp-{pid}` next to `out`, which is swapped in only on
    success; an existing `out` must be a folder `prepare` wrote (it is replaced) or empty.
    """
    from llamactl.tokenizer import Tokenizer

    if not 0 <= val_fraction < 1:
        raise LlamactlError(f"validation fraction must be in [0, 1), got {val_fraction} (--val-fraction)")
    if shard_tokens < 1:
        raise LlamactlError(f"--shard-tokens must be at least 1, got {shard_tokens} (--shard-tokens)")
    if workers is not None and workers < 1:
        raise LlamactlError(f"--workers must be at least 1, got {workers} (--workers)")
    tokenizer = Path(tokenizer)
    if tokenizer.is_dir():
        tokenizer = tokenizer / "tokenizer.model"
    if not tokenizer.is_file():
        raise LlamactlError(f"tokenizer not found ({tokenizer}, --tokenizer)")
    tok = Tokenizer.load(tokenizer, where="--tokenizer")
    out = Path(os.path.abspath(out))  # "." or "x/.." have no name to put a sibling next to
    _recover(out)
    _check_out(out)
    files = list_inputs(inputs)
    made = _missing_ancestor(out.parent)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        index = _prepare_into(tmp, files, tok, tokenizer, val_fraction, workers, shard_tokens, show_progress)
        _swap_in(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if made is not None:  # folders this call created for --out, now empty again
            for p in [out.parent, *out.parent.parents]:
                try:
                    p.rmdir()
                except OSError:
                    break
                if p == made:
                    break
        if isinstance(e, OSError):  # inputs are read through textfiles, so this is the output side
            raise LlamactlError(f"cannot write {out}: {e.strerror or e} (--out)") from None
        raise
    return index


def _prepare_into(dest: Path, files: list[Path], tok, tokenizer: Path, val_fraction: float, workers: int | None,
                  shard_tokens: int, show_progress: bool) -> dict:
    """Write shards, tokenizer.model and index.json of `files` into the (fresh, private) folder `dest`."""
    from llamactl.ui import progress

    dtype = token_dtype(tok.vocab_size)
    parts = dest / ".parts"
    parts.mkdir()
    writers = {s: _ShardWriter(dest, s, dtype, shard_tokens) for s in ("train", "val")}
    totals = {s: [0, 0] for s in writers}
    jobs = [(i, str(f), str(tokenizer), str(parts), val_fraction, dtype.name) for i, f in enumerate(files)]
    workers = max(1, min(workers or (os.cpu_count() or 1), len(files)))
    total_bytes = sum(f.stat().st_size for f in files)
    try:
        with progress(disable=not show_progress) as bar:
            task = bar.add_task("tokenizing", total=total_bytes)
            pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
            try:
                results = pool.imap(_tokenize_file, jobs) if pool else map(_tokenize_file, jobs)
                for r in results:  # in input order, whatever order workers finish in
                    for s, w in writers.items():
                        w.append(r["tmp"][s])
                        os.unlink(r["tmp"][s])
                        totals[s][0] += r["counts"][s][0]
                        totals[s][1] += r["counts"][s][1]
                    bar.advance(task, r["bytes"])
                if pool:
                    pool.close()
            finally:
                if pool:
                    pool.terminate()  # on an error: stop the other files now, not after all of them
                    pool.join()
    finally:
        for w in writers.values():
            w.close()
        shutil.rmtree(parts, ignore_errors=True)
    if totals["train"][1] == 0:
        if totals["val"][1]:
            raise LlamactlError(f"no training documents: all {totals['val'][1]} document(s) of the input went to the "
                                f"validation split; lower --val-fraction or give more documents (--val-fraction)")
        raise LlamactlError(f"no documents found in {len(files)} input file(s) (--input)")
    shutil.copyfile(tokenizer, dest / "tokenizer.model")
    index = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "tokenizer_sha256": sha256_file(tokenizer),
        "tokenizer": "tokenizer.model",
        "val_fraction": val_fraction,
        "sources": [str(f) for f in files],
        "splits": {s: {"tokens": totals[s][0], "documents": totals[s][1], "shards": writers[s].shards}
                   for s in writers},
    }
    (dest / INDEX).write_text(json.dumps(index, indent=1))
    return index


# ---- reading ----------------------------------------------------------------------------------------
def read_index(data_dir: Path) -> dict:
    """index.json of a prepared data directory, checked field by field (a damaged one is one clear line)."""
    data_dir = Path(data_dir)
    p = data_dir / INDEX
    if not p.is_file():
        raise LlamactlError(f"no {INDEX}: not a prepared data directory, run `llamactl data prepare` ({data_dir}, --data)")
    try:
        index = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlamactlError(f"corrupt {INDEX}: {e} ({p})") from None
    problem = _index_problem(index)
    if problem:
        raise LlamactlError(f"corrupt {INDEX}: {problem} ({p})")
    return index


def _index_problem(index) -> str | None:
    """What is wrong with a parsed index.json, or None."""
    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(index, dict):
        return "not an object"
    if index.get("dtype") not in ("uint16", "uint32"):
        return f"dtype must be uint16 or uint32, got {index.get('dtype')!r}"
    if not count(index.get("vocab_size")) or index["vocab_size"] < 1:
        return f"vocab_size must be a positive integer, got {index.get('vocab_size')!r}"
    if index["dtype"] == "uint16" and index["vocab_size"] > 65536:
        return f"vocab_size {index['vocab_size']} does not fit dtype uint16"
    splits = index.get("splits")
    if not isinstance(splits, dict):
        return "splits must be an object"
    for name, info in splits.items():
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
            return f"split {name!r} has no list of shards"
        for sh in info["shards"]:
            if not isinstance(sh, dict) or not isinstance(sh.get("file"), str) or not count(sh.get("tokens")):
                return f"split {name!r} has a shard without a file name and token count"
            if not _OWN_FILES.fullmatch(sh["file"]) or not sh["file"].endswith(".bin"):
                return f"shard file name {sh['file']!r} is not one data prepare writes"
    return None


def check_tokenizer(index: dict, data_dir: Path, vocab_size: int, tokenizer_sha256: str | None = None,
                    where: str = "--data") -> None:
    """The data must have been tokenized with the model's tokenizer: vocab size and (if known) sha256."""
    if index["vocab_size"] != vocab_size:
        raise LlamactlError(f"data was tokenized with a vocabulary of {index['vocab_size']} but the model has "
                            f"{vocab_size} ({data_dir}, {where}); prepare the data with the model's tokenizer")
    if tokenizer_sha256 and index.get("tokenizer_sha256") and index["tokenizer_sha256"] != tokenizer_sha256:
        raise LlamactlError(f"data was tokenized with a different tokenizer (sha256 {index['tokenizer_sha256'][:12]} "
                            f"vs {tokenizer_sha256[:12]}) ({data_dir}, {where})")


class TokenData:
    """The shards of one split as one virtual token array (memmaps, nothing loaded)."""

    def __init__(self, data_dir: Path, split: str = "train"):
        self.dir = Path(data_dir)
        self.index = read_index(self.dir)
        if split not in self.index["splits"]:
            raise LlamactlError(f"no split {split!r} in {INDEX} ({self.dir})")
        info = self.index["splits"][split]
        self.dtype = np.dtype(self.index["dtype"])
        self.vocab_size = int(self.index["vocab_size"])
        self.arrays: list[np.memmap] = []
        for sh in info["shards"]:
            path = self.dir / sh["file"]
            if not path.is_file():
                raise LlamactlError(f"shard file missing ({path})")
            size = path.stat().st_size
            if size == 0:
                raise LlamactlError(f"shard file is empty ({path})")
            if size != sh["tokens"] * self.dtype.itemsize:
                raise LlamactlError(f"shard file is corrupt: {size} bytes, index says {sh['tokens']} tokens of "
                                    f"{self.dtype.itemsize} bytes ({path})")
            arr = np.memmap(path, dtype=self.dtype, mode="r")
            head = np.asarray(arr[: 1 << 16])
            if head.size and int(head.max()) >= self.vocab_size:
                raise LlamactlError(f"shard file is corrupt: token id {int(head.max())} >= vocab {self.vocab_size} ({path})")
            self.arrays.append(arr)
        self.offsets = np.cumsum([0] + [a.size for a in self.arrays])
        self.num_tokens = int(self.offsets[-1])
        self.split = split

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the virtual concatenation of the shards."""
        out = np.empty(length, dtype=np.int64)
        pos, filled = start, 0
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while filled < length:
            a = self.arrays[i]
            lo = pos - int(self.offsets[i])
            n = min(length - filled, a.size - lo)
            out[filled:filled + n] = a[lo:lo + n]
            filled, pos, i = filled + n, pos + n, i + 1
        return out


class WindowSampler:
    """Seeded random order over the non-overlapping windows of seq_len+1 tokens of a TokenData.

    Each epoch is a fresh permutation drawn from (seed, epoch); state = (seed, epoch, position) only,
    so resuming needs nothing else to reproduce the exact sequence of batches.
    """

    def __init__(self, data: TokenData, seq_len: int, seed: int = 0):
        self.data, self.seq_len, self.seed = data, seq_len, seed
        self.n_windows = (data.num_tokens - 1) // seq_len
        if self.n_windows < 1:
            raise LlamactlError(f"{data.split} split has {data.num_tokens} tokens, fewer than one window of "
                                f"{seq_len + 1} (--seq-len, {data.dir})")
        self.epoch, self.position = 0, 0
        self._perm: np.ndarray | None = None

    def _order(self) -> np.ndarray:
        if self._perm is None:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)
        return self._perm

    def next_ids(self, n: int) -> np.ndarray:
        """Advance by n windows, crossing epochs as needed; their window indices."""
        out = np.empty(n, dtype=np.int64)
        for r in range(n):
            if self.position >= self.n_windows:
                self.epoch, self.position, self._perm = self.epoch + 1, 0, None
            out[r] = self._order()[self.position]
            self.position += 1
        return out

    def read(self, ids: np.ndarray) -> np.ndarray:
        """Windows (len(ids), seq_len+1) int64 of the given indices."""
        out = np.empty((len(ids), self.seq_len + 1), dtype=np.int64)
        for r, w in enumerate(ids):
            out[r] = self.data.read(int(w) * self.seq_len, self.seq_len + 1)
        return out

    def next_windows(self, n: int) -> np.ndarray:
        """The next n windows, (n, seq_len+1) int64."""
        return self.read(self.next_ids(n))

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, s: dict) -> None:
        if int(s["seed"]) != self.seed:
            raise LlamactlError(f"resume with --seed {self.seed} but the run used seed {int(s['seed'])} (--seed)")
        self.epoch, self.position, self._perm = int(s["epoch"]), int(s["position"]), None


class PretrainBatches:
    """Micro-batches of one optimizer step for the LM loss: the trainer's batch source for pretraining.

    With data parallelism, every rank draws the same global windows and keeps its own slice, so the
    state stays (seed, epoch, position) and the order does not depend on the number of ranks.
    """

    def __init__(self, sampler: WindowSampler, micro_batch: int, accum: int, dp: int = 1, dp_rank: int = 0):
        self.sampler, self.micro_batch, self.accum, self.dp, self.dp_rank = sampler, micro_batch, accum, dp, dp_rank

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.accum * self.dp * self.sampler.seq_len

    def next_step(self) -> list[Batch]:
        per_rank = self.micro_batch * self.accum
        ids = self.sampler.next_ids(per_rank * self.dp)  # every rank advances the same global order
        w = self.sampler.read(ids[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank])
        return [Batch.from_windows(w[i * self.micro_batch:(i + 1) * self.micro_batch]) for i in range(self.accum)]

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, s: dict) -> None:
        self.sampler.load_state_dict(s)


def eval_windows(data: TokenData, seq_len: int, max_tokens: int | None = None) -> Iterator[np.ndarray]:
    """All non-overlapping windows of a split in order (deterministic eval), up to max_tokens targets."""
    n = (data.num_tokens - 1) // seq_len
    if max_tokens:
        n = min(n, max(1, max_tokens // seq_len))
    for w in range(n):
        yield data.read(w * seq_len, seq_len + 1)
