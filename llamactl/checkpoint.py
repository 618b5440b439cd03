"""The one checkpoint format: a directory that is also a valid Hugging Face Llama model directory.

    config.json                       HF LlamaConfig (LlamaForCausalLM, or LlamaForSequenceClassification
                                      with num_labels 1 for reward / value heads)
    model-0000X-of-0000N.safetensors  whole (unsharded) tensors under HF names; one file per pipeline stage
                                      (split further only above `max_shard_bytes`)
    model.safetensors.index.json      tensor name -> file
    tokenizer.model                   the SentencePiece model the weights were trained with
    llamactl.json                     format version, model config, head, stage, step, tokens, the parallel
                                      layout at save time, sha256 and size of every other file, extra
    train_state/rank{R:05d}.pt        optional, per rank, for exact resume (torch.save; read back with
                                      weights_only=True, so values must be tensors, dicts, lists, tuples,
                                      numbers, bools, str or None)

Writing is collective: each pipeline stage's tp-rank-0 / dp-rank-0 gathers its tensors one at a time from
its tp group and writes that stage's file, so stages write in parallel and no rank holds the whole model.
Everything goes into `.{name}.tmp-XXXX` next to the target, llamactl.json last, and the directory is
renamed only when complete: a crash never leaves a directory under the final name.

Reading works for any TP/PP layout: each rank reads only its slices (safetensors `get_slice`). Our RoPE
uses HF's rotate-half layout, so HF names need no q/k permutation (Meta's layout: see convert.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from llamactl.config import ModelConfig
from llamactl.errors import LlamactlError
from llamactl.parallel.context import ParallelContext
from llamactl.parallel.tensor import TPShard, shard_specs
from llamactl.rundir import LATEST_FILE, META_FILE, fsync_dir, is_complete, latest, set_latest  # noqa: F401 (re-exported)

FORMAT = "llamactl-checkpoint"
VERSION = 1
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.model"
TRAIN_STATE_DIR = "train_state"
DEFAULT_MAX_SHARD_BYTES = 20 * 2**30  # a stage's file is split only beyond this (keeps writer memory bounded)

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


# ---- names: ours (Meta's) <-> Hugging Face's ---------------------------------------------------------
_LAYER_TO_HF = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_LAYER_FROM_HF = {v: k for k, v in _LAYER_TO_HF.items()}
_TOP_TO_HF = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight", "score.weight": "score.weight"}
_TOP_FROM_HF = {v: k for k, v in _TOP_TO_HF.items()}
HEAD_PARAMS = ("output.weight", "score.weight")


def to_hf_name(name: str) -> str:
    """`layers.3.attention.wq.weight` -> `model.layers.3.self_attn.q_proj.weight` (and the top-level ones)."""
    if name in _TOP_TO_HF:
        return _TOP_TO_HF[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in _LAYER_TO_HF:
        return f"model.layers.{parts[1]}.{_LAYER_TO_HF[parts[2]]}"
    raise KeyError(name)


def from_hf_name(name: str) -> str | None:
    """Inverse of to_hf_name; None for tensors we do not use (e.g. rotary inv_freq buffers)."""
    if name in _TOP_FROM_HF:
        return _TOP_FROM_HF[name]
    if name.startswith("model.layers."):
        idx, rest = name[len("model.layers."):].split(".", 1)
        if rest in _LAYER_FROM_HF:
            return f"layers.{idx}.{_LAYER_FROM_HF[rest]}"
    return None


# ---- HF config.json <-> ModelConfig -------------------------------------------------------------------
def hf_config(cfg: ModelConfig, head: str, dtype: torch.dtype) -> dict[str, Any]:
    """The config.json transformers needs to load our tensors as LlamaForCausalLM / ...SequenceClassification."""
    d = {
        "architectures": ["LlamaForCausalLM" if head == "lm" else "LlamaForSequenceClassification"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "num_hidden_layers": cfg.n_layers,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers < 5 reads this, >= 5 rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": DTYPE_NAMES.get(dtype, "float32"),
        "use_cache": True,
    }
    if head != "lm":
        # HF scores the rightmost token that is not pad_token_id; id 0 (unk) never appears with byte fallback
        d.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, pad_token_id=0)
    return d


def infer_ffn_rule(dim: int, intermediate_size: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) that reproduce `intermediate_size` with Meta's FFN rule.

    Prefers Meta's usual multiple_of 256, then larger powers of two dividing the size; a multiplier is
    used only when needed and then the one with the fewest decimals (the largest such), e.g. 70B -> 1.3.
    """
    size = intermediate_size
    h = int(2 * 4 * dim / 3)
    pow2 = [1 << k for k in range(20, -1, -1) if size % (1 << k) == 0]
    candidates = ([256] if size % 256 == 0 else []) + [m for m in pow2 if m != 256]
    if size not in candidates:
        candidates.append(size)  # last resort: always reachable with a multiplier

    def rule(m: int, mult: float | None) -> int:
        hh = int(mult * h) if mult is not None else h
        return m * ((hh + m - 1) // m)

    for m in candidates[:-1] if size not in pow2 else candidates:
        if rule(m, None) == size:
            return m, None
    for decimals in range(1, 7):
        scale = 10 ** decimals
        for m in candidates:
            lo, hi = max(1, (size - m) * scale // max(h, 1) - 1), (size * scale) // max(h, 1) + 2
            for k in range(hi, lo - 1, -1):
                mult = round(k / scale, decimals)
                if rule(m, mult) == size:
                    return m, mult
    raise LlamactlError(f"cannot express intermediate_size {size} with Meta's FFN rule for dim {dim}")


def config_from_hf(d: dict[str, Any], where: str) -> tuple[ModelConfig, str]:
    """ModelConfig and head kind from a Hugging Face config.json dict; unsupported variants are refused."""
    if d.get("model_type") not in ("llama", None):
        raise LlamactlError(f"model_type is {d.get('model_type')!r}, only 'llama' is supported ({where})")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
               if k not in d]
    if missing:
        raise LlamactlError(f"config.json lacks {', '.join(missing)} ({where})")
    if d.get("hidden_act", "silu") != "silu":
        raise LlamactlError(f"hidden_act {d['hidden_act']!r} is not supported, Llama uses 'silu' ({where})")
    if d.get("rope_scaling"):
        raise LlamactlError(f"rope_scaling {d['rope_scaling']} is not supported ({where})")
    for k in ("attention_bias", "mlp_bias"):
        if d.get(k):
            raise LlamactlError(f"{k}=true is not supported: Llama 2 has no biases ({where})")
    dim, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
    if d.get("head_dim") not in (None, dim // heads):
        raise LlamactlError(f"head_dim {d['head_dim']} != hidden_size / num_attention_heads = {dim // heads} ({where})")
    multiple_of, mult = infer_ffn_rule(dim, int(d["intermediate_size"]))
    rope = d.get("rope_parameters") or {}
    theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default":
        raise LlamactlError(f"rope type {rope.get('rope_type')!r} is not supported ({where})")
    kv = d.get("num_key_value_heads") or heads
    cfg = ModelConfig(dim=dim, n_layers=int(d["num_hidden_layers"]), n_heads=heads,
                      n_kv_heads=None if kv == heads else int(kv), vocab_size=int(d["vocab_size"]),
                      multiple_of=multiple_of, ffn_dim_multiplier=mult, norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                      rope_theta=float(theta), max_seq_len=int(d.get("max_position_embeddings", 4096)))
    arch = (d.get("architectures") or ["LlamaForCausalLM"])[0]
    if arch == "LlamaForCausalLM":
        head = "lm"
    elif arch == "LlamaForSequenceClassification":
        if int(d.get("num_labels", len(d.get("id2label") or {0: 0}))) != 1:
            raise LlamactlError(f"LlamaForSequenceClassification with num_labels != 1 is not a reward model ({where})")
        head = "reward"
    else:
        raise LlamactlError(f"architecture {arch} is not supported (LlamaForCausalLM / "
                            f"LlamaForSequenceClassification) ({where})")
    return cfg, head


# ---- small file helpers -------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LlamactlError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlamactlError(f"{what} is not valid JSON ({path}: {e})") from None


def _write_json(path: Path, obj: dict) -> None:
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


def _resolve_tokenizer(tokenizer) -> Path | None:
    if tokenizer is None:
        return None
    path = Path(getattr(tokenizer, "path", tokenizer))
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise LlamactlError(f"tokenizer file not found: {path}")
    return path


def _check_vocab(tok_path: Path, cfg: ModelConfig, where: str) -> None:
    n = tokenizer_vocab_size(tok_path)
    if n != cfg.vocab_size:
        raise LlamactlError(f"tokenizer {tok_path.name} has {n:,} pieces but the model's vocab_size is "
                            f"{cfg.vocab_size:,} ({where})")


_ALLOWED_LEAVES = (torch.Tensor, int, float, bool, str, bytes, type(None), torch.Size, torch.dtype, torch.device)


def _check_train_state(obj, path: str = "train_state") -> None:
    """Refuse values torch.load(weights_only=True) could not read back (numpy arrays, custom objects)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool)):
                raise LlamactlError(f"{path} has a key of type {type(k).__name__}; keys must be str or numbers")
            _check_train_state(v, f"{path}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_train_state(v, f"{path}[{i}]")
    elif not isinstance(obj, _ALLOWED_LEAVES):
        raise LlamactlError(f"{path} is a {type(obj).__name__}; train_state values must be tensors, dicts, lists, "
                            f"tuples, numbers, str or None (convert numpy arrays with torch.from_numpy)")


# ---- the file plan: which tensors go into which file ----------------------------------------------------
@dataclass
class _Entry:
    name: str            # our (Meta) name
    hf: str              # Hugging Face name
    shape: tuple         # full shape
    stage: int


def _stage_entries(cfg: ModelConfig, head: str, pp: int) -> list[list[_Entry]]:
    """Per pipeline stage, its tensors (full shapes) in model order; built on the meta device (free)."""
    from llamactl.model import Transformer

    out = []
    for s in range(pp):
        with torch.device("meta"):
            m = Transformer(cfg, ParallelContext(tp=1, pp=pp, dp=1, rank=s), head)
        out.append([_Entry(n, to_hf_name(n), tuple(p.shape), s) for n, p in m.named_parameters()])
    return out


def _file_plan(stages: list[list[_Entry]], itemsize: int, max_bytes: int) -> list[list[_Entry]]:
    """Files in order: each stage's tensors, split into files of at most max_bytes (at least one tensor)."""
    files = []
    for entries in stages:
        cur, size = [], 0
        for e in entries:
            nbytes = itemsize * _numel(e.shape)
            if cur and size + nbytes > max_bytes:
                files.append(cur)
                cur, size = [], 0
            cur.append(e)
            size += nbytes
        if cur:
            files.append(cur)
    return files


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


# ---- save -----------------------------------------------------------------------------------------------
def _distributed(ctx: ParallelContext) -> bool:
    return ctx.world_size > 1 and dist.is_available() and dist.is_initialized()


def _gather_full(local: torch.Tensor, spec: TPShard | None, all_specs: list[dict] | None, name: str,
                 ctx: ParallelContext, dist_on: bool) -> torch.Tensor | None:
    """The full tensor on tp-rank 0 (None elsewhere); each rank's slice placed by its TPShard."""
    if spec is None or ctx.tp == 1 or not dist_on:
        return local.detach() if ctx.tp_rank == 0 else None
    src = local.detach().contiguous()
    me_dst = ctx.tp_rank == 0
    parts = [torch.empty_like(src) for _ in range(ctx.tp)] if me_dst else None
    dist.gather(src, parts, dst=ctx.tp_ranks[0], group=ctx.tp_group)
    if not me_dst:
        return None
    shape = list(src.shape)
    shape[spec.dim] = spec.full
    full = torch.empty(shape, dtype=src.dtype, device="cpu")
    for r, part in enumerate(parts):
        d, start, length, _ = all_specs[r][name]
        full.narrow(d, start, length).copy_(part.cpu())
    return full


def save(out_dir, model, ctx: ParallelContext | None = None, *, tokenizer=None, stage: str = "", step: int = 0,
         tokens: int = 0, train_state: dict | None = None, extra: dict | None = None, overwrite: bool = False,
         max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: torch.dtype | None = None) -> Path:
    """Write a checkpoint of `model` to out_dir; collective over all ranks when distributed.

    tokenizer: tokenizer.model path (or a dir / Tokenizer holding one), copied in; its vocab must match.
    train_state: this rank's resume state (see module doc for the allowed values). An existing out_dir is
    refused unless overwrite=True, and then replaced only after the new directory is complete.
    dtype: of the stored weights (None: the parameters' own). When it is narrower than the parameters and a
    train_state is written, the exact parameters go into train_state/masters*.pt too, so that
    `load_train_state(..., model=model)` resumes bit-exactly from the narrowed weights.
    """
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise LlamactlError(f"cannot save weights as {dtype}; choose one of {', '.join(DTYPE_NAMES.values())}")
    ctx = ctx or getattr(model, "ctx", None) or ParallelContext.single()
    out_dir = Path(out_dir)
    cfg, head = model.cfg, model.head
    tok_path = _resolve_tokenizer(tokenizer)
    if tok_path is not None:
        _check_vocab(tok_path, cfg, "--tokenizer")
    if train_state is not None:
        _check_train_state(train_state)
    if out_dir.exists() and not overwrite:
        raise LlamactlError(f"checkpoint directory already exists: {out_dir} (choose another path or overwrite)")
    dist_on = _distributed(ctx)

    # 1. the temporary directory (rank 0 makes it and tells everyone its name)
    tmp_holder: list = [None]
    if ctx.rank == 0:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp_holder[0] = tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent)
    if dist_on:
        dist.broadcast_object_list(tmp_holder, src=0)
    tmp = Path(tmp_holder[0])
    try:
        return _save_into(tmp, out_dir, model, ctx, dist_on, cfg, head, tok_path, stage, step, tokens,
                          train_state, extra, max_shard_bytes, dtype)
    except BaseException:
        if ctx.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_into(tmp: Path, out_dir: Path, model, ctx, dist_on, cfg, head, tok_path, stage, step, tokens,
               train_state, extra, max_shard_bytes, dtype) -> Path:
    params = dict(model.named_parameters())
    dtype = dtype or next(iter(params.values())).dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    files = _file_plan(_stage_entries(cfg, head, ctx.pp), itemsize, max_shard_bytes)
    n_files = len(files)
    specs = shard_specs(model)
    all_specs = None
    writes_weights = ctx.dp_rank == 0
    if dist_on and ctx.tp > 1 and writes_weights:
        mine = {k: (v.dim, v.start, v.length, v.full) for k, v in specs.items()}
        all_specs = [None] * ctx.tp
        dist.all_gather_object(all_specs, mine, group=ctx.tp_group)

    hashes: dict[str, dict] = {}
    # 2. weights: this stage's files, tensors gathered one at a time onto tp-rank 0 / dp-rank 0
    if writes_weights:
        from safetensors.torch import save_file

        for i, entries in enumerate(files):
            if entries[0].stage != ctx.pp_rank:
                continue
            tensors = {}
            for e in entries:
                if e.name not in params:
                    raise LlamactlError(f"model has no parameter {e.name} (pipeline stage {ctx.pp_rank})")
                full = _gather_full(params[e.name], specs.get(e.name), all_specs, e.name, ctx, dist_on)
                if full is not None:
                    if tuple(full.shape) != e.shape:
                        raise LlamactlError(f"{e.name} has shape {tuple(full.shape)}, expected {e.shape}")
                    tensors[e.hf] = full.to(device="cpu", dtype=dtype).contiguous()
            if ctx.tp_rank == 0:
                path = tmp / shard_name(i, n_files)
                save_file(tensors, str(path), metadata={"format": "pt"})
                del tensors
                _fsync_file(path)
                hashes[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    # 3. this rank's train state
    if train_state is not None:
        sd = tmp / TRAIN_STATE_DIR
        sd.mkdir(exist_ok=True)
        path = sd / f"rank{ctx.rank:05d}.pt"
        torch.save(train_state, path)
        _fsync_file(path)
        hashes[f"{TRAIN_STATE_DIR}/{path.name}"] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        if writes_weights and any(_narrows(p.dtype, dtype) for p in params.values()):
            path = sd / _masters_name(ctx.rank)
            torch.save({k: v.detach().to("cpu", copy=True) for k, v in params.items()}, path)
            _fsync_file(path)
            hashes[f"{TRAIN_STATE_DIR}/{path.name}"] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    # 4. everyone's hashes to rank 0, which writes the small files, llamactl.json last
    if dist_on:
        gathered = [None] * ctx.world_size
        dist.all_gather_object(gathered, hashes)
        for h in gathered:
            hashes.update(h)
    if ctx.rank == 0:
        _write_small_files(tmp, files, cfg, head, dtype, tok_path, itemsize, hashes, ctx, stage, step, tokens,
                           train_state is not None, extra)
        fsync_dir(tmp)
    if dist_on:
        dist.barrier()
    # 5. publish: rename into place (an old directory is removed only after the new one is there)
    if ctx.rank == 0:
        _publish(tmp, out_dir)
    if dist_on:
        dist.barrier()
    return out_dir


def _narrows(src: torch.dtype, dst: torch.dtype) -> bool:
    """Does casting src to dst lose values (fp32 -> bf16 / fp16, bf16 <-> fp16)?"""
    if src == dst or not src.is_floating_point:
        return False
    a, b = torch.finfo(src), torch.finfo(dst)
    return b.bits < a.bits or (b.bits == a.bits and src != dst)


def _masters_name(rank: int) -> str:
    """Exact (unnarrowed) parameters of the dp-rank-0 rank `rank`; its dp replicas read the same file."""
    return f"masters{rank:05d}.pt"


def save_tensors(out_dir, cfg: ModelConfig, head: str, get_tensor, *, dtype: torch.dtype, tokenizer=None,
                 stage: str = "", step: int = 0, tokens: int = 0, extra: dict | None = None, overwrite: bool = False,
                 max_shard_bytes: int = 5 * 2**30, on_tensor=None) -> Path:
    """Single-process save from full tensors under our names (conversion): get_tensor(name) -> Tensor.

    Tensors are fetched one at a time and written file by file, so at most one file's worth is in memory.
    on_tensor(name) is called after each tensor (progress bars). Same directory, atomicity and checks as save.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tok_path = _resolve_tokenizer(tokenizer)
    if tok_path is not None:
        _check_vocab(tok_path, cfg, "--tokenizer")
    if out_dir.exists() and not overwrite:
        raise LlamactlError(f"output directory already exists: {out_dir} (choose another path or --overwrite)")
    itemsize = torch.empty((), dtype=dtype).element_size()
    files = _file_plan(_stage_entries(cfg, head, 1), itemsize, max_shard_bytes)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        hashes = {}
        for i, entries in enumerate(files):
            tensors = {}
            for e in entries:
                t = get_tensor(e.name)
                if tuple(t.shape) != e.shape:
                    raise LlamactlError(f"tensor {e.name} has shape {tuple(t.shape)}, the config needs {e.shape}")
                t = t.to(device="cpu", dtype=dtype).contiguous()
                if any(t.data_ptr() == o.data_ptr() for o in tensors.values()):
                    t = t.clone()  # tied embeddings: safetensors refuses shared storage
                tensors[e.hf] = t
                if on_tensor is not None:
                    on_tensor(e.name)
            path = tmp / shard_name(i, len(files))
            save_file(tensors, str(path), metadata={"format": "pt"})
            del tensors
            _fsync_file(path)
            hashes[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        _write_small_files(tmp, files, cfg, head, dtype, tok_path, itemsize, hashes, ParallelContext.single(), stage,
                           step, tokens, False, extra)
        fsync_dir(tmp)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_small_files(tmp, files, cfg, head, dtype, tok_path, itemsize, hashes, ctx, stage, step, tokens,
                       has_state, extra) -> None:
    n_files = len(files)
    weight_map = {e.hf: shard_name(i, n_files) for i, entries in enumerate(files) for e in entries}
    total = sum(itemsize * _numel(e.shape) for entries in files for e in entries)
    missing = [shard_name(i, n_files) for i in range(n_files) if shard_name(i, n_files) not in hashes]
    if missing:
        raise LlamactlError(f"checkpoint shards were not written: {', '.join(missing)} ({tmp})")
    small = {CONFIG_FILE: hf_config(cfg, head, dtype),
             INDEX_FILE: {"metadata": {"total_size": total}, "weight_map": weight_map}}
    for name, obj in small.items():
        _write_json(tmp / name, obj)
    if tok_path is not None:
        shutil.copyfile(tok_path, tmp / TOKENIZER_FILE)
        _fsync_file(tmp / TOKENIZER_FILE)
    for name in list(small) + ([TOKENIZER_FILE] if tok_path is not None else []):
        hashes[name] = {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
    from llamactl import __version__

    meta = {
        "format": FORMAT,
        "version": VERSION,
        "llamactl_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": cfg.to_dict(),
        "head": head,
        "dtype": DTYPE_NAMES.get(dtype, str(dtype)),
        "stage": stage,
        "step": int(step),
        "tokens": int(tokens),
        "parameters": cfg_num_params(cfg, head),
        "parallel": {"tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp, "world_size": ctx.world_size},
        "train_state": has_state,
        "files": dict(sorted(hashes.items())),
        "extra": extra or {},
    }
    _write_json(tmp / META_FILE, meta)


def cfg_num_params(cfg: ModelConfig, head: str) -> int:
    """Parameters of the whole model with this head (the score head has 1 x dim instead of vocab x dim)."""
    n = cfg.num_params()
    return n if head == "lm" else n - cfg.vocab_size * cfg.dim + cfg.dim


def _publish(tmp: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rename(out_dir, old / out_dir.name)
    os.rename(tmp, out_dir)
    fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- reading --------------------------------------------------------------------------------------------
def _ckpt_dir(ckpt_dir) -> Path:
    p = Path(ckpt_dir)
    if not p.exists():
        raise LlamactlError(f"checkpoint directory not found: {p}")
    if not p.is_dir():
        raise LlamactlError(f"not a checkpoint directory (a file): {p}")
    return p


def resolve(path, flag: str = "--model") -> Path:
    """A checkpoint dir as given, or the newest complete one of a run dir (or of its `latest` file)."""
    path = Path(path)
    if path.name == "latest" and path.is_file():
        path = path.parent
    if path.is_dir() and not (path / META_FILE).is_file() and not (path / "config.json").is_file():
        found = latest(path)
        if found is None:
            raise LlamactlError(f"no complete checkpoint in run dir ({path}, {flag})")
        return found
    return path


def read_meta(ckpt_dir) -> dict:
    """llamactl.json of a checkpoint; for a plain Hugging Face directory, an equivalent summary."""
    p = _ckpt_dir(ckpt_dir)
    if (p / META_FILE).is_file():
        meta = _read_json(p / META_FILE, META_FILE)
        if meta.get("format") != FORMAT:
            raise LlamactlError(f"{META_FILE} is not a llamactl checkpoint description ({p})")
        if int(meta.get("version", 0)) > VERSION:
            raise LlamactlError(f"checkpoint format version {meta.get('version')} is newer than this llamactl "
                                f"understands ({VERSION}); upgrade llamactl ({p})")
        return meta
    if (p / CONFIG_FILE).is_file():
        cfg, head = config_from_hf(_read_json(p / CONFIG_FILE, CONFIG_FILE), str(p))
        d = _read_json(p / CONFIG_FILE, CONFIG_FILE)
        return {"format": "hf", "version": None, "model": cfg.to_dict(), "head": head,
                "dtype": d.get("torch_dtype") or d.get("dtype"), "stage": "hf", "step": 0, "tokens": 0,
                "parameters": cfg_num_params(cfg, head), "parallel": None, "train_state": False,
                "files": {}, "extra": {}}
    if p.name.startswith(".") and ".tmp-" in p.name:
        raise LlamactlError(f"incomplete checkpoint (interrupted while writing): {p}")
    raise LlamactlError(f"not a checkpoint directory: {p} has neither {META_FILE} nor {CONFIG_FILE}")


def load_config(ckpt_dir) -> tuple[ModelConfig, str]:
    """(ModelConfig, head) recorded in a checkpoint (or read from a plain HF config.json)."""
    meta = read_meta(ckpt_dir)
    try:
        return ModelConfig.from_dict(meta["model"]), meta["head"]
    except (KeyError, TypeError) as e:
        raise LlamactlError(f"{META_FILE} has no valid model config ({e}) ({ckpt_dir})") from None


def tokenizer_path(ckpt_dir) -> Path:
    """The checkpoint's tokenizer.model."""
    p = _ckpt_dir(ckpt_dir) / TOKENIZER_FILE
    if not p.is_file():
        raise LlamactlError(f"checkpoint has no {TOKENIZER_FILE} ({ckpt_dir})")
    return p


def _weight_map(p: Path) -> dict[str, str]:
    if (p / INDEX_FILE).is_file():
        idx = _read_json(p / INDEX_FILE, INDEX_FILE)
        wm = idx.get("weight_map")
        if not isinstance(wm, dict):
            raise LlamactlError(f"{INDEX_FILE} has no weight_map ({p})")
        return wm
    if (p / "model.safetensors").is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(p / "model.safetensors"), framework="pt") as f:
                return {k: "model.safetensors" for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise LlamactlError(f"model.safetensors is not a valid safetensors file ({p}: {e})") from None
    raise LlamactlError(f"no weights in {p}: neither {INDEX_FILE} nor model.safetensors "
                        f"(Meta or .bin checkpoints: run `llamactl convert` first)")


def verify(ckpt_dir, files: list[str] | None = None, *, on_file=None, meta: dict | None = None) -> list[str]:
    """Problems of a checkpoint (empty = intact): missing files and sha256 mismatches, named by file.

    files: only these (relative names); on_file(name, nbytes) is called after each file (progress bars).
    """
    p = Path(ckpt_dir)
    if not p.is_dir():
        return [f"checkpoint directory not found: {p}"]
    try:
        meta = meta if meta is not None else read_meta(p)
    except LlamactlError as e:
        return [str(e)]
    if meta["format"] == "hf":  # no hashes to check: at least every weight file must be there
        try:
            wm = _weight_map(p)
        except LlamactlError as e:
            return [str(e)]
        return [f"shard {f} is missing" for f in sorted(set(wm.values())) if not (p / f).is_file()]
    problems = []
    for name, info in meta.get("files", {}).items():
        if files is not None and name not in files:
            continue
        f = p / name
        kind = "shard" if name.endswith(".safetensors") else "file"
        if not f.is_file():
            problems.append(f"{kind} {name} is missing")
        elif f.stat().st_size != info.get("bytes", f.stat().st_size):
            problems.append(f"{kind} {name} is corrupted (size {f.stat().st_size:,} != {info['bytes']:,} bytes)")
        elif sha256_file(f) != info.get("sha256"):
            problems.append(f"{kind} {name} is corrupted (sha256 mismatch)")
        if on_file is not None:
            on_file(name, info.get("bytes", 0))
    return problems


_verify = verify  # `load` has a keyword argument of the same name

_CHECKED_FIELDS = ("dim", "n_layers", "n_heads", "kv_heads", "vocab_size", "ffn_dim", "norm_eps", "rope_theta")


def check_config(saved: ModelConfig, model_cfg: ModelConfig, where: str) -> None:
    """Raise naming the first field where a checkpoint's model differs from the model being filled."""
    for f in _CHECKED_FIELDS:
        a, b = getattr(saved, f), getattr(model_cfg, f)
        if a != b:
            raise LlamactlError(f"checkpoint has {f}={a} but the model has {f}={b} ({where})")


def _heads_compatible(saved: str, model_head: str) -> bool:
    return (saved == "lm") == (model_head == "lm")


@torch.no_grad()
def load(ckpt_dir, model, ctx: ParallelContext | None = None, *, verify: bool = True, strict_head: bool = True) -> dict:
    """Fill `model`'s parameters from a checkpoint (or plain HF dir), reading only this rank's slices.

    Checks the model config (and the tokenizer's vocabulary) first, and with verify=True the sha256 of
    every file read. A reward/value model may load an lm checkpoint with strict_head=False: the
    head is then left as it is. Returns the checkpoint's llamactl.json contents.
    """
    from safetensors import safe_open

    p = _ckpt_dir(ckpt_dir)
    where = str(p)
    meta = read_meta(p)
    saved_cfg, saved_head = load_config(p)
    check_config(saved_cfg, model.cfg, where)
    if (p / TOKENIZER_FILE).is_file():
        _check_vocab(p / TOKENIZER_FILE, model.cfg, where)
    skip_head = False
    if not _heads_compatible(saved_head, model.head):
        if strict_head:
            raise LlamactlError(f"checkpoint has a {saved_head} head but the model a {model.head} head ({where})")
        skip_head = True
    wm = _weight_map(p)
    specs = shard_specs(model)
    params = dict(model.named_parameters())
    tie = False
    if "lm_head.weight" not in wm and "output.weight" in params and not skip_head:
        cfg_json = p / CONFIG_FILE
        tie = cfg_json.is_file() and bool(_read_json(cfg_json, CONFIG_FILE).get("tie_word_embeddings"))
    by_file: dict[str, list[tuple[str, str]]] = {}
    for name in params:
        if skip_head and name in HEAD_PARAMS:
            continue
        hf = to_hf_name(name)
        if hf not in wm and tie and name == "output.weight":
            hf = "model.embed_tokens.weight"
        if hf not in wm:
            raise LlamactlError(f"checkpoint lacks tensor {hf} ({where})")
        by_file.setdefault(wm[hf], []).append((name, hf))
    if verify and meta["format"] != "hf":
        problems = _verify(p, files=sorted(by_file) + [INDEX_FILE])
        if problems:
            raise LlamactlError(f"{problems[0]} ({where})")
    for fname, names in sorted(by_file.items()):
        fpath = p / fname
        if not fpath.is_file():
            raise LlamactlError(f"shard {fname} is missing ({where})")
        try:
            with safe_open(str(fpath), framework="pt", device="cpu") as f:
                keys = set(f.keys())
                for name, hf in names:
                    if hf not in keys:
                        raise LlamactlError(f"shard {fname} lacks tensor {hf} ({where})")
                    _load_param(f.get_slice(hf), params[name], specs.get(name), hf, fname, where)
        except LlamactlError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors' own error types
            raise LlamactlError(f"shard {fname} cannot be read: {e} ({where})") from None
    return meta


def _load_param(sl, param: torch.Tensor, spec: TPShard | None, hf: str, fname: str, where: str) -> None:
    full_shape = list(param.shape)
    if spec is not None:
        full_shape[spec.dim] = spec.full
    if list(sl.get_shape()) != full_shape:
        raise LlamactlError(f"tensor {hf} in {fname} has shape {tuple(sl.get_shape())}, the model needs "
                            f"{tuple(full_shape)} ({where})")
    if spec is None:
        t = sl[:]
    else:
        idx = [slice(None)] * len(full_shape)
        idx[spec.dim] = slice(spec.start, spec.start + spec.length)
        t = sl[tuple(idx)]
    param.copy_(t.to(dtype=param.dtype))


def load_train_state(ckpt_dir, ctx: ParallelContext | None = None, model=None, *, meta: dict | None = None) -> dict | None:
    """This rank's train state (None if the checkpoint has none); the layout must equal the saved one.

    model: when the weights were stored narrower than the parameters (save(dtype=bf16) of an fp32 model),
    its parameters are set to the exact saved values (train_state/masters*.pt), so resume is bit-exact.
    """
    ctx = ctx or ParallelContext.single()
    p = _ckpt_dir(ckpt_dir)
    meta = meta if meta is not None else read_meta(p)
    if not meta.get("train_state"):
        return None
    lay = meta.get("parallel") or {}
    now = {"tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp}
    if any(lay.get(k) != v for k, v in now.items()):
        raise LlamactlError(f"train_state was saved with tp={lay.get('tp')} pp={lay.get('pp')} dp={lay.get('dp')}; "
                            f"exact resume needs the same layout, not tp={ctx.tp} pp={ctx.pp} dp={ctx.dp} "
                            f"(--tp/--pp/--nproc) ({p})")
    name = f"{TRAIN_STATE_DIR}/rank{ctx.rank:05d}.pt"
    state = _read_state_file(p, meta, name)
    masters = f"{TRAIN_STATE_DIR}/{_masters_name(ctx.pp_rank * ctx.dp * ctx.tp + ctx.tp_rank)}"
    if model is not None and masters in meta.get("files", {}):
        _restore_masters(model, _read_state_file(p, meta, masters), masters, p)
    return state


def _read_state_file(p: Path, meta: dict, name: str):
    problems = verify(p, files=[name], meta=meta)
    if problems:
        raise LlamactlError(f"{problems[0]} ({p})")
    try:
        return torch.load(p / name, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise LlamactlError(f"cannot read {name}: {str(e).splitlines()[0]} ({p})") from None


@torch.no_grad()
def _restore_masters(model, saved: dict, name: str, where: Path) -> None:
    params = dict(model.named_parameters())
    if not isinstance(saved, dict) or set(saved) != set(params):
        raise LlamactlError(f"{name} does not hold this model's parameters ({where})")
    for k, p in params.items():
        t = saved[k]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(p.shape):
            raise LlamactlError(f"{name} has a different shape for {k} ({where})")
        p.copy_(t.to(dtype=p.dtype))


def load_model(ckpt_dir, ctx: ParallelContext | None = None, *, device="cpu", dtype=torch.float32,
               head: str | None = None, verify: bool = True):
    """(model, meta): build this rank's shard for the checkpoint's config and load it.

    head: build another head than the checkpoint's (e.g. a reward model from an lm checkpoint); an
    incompatible head is then freshly initialised (N(0, 0.02), seeded, layout-independent).
    """
    from llamactl.model import build_model

    cfg, saved_head = load_config(ckpt_dir)
    head = head or saved_head
    model = build_model(cfg, ctx, head, device=device, dtype=dtype)
    fresh_head = not _heads_compatible(saved_head, head)
    if fresh_head:
        _init_head(model)
    meta = load(ckpt_dir, model, ctx, verify=verify, strict_head=not fresh_head)
    return model, meta


def _init_head(model, seed: int = 0) -> None:
    """A fresh head (e.g. a reward model started from a chat checkpoint), layout-independent like init."""
    from llamactl.model import init_weights

    init_weights(model, seed, only=HEAD_PARAMS)


# ---- `llamactl info` ----------------------------------------------------------------------------------------
def info(ckpt_dir) -> None:
    """Print what a checkpoint holds as tables, verifying every hash (raises naming a damaged file)."""
    from llamactl.ui import console, progress, table

    p = _ckpt_dir(ckpt_dir)
    meta = read_meta(p)
    cfg, head = load_config(p)
    lay = meta.get("parallel")
    fmt = f"{meta['format']} v{meta['version']}" if meta["format"] == FORMAT else "plain Hugging Face directory"
    tok = p / TOKENIZER_FILE
    rows = [["format", fmt],
            ["stage", meta.get("stage") or "-"], ["step", f"{meta.get('step', 0):,}"],
            ["tokens seen", f"{meta.get('tokens', 0):,}"], ["head", head], ["dtype", meta.get("dtype") or "-"],
            ["model", f"dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads ({cfg.kv_heads} kv), "
                      f"ffn {cfg.ffn_dim}, vocab {cfg.vocab_size:,}, context {cfg.max_seq_len:,}"],
            ["parameters", f"{meta.get('parameters', cfg_num_params(cfg, head)):,}"],
            ["saved with", f"tp={lay['tp']} pp={lay['pp']} dp={lay['dp']}" if lay else "-"],
            ["train state", "yes (exact resume)" if meta.get("train_state") else "no"],
            ["tokenizer", f"{tokenizer_vocab_size(tok):,} pieces" if tok.is_file() else "none"]]
    if meta.get("extra"):
        rows.append(["extra", json.dumps(meta["extra"])[:200]])
    console.print(table(f"checkpoint {p}", ["", "value"], rows, justify_numbers=False))

    files = meta.get("files") or {}
    if meta["format"] == "hf":
        names = sorted(set(_weight_map(p).values()))
        files = {n: {"bytes": (p / n).stat().st_size if (p / n).is_file() else 0} for n in names}
    status: dict[str, str] = {}
    if meta["format"] != "hf":
        total = sum(int(v.get("bytes", 0)) for v in files.values())
        with progress(transient=True) as bar:
            task = bar.add_task("verifying sha256", total=total)
            problems = verify(p, on_file=lambda name, n: bar.advance(task, n))
        for pr in problems:
            status[pr.split(" ", 2)[1]] = pr.split(" ", 2)[2]
    else:
        problems = verify(p)
    frows = [[n, f"{int(v.get('bytes', 0)) / 2**20:,.2f} MiB", status.get(n, "ok" if meta["format"] != "hf" else "-")]
             for n, v in files.items()]
    console.print(table("files", ["file", "size", "sha256"], frows))
    if problems:
        raise LlamactlError(f"{problems[0]} ({p})")
    if meta["format"] == "hf":
        console.print("no hashes to verify (plain Hugging Face directory); every weight file is present")
    else:
        console.print(f"all {len(files)} files verified (sha256)")
