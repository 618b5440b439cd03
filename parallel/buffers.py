"""Reused CPU memory for the large tensors a training step makes anew every step.

glibc serves every allocation above 32 MiB with fresh pages (mmap) and unmaps them at free, so on CPU a
65 MB tensor made each step costs ~16k page faults and their zero-fill (20-30 ms per tensor on the dev
VM): the logits block of the fused LM head, and the LM head's and the embedding's weight gradients of the
`small` preset. A GPU's caching allocator reuses such blocks; these two helpers do it for CPU tensors:

  scratch(key, n)        workspace that never leaves the function using it: always the same block.
  reusable(key, shape)   a tensor that is handed out (a gradient that autograd stores as p.grad): the
                         cached block is reused only when no tensor shares its storage any more (the
                         trainer's zero_grad dropped the gradient), else a new block is made and kept
                         too, so nothing anybody still holds is ever overwritten.

reusable returns a fresh view of the block, so autograd's AccumulateGrad may keep it as p.grad without a
copy (it copies a gradient whose TensorImpl is shared). Other devices get plain torch.empty.
"""
from __future__ import annotations

import math

import torch

_SCRATCH: dict[tuple, torch.Tensor] = {}
_POOLS: dict[tuple, list[torch.Tensor]] = {}
POOL_SIZE = 2  # blocks per key: the gradient held as p.grad + the next micro-batch's, under accumulation


def scratch(key: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer of at least n elements (its first n returned), kept across calls per (key, dtype, device)."""
    if torch.device(device).type != "cpu":
        return torch.empty(n, dtype=dtype, device=device)
    k = (key, dtype, torch.device(device))
    buf = _SCRATCH.get(k)
    if buf is None or buf.numel() < n:
        buf = _SCRATCH[k] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n]


def _unshared(block: torch.Tensor) -> bool:
    """True when the block's storage is referenced by the block alone (+1 for the probe's own handle)."""
    return torch._C._storage_Use_Count(block.untyped_storage()._cdata) <= 2


def reusable(key: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor of `shape` that may be handed out, from a cached block nobody else holds."""
    shape = tuple(shape)
    if torch.device(device).type != "cpu" or not hasattr(torch._C, "_storage_Use_Count"):
        return torch.empty(shape, dtype=dtype, device=device)
    n = math.prod(shape)
    pool = _POOLS.setdefault((key, dtype, torch.device(device)), [])
    for block in pool:
        if block.numel() == n and _unshared(block):
            return block.view(shape)
    block = torch.empty(n, dtype=dtype, device=device)
    pool.append(block)
    del pool[:-POOL_SIZE]  # the oldest block is freed once whoever holds it lets go
    return block.view(shape)


def pooled(t: torch.Tensor) -> bool:
    """Whether t lives in one of the reusable blocks (tests: autograd kept the block, not a copy)."""
    return any(t.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() for p in _POOLS.values() for b in p)


def clear() -> None:
    """Drop every cached block (tests, or to give the memory back)."""
    _SCRATCH.clear()
    _POOLS.clear()
