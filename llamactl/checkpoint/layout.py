"""What a checkpoint directory holds and where: file names, the file plan (which tensor goes into which
file), and the small file helpers (json, sha256, fsync, tokenizer and train-state checks) that the writer
(write.py) and the reader (read.py) share."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from llamactl.config import ModelConfig
from llamactl.errors import LlamactlError
from llamactl.hf_format import to_hf_name
from llamactl.parallel.context import ParallelContext

FORMAT = "llamactl-checkpoint"
VERSION = 1
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.model"
TRAIN_STATE_DIR = "train_state"
DEFAULT_MAX_SHARD_BYTES = 20 * 2**30  # a stage's file is split only beyond this (keeps writer memory bounded)


# ---- small file helpers -------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LlamactlError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlamactlError(f"{what} is not valid JSON ({path}: {e})") from None


def write_json(path: Path, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def tokenizer_vocab_size(path: Path) -> int:
    """Pieces in a SentencePiece model (read directly, so checkpoints do not depend on tokenizer.py)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(Path(path).read_bytes())
    except OSError as e:
        raise LlamactlError(f"cannot read tokenizer {path}: {e.strerror or e}") from None
    except RuntimeError:
        raise LlamactlError(f"not a SentencePiece model: {path}") from None
    return int(sp.vocab_size())


def resolve_tokenizer(tokenizer) -> Path | None:
    if tokenizer is None:
        return None
    path = Path(getattr(tokenizer, "path", tokenizer))
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise LlamactlError(f"tokenizer file not found: {path}")
    return path


def check_vocab(tok_path: Path, cfg: ModelConfig, where: str) -> None:
    n = tokenizer_vocab_size(tok_path)
    if n != cfg.vocab_size:
        raise LlamactlError(f"tokenizer {tok_path.name} has {n:,} pieces but the model's vocab_size is "
                            f"{cfg.vocab_size:,} ({where})")


_ALLOWED_LEAVES = (torch.Tensor, int, float, bool, str, bytes, type(None), torch.Size, torch.dtype, torch.device)


def check_train_state(obj, path: str = "train_state") -> None:
    """Refuse values torch.load(weights_only=True) could not read back (numpy arrays, custom objects)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool)):
                raise LlamactlError(f"{path} has a key of type {type(k).__name__}; keys must be str or numbers")
            check_train_state(v, f"{path}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_train_state(v, f"{path}[{i}]")
    elif not isinstance(obj, _ALLOWED_LEAVES):
        raise LlamactlError(f"{path} is a {type(obj).__name__}; train_state values must be tensors, dicts, lists, "
                            f"tuples, numbers, str or None (convert numpy arrays with torch.from_numpy)")



def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# ---- the file plan: which tensors go into which file ----------------------------------------------------
@dataclass
class Entry:
    name: str            # our (Meta) name
    hf: str              # Hugging Face name
    shape: tuple         # full shape
    stage: int


def stage_entries(cfg: ModelConfig, head: str, pp: int, virtual: int = 1) -> list[list[Entry]]:
    """Per pipeline stage, its tensors (full shapes) in model order; built on the meta device (free). With
    virtual stages a stage's layers are its chunks' (not one contiguous range); names stay global."""
    from llamactl.model import Transformer

    out = []
    for s in range(pp):
        with torch.device("meta"):
            m = Transformer(cfg, ParallelContext(tp=1, pp=pp, dp=1, rank=s, virtual_stages=virtual), head)
        out.append([Entry(n, to_hf_name(n), tuple(p.shape), s) for n, p in m.named_parameters()])
    return out


def file_plan(stages: list[list[Entry]], itemsize: int, max_bytes: int) -> list[list[Entry]]:
    """Files in order: each stage's tensors, split into files of at most max_bytes (at least one tensor)."""
    files = []
    for entries in stages:
        cur, size = [], 0
        for e in entries:
            nbytes = itemsize * numel(e.shape)
            if cur and size + nbytes > max_bytes:
                files.append(cur)
                cur, size = [], 0
            cur.append(e)
            size += nbytes
        if cur:
            files.append(cur)
    return files


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def cfg_num_params(cfg: ModelConfig, head: str) -> int:
    """Parameters of the whole model with this head (the score head has 1 x dim instead of vocab x dim)."""
    n = cfg.num_params()
    return n if head == "lm" else n - cfg.vocab_size * cfg.dim + cfg.dim


# ---- train state files ------------------------------------------------------------------------------------
def state_name(rank: int) -> str:
    """This rank's resume state (optimizer, RNG, data position, ...)."""
    return f"{TRAIN_STATE_DIR}/rank{rank:05d}.pt"


def masters_name(ctx: ParallelContext) -> str:
    """Exact parameters of the shard at ctx's (tp, pp) coordinates, written by its dp-rank-0 rank and read by
    all its dp replicas (only when the weights are stored narrower than the parameters)."""
    return f"{TRAIN_STATE_DIR}/masters{ctx.pp_rank * ctx.dp * ctx.tp + ctx.tp_rank:05d}.pt"


def narrows(src: torch.dtype, dst: torch.dtype) -> bool:
    """Does casting src to dst lose values (fp32 -> bf16 / fp16, bf16 <-> fp16)?"""
    if src == dst or not src.is_floating_point:
        return False
    a, b = torch.finfo(src), torch.finfo(dst)
    return b.bits < a.bits or (b.bits == a.bits and src != dst)
