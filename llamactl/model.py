"""The Llama 2 transformer, built from tensor-parallel layers and the fused kernels.

Pre-norm RMSNorm, SwiGLU, RoPE (half layout, theta 1e4), GQA, no biases, untied output; softmax and
final logits in fp32. Parameter names follow Meta's reference (tok_embeddings, layers.N.attention.wq,
...); checkpoint.py maps them to Hugging Face names. Layers are kept under their global index, so a
pipeline stage holds `layers.{i}` for its own i only and checkpoints do not depend on the layout.

Heads: "lm" (vocab logits, vocab-sharded under tp), "reward" and "value" (one scalar per token from a
`score` projection, as Hugging Face's LlamaForSequenceClassification; the reward of a sequence is the
value at its last token, see `last_token`).

Sequence parallelism (`model.sequence_parallel`, set by the trainer like `recompute`; parallel/sequence.py):
in training forwards with grad, tp > 1, no KV cache and T divisible by tp, the residual stream and the
RMSNorms of the blocks run on this rank's T/tp positions; the blocks gather the sequence into q|k|v and
w1|w3 (keeping only the slice for backward) and reduce-scatter after wo and w2, and the norm weights'
gradients are summed over tp inside backward (reduce_grad_over), so data-parallel reduction, ZeRO and the
grad norm (norms counted once over tp) see whole gradients. Every other forward (T % tp != 0, a cache, eval,
no grad) runs the plain path: exact either way. A stage's input and output and the final norm + head stay
whole-sequence tensors (pipeline p2p sends the full activations; Megatron's p2p of split activations is not
done).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import mmap

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as recompute

from llamactl.config import ModelConfig
from llamactl.errors import LlamactlError
from llamactl.kernels import apply_rope, causal_attention, gemv_fused, rms_norm, rope_tables, swiglu
from llamactl.kernels.reference import repeat_kv
from llamactl.parallel.context import ParallelContext
from llamactl.parallel.pipeline import chunk_layers
from llamactl.parallel.sequence import gather_sequence, sequence_split, split_to_sequence
from llamactl.parallel.tensor import (ColumnParallelLinear, RowParallelLinear, TPShard, VocabParallelEmbedding,
                                      column_parallel_on_sequence, reduce_from_tp, reduce_grad_over, shard_specs)

HEADS = ("lm", "reward", "value")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, grad_group=None) -> torch.Tensor:
        """grad_group: sum the weight's gradient over it (sequence parallel: each rank saw part of the rows)."""
        return rms_norm(x, reduce_grad_over(self.weight, grad_group), self.eps)


