"""All-gather and split along one dimension inside the tensor-parallel group, and their autograd pair.

The features split of the tensor-parallel layers (dim -1: gather_from_tp / scatter_to_tp) and the sequence
split of sequence parallelism (dim 1) are the same two collectives along different dimensions.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def all_gather_along(x: torch.Tensor, group, world: int, dim: int) -> torch.Tensor:
    """The tp group's pieces of x concatenated along `dim` (features: -1; sequence: 1)."""
    if group is None:
        return x
    parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def split_along(x: torch.Tensor, world: int, rank: int, dim: int) -> torch.Tensor:
    """This rank's piece of x along `dim` (an even split: a remainder is an error, never a silent drop)."""
    if world == 1:
        return x
    if x.shape[dim] % world:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split over tp {world}")
    return x.chunk(world, dim=dim)[rank].contiguous()


class GatherAlong(torch.autograd.Function):
    """fwd all-gather along `dim`, bwd keep this rank's piece (the gradient is the same on every rank)."""

    @staticmethod
    def forward(ctx, x, group, world, rank, dim):
        ctx.world, ctx.rank, ctx.dim = world, rank, dim
        return all_gather_along(x, group, world, dim)

    @staticmethod
    def backward(ctx, g):
        return split_along(g, ctx.world, ctx.rank, ctx.dim), None, None, None, None


class SplitAlong(torch.autograd.Function):
    """fwd keep this rank's piece along `dim`, bwd all-gather the pieces' gradients."""

    @staticmethod
    def forward(ctx, x, group, world, rank, dim):
        ctx.group, ctx.world, ctx.dim = group, world, dim
        return split_along(x, world, rank, dim)

    @staticmethod
    def backward(ctx, g):
        return all_gather_along(g, ctx.group, ctx.world, ctx.dim), None, None, None, None
