"""Megatron sequence parallelism (Korthikanti et al. 2022): the ops that move activations between the
whole sequence and this rank's slice of it, inside the tensor-parallel group.

With sequence parallelism the work outside attention and the MLP (RMSNorm, the residual adds) runs on
T/tp positions per rank instead of all T on every rank, and its activations take 1/tp of the memory.
Activations are (B, T, D); the split is along T (dim 1): tp rank r holds positions [r*T/tp, (r+1)*T/tp).

    split_to_sequence           fwd split along T     bwd all-gather       replicated -> split (a stage's input)
    gather_from_sequence        fwd all-gather        bwd reduce-scatter   before the column-parallel linears:
                                                                           each rank's consumer gives a partial
                                                                           input gradient, summed and split here
    gather_sequence             fwd all-gather        bwd split            split -> replicated computation whose
                                                                           gradient is the same on every rank
                                                                           (final norm + head, stage boundary)
    reduce_scatter_to_sequence  fwd reduce-scatter    bwd all-gather       after the row-parallel linears and the
                                                                           vocab-parallel embedding (in place of
                                                                           their all-reduce)
    linears_on_sequence         fwd all-gather +      bwd all-gather +     the column-parallel linears that read
                                F.linear per weight   reduce-scatter       one split input (q|k|v, w1|w3)

`linears_on_sequence` is gather_from_sequence fused with the linears, as Megatron's SP linear: it saves only
this rank's slice of the input and all-gathers it again in backward for the weight gradients, so the
gathered (B, T, D) input of the attention and of the MLP is never kept between forward and backward
(otherwise 2 of the 1/tp-able activations per layer would stay whole). The price: one more all-gather per
block in backward.

An all-reduce is a reduce-scatter followed by an all-gather, so per layer the bytes equal those of the
plain tensor-parallel all-reduces. Gloo (torch >= 2.x) implements reduce_scatter and all_gather for CPU
tensors, so every op is one collective on gloo and NCCL alike. All tp ranks of a group see the same T, so
they all take the same path; callers use the plain path when T % tp != 0 (`sequence_split`).

Default (`use_sequence_parallel`): on at tp > 1 where the tp group runs NCCL, off on gloo. Per layer and
micro-batch SP replaces the 7 tp all-reduces of the plain path (2 forward, 5 backward: the inputs of q, k,
v, w1, w3) by 6 all-gathers (2 of them re-gathers) and 4 reduce-scatters, plus 2 all-reduces of dim floats
(the norm gains): 10 instead of 14 units of (tp-1)/tp of an activation's bytes, in 12 calls instead of 7.
NCCL runs an all-gather or a reduce-scatter in about half an all-reduce's time; gloo on CPU does not, and a
tp 2 step with SP is slower there (bench/sequence_parallel.py), so on gloo SP runs only when asked for (it
still divides the stored activations by tp).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from llamactl.parallel.context import ParallelContext
from llamactl.parallel.gather_split import GatherAlong, SplitAlong, all_gather_along, split_along

SEQ_DIM = 1


def use_sequence_parallel(asked: bool | None, ctx: ParallelContext, device: torch.device | str = "cpu") -> bool:
    """Whether training splits the sequence: never at tp 1; as asked (True / False); by default (None) on where
    the tp group's backend for `device` is not gloo (NCCL), off on gloo (see the module doc)."""
    if ctx.tp == 1:
        return False
    if asked is not None:
        return bool(asked)
    if ctx.tp_group is None or not dist.is_available() or not dist.is_initialized():
        return False  # a context without a world (shapes only): nothing trains
    backend = str(dist.get_backend(ctx.tp_group))
    if ":" in backend:  # "cpu:gloo,cuda:nccl": the backend of this device's tensors
        by_device = dict(part.split(":", 1) for part in backend.split(","))
        backend = by_device.get(torch.device(device).type, backend)
    return backend != "gloo"


def sequence_split(ctx: ParallelContext, seq_len: int) -> bool:
    """Whether a sequence of seq_len positions can be split over the tp group (tp > 1 and it divides evenly)."""
    return ctx.tp > 1 and seq_len % ctx.tp == 0


