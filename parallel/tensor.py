"""Megatron-style tensor parallelism: the f / g conjugate ops and the layers built on them.

    copy_to_tp       (f)  forward identity,    backward all-reduce over tp
    reduce_from_tp   (g)  forward all-reduce,  backward identity
    gather_from_tp        forward all-gather on the last dim, backward split
    scatter_to_tp         forward split on the last dim, backward all-gather

ColumnParallelLinear splits the output features (q, k, v, w1, w3, lm head); RowParallelLinear splits
the input features (wo, w2) and reduces. VocabParallelEmbedding splits the vocabulary. Every layer
records which slice of the full weight it holds (TPShard) so checkpoints stay layout-independent.

Sequence parallelism (parallel/sequence.py): `column_parallel_on_sequence` runs column-parallel layers that
read one sequence-split input (one all-gather, the input's slice saved, no f op); with
`sequence_parallel=True` the row-parallel linear and the embedding reduce-scatter their partial sums along
the sequence instead of all-reducing them.

At tp == 1 no communication op runs: the layers are plain linears. Only torch.distributed calls are
used, on the tensor's own device, so gloo (CPU) and NCCL (GPU) both work.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from llamactl.parallel.buffers import reusable
from llamactl.parallel.context import ParallelContext
from llamactl.parallel.gather_split import GatherAlong, SplitAlong
from llamactl.parallel.sequence import linears_on_sequence, reduce_scatter_to_sequence


@dataclass(frozen=True)
class TPShard:
    """This rank holds full[dim][start:start+length] of a parameter whose full size on dim is `full`."""

    dim: int
    start: int
    length: int
    full: int


def shard_specs(model: nn.Module) -> dict[str, TPShard]:
    """Parameter name -> TPShard for every tensor-parallel parameter (others are replicated)."""
    out = {}
    for mname, mod in model.named_modules():
        for pname, spec in getattr(mod, "tp_shards", {}).items():
            out[f"{mname}.{pname}" if mname else pname] = spec
    return out


# ---- the conjugate ops ------------------------------------------------------------------------------
def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if group is None:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g.clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, g):
        return g, None


def copy_to_tp(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    return x if ctx.tp == 1 else _CopyToTP.apply(x, ctx.tp_group)


def reduce_from_tp(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    return x if ctx.tp == 1 else _ReduceFromTP.apply(x, ctx.tp_group)


def gather_from_tp(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    return x if ctx.tp == 1 else GatherAlong.apply(x, ctx.tp_group, ctx.tp, ctx.tp_rank, -1)


def scatter_to_tp(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    return x if ctx.tp == 1 else SplitAlong.apply(x, ctx.tp_group, ctx.tp, ctx.tp_rank, -1)


def reduce_grad_over(x: torch.Tensor, group) -> torch.Tensor:
    """Forward identity, backward all-reduce over `group`: for weights replicated on a sub-group."""
    return x if group is None else _CopyToTP.apply(x, group)


# ---- layers -----------------------------------------------------------------------------------------
class ColumnParallelLinear(nn.Module):
    """y = x W^T with W split on the output dim: each rank computes its slice of the features.

    `shard` overrides the default even split (used for GQA kv heads replicated across tp ranks).
    """

    def __init__(self, in_features: int, out_features: int, ctx: ParallelContext, *, gather_output: bool = False,
                 shard: TPShard | None = None, grad_group=None, device=None, dtype=None):
        super().__init__()
        self.ctx, self.gather_output, self.grad_group = ctx, gather_output, grad_group
        if shard is None:
            if out_features % ctx.tp:
                raise ValueError(f"out_features {out_features} not divisible by tp {ctx.tp}")
            n = out_features // ctx.tp
            shard = TPShard(0, ctx.tp_rank * n, n, out_features)
        self.tp_shards = {"weight": shard} if (ctx.tp > 1 or shard.length != shard.full) else {}
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(shard.length, in_features, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tp(x, self.ctx)
        y = F.linear(x, reduce_grad_over(self.weight, self.grad_group))
        return gather_from_tp(y, self.ctx) if self.gather_output else y


def column_parallel_on_sequence(x: torch.Tensor, layers, ctx: ParallelContext) -> tuple[torch.Tensor, ...]:
    """The outputs of ColumnParallelLinear `layers` (no gather_output) that all read x, this rank's slice of the
    sequence (sequence parallelism: q|k|v, w1|w3); each layer's grad_group still sums its weight's gradient."""
    return linears_on_sequence(x, [reduce_grad_over(m.weight, m.grad_group) for m in layers], ctx)


class RowParallelLinear(nn.Module):
    """y = x W^T with W split on the input dim: partial products are summed across tp."""

    def __init__(self, in_features: int, out_features: int, ctx: ParallelContext, *, input_is_parallel: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if in_features % ctx.tp:
            raise ValueError(f"in_features {in_features} not divisible by tp {ctx.tp}")
        self.ctx, self.input_is_parallel = ctx, input_is_parallel
        n = in_features // ctx.tp
        self.tp_shards = {"weight": TPShard(1, ctx.tp_rank * n, n, in_features)} if ctx.tp > 1 else {}
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, n, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, *, sequence_parallel: bool = False) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.ctx)
        y = F.linear(x, self.weight)
        return reduce_scatter_to_sequence(y, self.ctx) if sequence_parallel else reduce_from_tp(y, self.ctx)


class _CPULookup(torch.autograd.Function):
    """F.embedding whose dense (vocab x dim) weight gradient goes to a reused CPU block (parallel/buffers.py)
    instead of fresh pages every step; rows are summed with index_add_ in token order (deterministic)."""

    @staticmethod
    def forward(ctx, ids, weight):
        ctx.save_for_backward(ids)
        ctx.weight_shape = weight.shape
        return F.embedding(ids, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (ids,) = ctx.saved_tensors
        n, dim = ctx.weight_shape
        dw = reusable("embedding.dw", (n, dim), g.dtype, g.device).zero_()
        dw.index_add_(0, ids.reshape(-1), g.reshape(-1, dim))
        return None, dw


def _lookup(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if ids.device.type == "cpu" and weight.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return _CPULookup.apply(ids, weight)
    return F.embedding(ids, weight)


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split over tp: out-of-range ids give zeros, then all-reduce."""

    def __init__(self, num_embeddings: int, dim: int, ctx: ParallelContext, device=None, dtype=None):
        super().__init__()
        if num_embeddings % ctx.tp:
            raise ValueError(f"vocab {num_embeddings} not divisible by tp {ctx.tp}")
        self.ctx = ctx
        n = num_embeddings // ctx.tp
        self.vocab_start, self.vocab_end = ctx.tp_rank * n, (ctx.tp_rank + 1) * n
        self.tp_shards = {"weight": TPShard(0, self.vocab_start, n, num_embeddings)} if ctx.tp > 1 else {}
        self.num_embeddings, self.dim = num_embeddings, dim
        self.weight = nn.Parameter(torch.empty(n, dim, device=device, dtype=dtype))

    def forward(self, ids: torch.Tensor, *, sequence_parallel: bool = False) -> torch.Tensor:
        """sequence_parallel: return this rank's slice of the sequence (reduce-scatter, not all-reduce)."""
        if self.ctx.tp == 1:
            return _lookup(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = _lookup(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if sequence_parallel:
            return reduce_scatter_to_sequence(out, self.ctx)
        return reduce_from_tp(out, self.ctx)


# ---- vocab-parallel cross-entropy -------------------------------------------------------------------
_CE_CHUNK_ELEMS = 1 << 21  # logits per chunk (8 MB fp32): max, exp, sum and scale stay in cache


def _native_xent(src: torch.Tensor, dst: torch.Tensor) -> bool:
    """One pass per row in the CPU extension (kernels/csrc/cpu) instead of six torch ops over each chunk:
    fp32 CPU rows, one device (tp > 1 all-reduces between the passes), where the fused kernels run."""
    if not (src.device.type == "cpu" and src.dtype == dst.dtype == torch.float32 and src.is_contiguous()
            and dst.is_contiguous()):
        return False
    from llamactl.kernels.dispatch import backend

    return backend("cpu").fused


def softmax_xent_(src: torch.Tensor, dst: torch.Tensor, local_t: torch.Tensor, in_range: torch.Tensor,
                  group) -> torch.Tensor:
    """Cross-entropy of rows of vocab-sharded fp32 logits `src` (n, V/tp); `dst` (may be `src`) receives
    d loss / d logits = softmax - onehot(target). local_t (n, 1): target index within this shard (any
    value where not in_range); in_range (n,): the target lies in this shard. Returns the per-row loss
    log(sum exp) - logit[target] over the whole vocabulary. Rows are done a cache-sized block at a time;
    over tp the max and the (picked logit, sum exp) pairs are all-reduced once each."""
    if group is None and _native_xent(src, dst):
        return torch.ops.llamactl_cpu.softmax_xent_(src, dst, local_t, in_range)
    n, n_local = src.shape
    picked = torch.empty(n, dtype=torch.float32, device=src.device)
    sum_exp = torch.empty(n, dtype=torch.float32, device=src.device)
    rows = max(1, _CE_CHUNK_ELEMS // max(1, n_local))
    lmax = None
    if group is not None:
        lmax = src.amax(dim=-1).float()
        dist.all_reduce(lmax, op=dist.ReduceOp.MAX, group=group)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        g, xs = dst[s:e], src[s:e]
        m = xs.amax(dim=-1, keepdim=True).float() if lmax is None else lmax[s:e].unsqueeze(-1)
        torch.sub(xs, m, out=g)
        picked[s:e] = g.gather(-1, local_t[s:e]).squeeze(-1)
        g.exp_()
        torch.sum(g, dim=-1, out=sum_exp[s:e])
        if group is None:
            g.div_(sum_exp[s:e].unsqueeze(-1))
    picked.masked_fill_(~in_range, 0.0)
    if group is not None:
        both = torch.stack([picked, sum_exp])
        dist.all_reduce(both, group=group)
        picked, sum_exp = both[0], both[1]
        dst.div_(sum_exp.unsqueeze(-1))
    dst.scatter_add_(-1, local_t, -in_range.to(dst.dtype).unsqueeze(-1))
    return sum_exp.log() - picked


def target_slots(target: torch.Tensor, vocab_start: int, n_local: int, ignore_index: int):
    """(valid, in_range, local_t) for flat global target ids against the shard [vocab_start, +n_local)."""
    t = target.reshape(-1)
    valid = t != ignore_index
    local_t = t - vocab_start
    in_range = valid & (local_t >= 0) & (local_t < n_local)
    return valid, in_range, local_t.masked_fill(~in_range, 0).unsqueeze(-1)


class _VocabParallelCE(torch.autograd.Function):
    """Cross-entropy over vocab-sharded logits without gathering them: max all-reduce, sum-exp all-reduce.

    Returns per-token loss (-log p(target)); backward needs no communication. The forward already
    writes d loss / d logits (softmax - onehot) chunk by chunk of rows, so each chunk's passes stay in
    cache; the backward only scales it by the incoming gradient.
    """

    @staticmethod
    def forward(ctx, logits, target, vocab_start, group, ignore_index):
        n_local = logits.shape[-1]
        x = logits.reshape(-1, n_local)
        valid, in_range, local_t = target_slots(target, vocab_start, n_local, ignore_index)
        grad = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        loss = softmax_xent_(x, grad, local_t, in_range, group).masked_fill(~valid, 0.0)
        ctx.save_for_backward(grad, valid)
        ctx.logits_shape, ctx.logits_dtype = logits.shape, logits.dtype
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, g):
        grad, valid = ctx.saved_tensors
        # scaled in place: the buffer was made for this one backward (a second one raises, never lies)
        grad.mul_((g.reshape(-1) * valid.to(g.dtype)).unsqueeze(-1))
        return grad.view(ctx.logits_shape).to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ctx: ParallelContext, *,
                                 reduction: str = "mean", ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy of vocab-sharded logits (..., V/tp) against global target ids (...).

    reduction: "none" (per token, 0 at ignored positions), "sum", or "mean" over valid tokens.
    Per-token log-probs for RL are simply `-vocab_parallel_cross_entropy(..., reduction="none")`.
    """
    vocab_start = ctx.tp_rank * logits.shape[-1]
    loss = _VocabParallelCE.apply(logits, target, vocab_start, ctx.tp_group if ctx.tp > 1 else None, ignore_index)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / (target != ignore_index).sum().clamp(min=1)
    raise ValueError(f"unknown reduction {reduction!r}")