class KVCache:
    """Preallocated keys and values per local layer, (B, n_kv_local, max_len, head_dim)."""

    def __init__(self, layer_ids, batch: int, max_len: int, n_kv_local: int, head_dim: int, *, dtype, device):
        shape = (batch, n_kv_local, max_len, head_dim)
        self.k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layer_ids}
        self.v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layer_ids}
        self.batch, self.max_len = batch, max_len

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H, T, D) at positions start..start+T; return all keys/values up to there."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise LlamactlError(f"sequence of {end} tokens exceeds the KV cache of {self.max_len} (--max-new-tokens)")
        kc, vc = self.k[layer], self.v[layer]
        if k.shape[0] != kc.shape[0]:
            kc, vc = kc[:k.shape[0]], vc[:k.shape[0]]
        kc.narrow(2, start, k.shape[2]).copy_(k)  # narrow + copy_: a decode step's few-us write, no indexing
        vc.narrow(2, start, k.shape[2]).copy_(v)
        return kc.narrow(2, 0, end), vc.narrow(2, 0, end)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep / reorder batch rows (e.g. drop finished sequences)."""
        for d in (self.k, self.v):
            for i in d:
                d[i] = d[i].index_select(0, index)
        self.batch = int(index.numel())


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, layer_id: int, device=None, dtype=None):
        super().__init__()
        self.layer_id, self.head_dim, self.ctx = layer_id, cfg.head_dim, ctx
        tp, hd, nkv = ctx.tp, cfg.head_dim, cfg.kv_heads
        self.n_local_heads = cfg.n_heads // tp
        kw = dict(device=device, dtype=dtype)
        self.wq = ColumnParallelLinear(cfg.dim, cfg.n_heads * hd, ctx, **kw)
        if nkv % tp == 0:  # kv heads split over tp
            self.n_local_kv = nkv // tp
            shard, group = None, None
        else:  # tp % nkv == 0: each kv head replicated on the tp ranks of its query group
            self.n_local_kv = 1
            head = ctx.tp_rank // (tp // nkv)
            shard, group = TPShard(0, head * hd, hd, nkv * hd), ctx.kv_replica_group(nkv)
        self.wk = ColumnParallelLinear(cfg.dim, nkv * hd, ctx, shard=shard, grad_group=group, **kw)
        self.wv = ColumnParallelLinear(cfg.dim, nkv * hd, ctx, shard=shard, grad_group=group, **kw)
        self.wo = RowParallelLinear(cfg.n_heads * hd, cfg.dim, ctx, **kw)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, start_pos: int, sp: bool = False):
        """sp: x is this rank's slice of the sequence; the output is too (sequence parallelism)."""
        f = None if sp else fused_weight(self)
        if sp:
            q, k, v = column_parallel_on_sequence(x, (self.wq, self.wk, self.wv), self.ctx)
        elif f is not None:  # inference after fuse_projections: one GEMM for q, k and v
            q, k, v = inference_linear(self, "qkv", x, f.weight).split_with_sizes(f.sizes, dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        b, t = q.shape[:2]
        q = q.view(b, t, self.n_local_heads, self.head_dim)
        k = k.view(b, t, self.n_local_kv, self.head_dim)
        v = v.view(b, t, self.n_local_kv, self.head_dim)
        q, k = apply_rope(q, k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_id, start_pos, k, v)
        rep = self.n_local_heads // self.n_local_kv
        if mask is None and t > 1:  # causal self-attention over these t tokens (training, prefill)
            out = causal_attention(q, k, v)
        elif t == 1:  # one new token: it sees every cached key; GQA as `rep` queries per kv head (no kv copy)
            out = F.scaled_dot_product_attention(q.reshape(b, self.n_local_kv, rep, self.head_dim), k, v,
                                                 attn_mask=mask).view(b, self.n_local_heads, 1, self.head_dim)
        else:  # an explicit mask (offset, padding)
            out = F.scaled_dot_product_attention(q, repeat_kv(k, rep), repeat_kv(v, rep), attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, t, -1)
        if f is not None:
            return reduce_from_tp(inference_linear(self, "wo", out, f.out), f.ctx)
        return self.wo(out, sequence_parallel=sp)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.ctx = ctx
        self.w1 = ColumnParallelLinear(cfg.dim, cfg.ffn_dim, ctx, **kw)
        self.w3 = ColumnParallelLinear(cfg.dim, cfg.ffn_dim, ctx, **kw)
        self.w2 = RowParallelLinear(cfg.ffn_dim, cfg.dim, ctx, **kw)

    def forward(self, x, sp: bool = False):
        """sp: x is this rank's slice of the sequence; the output is too (sequence parallelism)."""
        if sp:
            a, c = column_parallel_on_sequence(x, (self.w1, self.w3), self.ctx)
            return self.w2(swiglu(a, c), sequence_parallel=True)
        f = fused_weight(self)
        if f is not None:  # inference after fuse_projections: one GEMM for the gate and the up projection
            a, c = inference_linear(self, "w13", x, f.weight).split_with_sizes(f.sizes, dim=-1)
            return reduce_from_tp(inference_linear(self, "w2", swiglu(a, c), f.out), f.ctx)
        return self.w2(swiglu(self.w1(x), self.w3(x)))


# ---- inference: projections that read the same input as one GEMM ---------------------------------------
class _Fused:
    """A module's input projections as one (sum of outputs, in) matrix, and its output projection."""

    def __init__(self, weight, params, out, ctx):
        self.weight, self.params, self.out, self.ctx = weight, params, out, ctx
        self.sizes = [p.shape[0] for p in params]
        self.ptrs = [p.data_ptr() for p in params]


def fused_weight(module: nn.Module) -> _Fused | None:
    """The fusion `fuse_projections` made for this Attention / FeedForward, when it is still what the
    parameters hold (a load or a replaced .data unfuses) and no gradient is being recorded."""
    f = module.__dict__.get("_llamactl_fused")
    if f is None or torch.is_grad_enabled():
        return None
    for p, ptr in zip(f.params, f.ptrs):
        if p.data_ptr() != ptr:
            return None
    return f


GEMV_MAX_ROWS = 8  # up to this many rows, CPU fp32 products run the decode GEMV kernel
# smallest weight (elements) worth a oneDNN-packed copy. Measured on 2 cores (AVX-512), 16 / 64 rows, packed
# against MKL on the column-major weight: 45-50k elements 0.68-1.04x, 90-111k 0.98-1.20x, 128k (a 1000 x 128
# head) 1.19-1.26x, 180-200k 1.15-1.54x, 0.4-1.4M 1.17-2.03x. A copy also costs ~120-270 us to make, again
# after every PPO policy update (`stages.ppo_iteration.sync_sampler`): at dim 128 re-packing took ~8 of a
# 29 ms rollout and bought nothing
PACK_MIN_ELEMENTS = 1 << 17


def inference_linear(owner: nn.Module, key: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T without autograd. On CPU in fp32, up to GEMV_MAX_ROWS rows (decoding) run the fused GEMV
    kernel, which reads w once for all rows near copy bandwidth in either layout (MKL's matrix-vector
    streams it at ~15 GB/s against ~20 for a copy, and slower still for 2-8 rows). Otherwise, for 2+ rows
    on CPU, through a oneDNN-packed copy of w when `owner` was marked by `fuse_projections(..., pack=True)`
    and w has at least PACK_MIN_ELEMENTS: MKL's fp32 GEMM streams a large (features x dim) weight at about
    half the speed for a handful of rows, oneDNN's packed kernel does not (below that size it is no
    faster). Under autocast (bf16 rollouts) or with autograd recording, F.linear."""
    if torch.is_autocast_enabled(x.device.type) or torch.is_grad_enabled():  # F.linear casts / records
        return F.linear(x, w)
    rows = x.numel() // max(1, x.shape[-1])
    if rows <= GEMV_MAX_ROWS and gemv_fused(x.device.type, x.dtype, w.dtype):
        return torch.ops.llamactl.gemv.default(x, w)  # the overload itself: kernels.gemv minus two lookups
    if rows >= 2 and owner.__dict__.get("_llamactl_pack", False) and w.numel() >= PACK_MIN_ELEMENTS:
        packed = packed_weight(owner, key, w, rows)
        if packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]).contiguous(), packed, None,
                                                   "none", [], "")
            return y.view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)


def packed_weight(owner: nn.Module, key: str, w: torch.Tensor, rows: int):
    """oneDNN-packed copy of fp32 CPU weight w, cached on `owner` under `key` and re-packed whenever w
    changes (its storage or version counter moves, e.g. after an optimizer step), so never stale; None
    where oneDNN cannot (another device or dtype, a torch without these ops: then packing is switched off)."""
    if w.device.type != "cpu" or w.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    try:
        stamp = (w.data_ptr(), w._version)
    except RuntimeError:  # an inference tensor has no version counter: never re-packed
        stamp = (w.data_ptr(), -1)
    cache = owner.__dict__.setdefault("_llamactl_packed", {})
    hit = cache.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), rows)
    except (RuntimeError, AttributeError):
        owner.__dict__["_llamactl_pack"] = False
        return None
    cache[key] = (stamp, packed)
    return packed


HUGE_PAGE = 2 << 20
MIN_HUGE_BYTES = 256 << 10  # smaller weights stay in plain memory (each mapping may hold one page unused)


def decode_buffer(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An empty tensor to hold inference weights: on CPU under Linux, marked for transparent huge pages
    (madvise before the first touch), elsewhere torch.empty.

    A decode step streams every weight once; with 4 KiB pages the hardware prefetchers restart at every
    page boundary and the TLB misses every 4 KiB. On the dev VM (1 thread) the decode GEMV reads 2 MiB
    pages 15-25 % faster (512 x 3072 column-major: 21 -> 26 GB/s; the 32000 x 512 head: 20 -> 23-26). The
    tensor is a view into a torch allocation of whole 2 MiB blocks from an aligned start (at most one page
    more than needed), so every page of it can be a huge one and torch's allocator frees it as usual.
    Without huge pages (THP off, none free) it is plain memory.
    """
    device = torch.device(device)
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    advise = _madvise()
    if device.type != "cpu" or nbytes < MIN_HUGE_BYTES or advise is None:
        return torch.empty(shape, dtype=dtype, device=device)
    span = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    raw = torch.empty(span + HUGE_PAGE, dtype=torch.uint8)  # not touched yet: no page is backed
    off = -raw.data_ptr() % HUGE_PAGE
    advise(raw.data_ptr() + off, span)
    return raw[off:off + nbytes].view(dtype).view(shape)


@functools.cache
def _madvise():
    """madvise(addr, len, MADV_HUGEPAGE) through libc (None where there is none); failures are ignored."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lambda addr, length: fn(addr, length, mmap.MADV_HUGEPAGE)


@torch.no_grad()
def fuse_projections(model: "Transformer", *, pack: bool = False) -> int:
    """Store wq|wk|wv and w1|w3 of every layer as slices of one column-major matrix each (same values, no
    extra memory: the parameters become views into it), so a decode step runs 4 GEMMs per layer, not 7.

    A decode step at small batch is a string of matrix-vector products, each a parallel region with its
    own start-up cost; fewer, larger ones stream the same bytes with less overhead. Forward passes use the
    fused matrix only without autograd (training keeps the per-parameter path); returns the fused count.
    pack: batches of more rows than the GEMV kernel takes also use oneDNN-packed copies of the four matrices
    (`inference_linear`; one extra copy of the layer weights, made at the first such batch). The fused
    matrices live on huge pages (`decode_buffer`).
    """
    n = 0
    for blk in model.layers.values():
        for mod, names, out in ((blk.attention, ("wq", "wk", "wv"), "wo"), (blk.feed_forward, ("w1", "w3"), "w2")):
            mod.__dict__["_llamactl_pack"] = pack
            ws = [getattr(mod, k).weight for k in names]
            if ws[0].device.type != "cpu" or fused_weight(mod) is not None:
                continue
            buf = decode_buffer((ws[0].shape[1], sum(w.shape[0] for w in ws)), ws[0].dtype, ws[0].device)
            fused = buf.t()  # (outputs, in) column-major
            start = 0
            for w in ws:
                fused[start:start + w.shape[0]].copy_(w)
                w.data = fused[start:start + w.shape[0]]
                start += w.shape[0]
            o = getattr(mod, out)
            mod.__dict__["_llamactl_fused"] = _Fused(fused, ws, o.weight, o.ctx)
            n += 1
    return n


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, layer_id: int, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.tp_group = ctx.tp_group if ctx.tp > 1 else None
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, **kw)
        self.attention = Attention(cfg, ctx, layer_id, **kw)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, **kw)
        self.feed_forward = FeedForward(cfg, ctx, **kw)

    def forward(self, x, cos, sin, mask=None, cache=None, start_pos=0, sp: bool = False):
        """sp: x (and the result) is this rank's slice of the sequence; the norms' weight gradients are summed
        over tp (each rank normed only its rows)."""
        group = self.tp_group if sp else None
        h = x + self.attention(self.attention_norm(x, group), cos, sin, mask, cache, start_pos, sp)
        return h + self.feed_forward(self.ffn_norm(h, group), sp)


class Transformer(nn.Module):
    """One pipeline stage of a Llama 2 model (the whole model when pp == 1)."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext | None = None, head: str = "lm", device=None, dtype=None):
        super().__init__()
        if head not in HEADS:
            raise LlamactlError(f"unknown head {head!r}; one of {', '.join(HEADS)}")
        ctx = ctx or ParallelContext.single()
        ctx.validate(cfg.n_heads, cfg.kv_heads, cfg.n_layers, cfg.vocab_size, cfg.ffn_dim)
        self.cfg, self.ctx, self.head = cfg, ctx, head
        self.recompute = False  # activation recomputation per layer (trainer sets it)
        self.sequence_parallel = False  # Megatron-SP in training forwards (trainer sets it; see module doc)
        kw = dict(device=device, dtype=dtype)
        # interleaved 1F1B: this rank's layer chunks (one at virtual_stages 1), layers under their global index
        self.chunks = [list(c) for c in chunk_layers(cfg.n_layers, ctx.pp, ctx.pp_rank, ctx.virtual_stages)]
        self.layer_ids = [i for c in self.chunks for i in c]
        self.tok_embeddings = VocabParallelEmbedding(cfg.vocab_size, cfg.dim, ctx, **kw) if ctx.is_first_stage else None
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, ctx, i, **kw) for i in self.layer_ids})
        self.norm = self.output = self.score = None
        if ctx.is_last_stage:
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps, **kw)
            if head == "lm":
                self.output = ColumnParallelLinear(cfg.dim, cfg.vocab_size, ctx, **kw)
            else:
                self.score = nn.Linear(cfg.dim, 1, bias=False, **kw)
        self._rope_len = 0
        self.register_buffer("rope_cos", torch.empty(0, device=device), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0, device=device), persistent=False)

    # ---- rope tables (recomputed after meta -> real materialisation) ----------------------------------
    def _rope(self, n: int, device):
        # tables made under inference_mode (a rollout) cannot be saved for a later backward (PPO's ratio)
        stale = self.rope_cos.is_inference() and not torch.is_inference_mode_enabled()
        if self._rope_len < n or self.rope_cos.device != torch.device(device) or self.rope_cos.is_meta or stale:
            size = max(n, self.cfg.max_seq_len)
            self.rope_cos, self.rope_sin = rope_tables(self.cfg.head_dim, size, self.cfg.rope_theta, device=device)
            self._rope_len = size
        return self.rope_cos, self.rope_sin

    def forward(self, x: torch.Tensor, *, start_pos: int = 0, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                last_only: bool = False, return_hidden: bool = False,
                attn_mask: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
        """x: token ids (B, T) on the first stage, hidden states (B, T, dim) on later stages.

        start_pos: position of x[:, 0] in the KV cache. positions (B, T): explicit RoPE positions (e.g.
        left-padded prompts); key_mask (B, start_pos+T) bool: False marks padding keys never attended to
        (a single decoded token, T == 1, must itself be marked True). attn_mask (B, 1, T, start_pos+T)
        bool, True where a query may see a key, replaces both (packed SFT samples kept apart).
        Returns lm logits (B, T, V/tp) fp32, reward/value scalars (B, T) fp32, or hidden states on a
        non-last pipeline stage. last_only keeps only the last position (generation). return_hidden: on the
        last stage, return the final-normed hidden states (B, T, dim) instead of the head's output.
        chunk: run only this layer chunk (virtual pipeline stages): the embedding only in chunk 0, the norm +
        head only in the last; None runs them all.
        """
        t = x.shape[1]
        sp = self.uses_sequence_parallel(t, cache)
        if self.tok_embeddings is not None and not chunk:
            h = self.tok_embeddings(x, sequence_parallel=sp)
        else:
            h = split_to_sequence(x, self.ctx) if sp else x
        cos_t, sin_t = self._rope(start_pos + t if positions is None else int(positions.max()) + 1, h.device)
        if positions is None:
            cos, sin = cos_t.narrow(0, start_pos, t), sin_t.narrow(0, start_pos, t)
        else:
            cos, sin = cos_t[positions], sin_t[positions]
        mask = attn_mask
        if mask is None and key_mask is not None and t == 1:  # one decoded token sees every real cached key
            mask = key_mask[:, None, None, :start_pos + 1].bool()
        elif mask is None and (key_mask is not None or (start_pos > 0 and t > 1)):
            mask = _attention_mask(t, start_pos, key_mask, h.device)
        for blk in (self.layers.values() if chunk is None else [self.layers[str(i)] for i in self.chunks[chunk]]):
            if self.recompute and self.training:
                h = recompute(blk, h, cos, sin, mask, cache, start_pos, sp, use_reentrant=False)
            else:
                h = blk(h, cos, sin, mask, cache, start_pos, sp)
        if sp:  # whole sequence at the stage boundary and for the final norm + head
            h = gather_sequence(h, self.ctx)
        if self.norm is None or chunk not in (None, len(self.chunks) - 1):
            return h
        if last_only:
            h = h[:, -1:]
        h = self.norm(h)
        if return_hidden:
            return h
        if self.output is not None:
            return self.output(h).float()
        return self.score(h).squeeze(-1).float()

    def uses_sequence_parallel(self, seq_len: int, cache: KVCache | None = None) -> bool:
        """Whether this forward splits the sequence over tp: asked for, training with grad, no KV cache, and
        seq_len divisible by tp (otherwise the plain path, which gives the same results)."""
        return (self.sequence_parallel and self.training and torch.is_grad_enabled() and cache is None
                and sequence_split(self.ctx, seq_len))

    def new_cache(self, batch: int, max_len: int, dtype=None, device=None) -> KVCache:
        p = next(self.parameters())
        return KVCache(self.layer_ids, batch, max_len, self.layers[str(self.layer_ids[0])].attention.n_local_kv,
                       self.cfg.head_dim, dtype=dtype or p.dtype, device=device or p.device)


def _attention_mask(t: int, start_pos: int, key_mask: torch.Tensor | None, device) -> torch.Tensor:
    """Bool mask (B|1, 1, T, start_pos+T): causal from offset start_pos, minus padding keys.

    Every query may always see itself, so rows of padding queries never become all -inf (NaN).
    """
    s = start_pos + t
    q_pos = torch.arange(start_pos, s, device=device)[:, None]
    k_pos = torch.arange(s, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :s].bool()
        mask = mask | (k_pos == q_pos)[None, None]
    return mask


# ---- padding: one convention for scoring, generation and last_token ------------------------------------
# A padded batch (B, T) is described by which tokens are real: `lengths` (B,) for right padding (row i's
# real tokens are tokens[i, :lengths[i]]: what `collate` and the data loaders produce), or a bool mask
# (B, T), True at real tokens, contiguous in each row, padding on either side. Right padding needs no
# attention mask and no position offsets (causal attention never lets a real token see a later pad), so
# it runs the plain causal path; left padding gets per-row RoPE positions counted from the first real
# token and a key mask, so in both cases a row scores exactly as it would alone.
def real_mask(lengths_or_mask: torch.Tensor | None, shape, device=None) -> torch.Tensor:
    """The (B, T) bool mask of real tokens from lengths (B,) (right padding) or a mask (B, T) (any side)."""
    b, t = shape
    if lengths_or_mask is None:
        return torch.ones(b, t, dtype=torch.bool, device=device)
    x = torch.as_tensor(lengths_or_mask, device=device)
    if x.dim() == 1:
        if x.shape[0] != b or bool((x < 1).any()) or bool((x > t).any()):
            raise ValueError(f"lengths must be {b} values in [1, {t}], got {x.tolist()}")
        return torch.arange(t, device=x.device)[None] < x[:, None]
    if tuple(x.shape) != (b, t):
        raise ValueError(f"mask of shape {tuple(x.shape)} does not match tokens {(b, t)}")
    return x.bool()


def padding_layout(mask: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(positions, key_mask) for Transformer.forward from a real-token mask (B, T): (None, None) when every
    row is right-padded (or unpadded), else RoPE positions from each row's first real token and the mask."""
    n = mask.sum(1)
    if bool((n < 1).any()):
        raise ValueError("every row needs at least one real token")
    t = mask.shape[1]
    first = mask.int().argmax(1)
    last = t - 1 - mask.flip(1).int().argmax(1)
    if bool((last - first + 1 != n).any()):
        raise ValueError("padding must be at the ends of a row (real tokens contiguous)")
    if bool((first == 0).all()):
        return None, None
    positions = (torch.arange(t, device=mask.device)[None] - first[:, None]).clamp(min=0)
    return positions, mask


def last_token(values: torch.Tensor, lengths_or_mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence scalar from per-token values (B, T): the value at each row's last real token, given
    lengths (B,) (right padding: index lengths-1) or a real-token mask (B, T) (padding on either side)."""
    if lengths_or_mask.dim() == 2:
        idx = values.shape[1] - 1 - lengths_or_mask.int().flip(1).argmax(1)
    else:
        idx = (lengths_or_mask - 1).clamp(min=0)
    return values.gather(1, idx.to(values.device).unsqueeze(1)).squeeze(1)


# ---- construction and initialisation ---------------------------------------------------------------
def build_model(cfg: ModelConfig, ctx: ParallelContext | None = None, head: str = "lm", *, device="cpu",
                dtype=torch.float32, seed: int | None = None) -> Transformer:
    """Build this rank's shard on the meta device, then materialise it on `device`.

    With `seed`, weights are initialised (N(0, 0.02), output projections scaled by 1/sqrt(2*layers),
    norms 1) from the full tensor of each parameter, so any layout gets the same global weights.
    Without a seed the parameters are left uninitialised, to be filled by checkpoint.load.
    """
    with torch.device("meta"):
        model = Transformer(cfg, ctx, head, dtype=dtype)
    model.to_empty(device=device)
    if seed is not None:
        init_weights(model, seed)
    return model


def _param_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def init_weights(model: Transformer, seed: int, std: float = 0.02, only=None) -> None:
    """Layout-independent init: each parameter's full tensor from its own seeded generator, then sliced.

    `only`: names of the parameters to initialise (e.g. a fresh reward head); default all.
    """
    specs = shard_specs(model)
    out_std = std / math.sqrt(2 * model.cfg.n_layers)
    for name, p in model.named_parameters():
        if only is not None and name not in only:
            continue
        if name.endswith("norm.weight"):
            p.fill_(1.0)
            continue
        spec = specs.get(name)
        shape = list(p.shape)
        if spec is not None:
            shape[spec.dim] = spec.full
        g = torch.Generator().manual_seed(_param_seed(seed, name))
        s = out_std if name.endswith(("wo.weight", "w2.weight")) else std
        full = torch.randn(shape, generator=g, dtype=torch.float32) * s
        if spec is not None:
            full = full.narrow(spec.dim, spec.start, spec.length)
        p.copy_(full)