def _gather(x: torch.Tensor, group, world: int) -> torch.Tensor:
    return all_gather_along(x, group, world, SEQ_DIM)


def _split(x: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    return split_along(x, world, rank, SEQ_DIM)


def _reduce_scatter(x: torch.Tensor, group, world: int) -> torch.Tensor:
    if x.shape[SEQ_DIM] % world:
        raise ValueError(f"sequence of {x.shape[SEQ_DIM]} positions does not split over tp {world}")
    parts = [p.contiguous() for p in x.chunk(world, dim=SEQ_DIM)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


class _GatherFromSequence(torch.autograd.Function):
    """fwd all-gather, bwd reduce-scatter: each rank's consumer gave a partial gradient of the whole input."""

    @staticmethod
    def forward(ctx, x, group, world):
        ctx.group, ctx.world = group, world
        return _gather(x, group, world)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, ctx.group, ctx.world), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, world):
        ctx.group, ctx.world = group, world
        return _reduce_scatter(x, group, world)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, ctx.group, ctx.world), None, None


def split_to_sequence(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """This rank's slice of a tensor every tp rank holds whole; backward all-gathers the slices' gradients."""
    return x if ctx.tp == 1 else SplitAlong.apply(x, ctx.tp_group, ctx.tp, ctx.tp_rank, SEQ_DIM)


def gather_from_sequence(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """The whole sequence for the column-parallel linears; backward sums the ranks' partial input gradients
    and hands each rank its slice (reduce-scatter), which replaces the f op's all-reduce."""
    return x if ctx.tp == 1 else _GatherFromSequence.apply(x, ctx.tp_group, ctx.tp)


def gather_sequence(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """The whole sequence for computation replicated over tp (its gradient is equal on every rank, e.g. after
    the lm head's f op); backward keeps this rank's slice of that gradient."""
    return x if ctx.tp == 1 else GatherAlong.apply(x, ctx.tp_group, ctx.tp, ctx.tp_rank, SEQ_DIM)


def reduce_scatter_to_sequence(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Sum of the ranks' partial outputs, each rank keeping its slice of the sequence (in place of the g op's
    all-reduce); backward all-gathers the gradient."""
    return x if ctx.tp == 1 else _ReduceScatterToSequence.apply(x, ctx.tp_group, ctx.tp)


class _LinearsOnSequence(torch.autograd.Function):
    """y_i = F.linear(all_gather(x), w_i), saving x's slice only (see the module doc). Under autocast F.linear
    casts as it does anywhere; backward computes in the gradients' dtype and sums input gradients in x's."""

    @staticmethod
    def forward(ctx, x, group, world, *weights):
        ctx.group, ctx.world = group, world
        ctx.save_for_backward(x, *weights)
        full = _gather(x, group, world)
        return tuple(F.linear(full, w) for w in weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        full = _gather(x, ctx.group, ctx.world)  # again: only the slice was kept
        rows = full.reshape(-1, full.shape[-1])
        gx, gws = None, []
        for i, (g, w) in enumerate(zip(grads, weights)):
            part = (g @ w.to(g.dtype)).to(x.dtype)
            gx = part if gx is None else gx + part
            need = ctx.needs_input_grad[3 + i]
            gws.append((g.reshape(-1, g.shape[-1]).t() @ rows.to(g.dtype)).to(w.dtype) if need else None)
        return (_reduce_scatter(gx, ctx.group, ctx.world), None, None, *gws)


def linears_on_sequence(x: torch.Tensor, weights, ctx: ParallelContext) -> tuple[torch.Tensor, ...]:
    """F.linear(whole sequence, w) for each column-parallel weight w, from this rank's slice x of the sequence:
    one all-gather forward; backward re-gathers x for the weight gradients and reduce-scatters the summed input
    gradient (the f op's all-reduce is not needed)."""
    if ctx.tp == 1:
        return tuple(F.linear(x, w) for w in weights)
    return _LinearsOnSequence.apply(x, ctx.tp_group, ctx.tp, *weights)
