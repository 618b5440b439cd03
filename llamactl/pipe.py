"""Forward-only passes through pipeline stages, for inference (scoring, generation) at any layout.

Training goes through the 1F1B schedule of parallel/pipeline.py; scoring and decoding need neither
micro-batches nor backward, only "run my layers, hand the activations on": the first stage embeds the
token ids, each later stage receives the hidden states (B, T, dim) of the previous one, and the last
stage holds the result, which `from_last_stage` broadcasts over the pipeline group so a caller on any
rank can use it. Every rank knows the token ids (and so every shape), hence no shape exchange.
Communication runs on the tensor's device (gloo and NCCL alike); at pp == 1 nothing is communicated.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from llamactl.parallel.context import ParallelContext


def autocast(dtype: torch.dtype | None, device: torch.device):
    """torch.autocast to `dtype` on `device` (GEMMs in bf16 from fp32 masters), or nothing when None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def stage_forward(model, tokens: torch.Tensor, ctx: ParallelContext, **kw) -> torch.Tensor | None:
    """model(tokens, **kw) across the pipeline: the last stage's output there, None on other stages.

    tokens (B, T) are the token ids on every rank (the first stage embeds them; later stages read only
    their shape). Activations travel in the parameters' dtype, as in training's p2p. With virtual stages
    the activations go round the ring of pipeline ranks once per chunk (chunk v of the last rank feeds
    chunk v + 1 of the first).
    """
    if ctx.pp == 1:
        return model(tokens, **kw)
    p0 = next(model.parameters())
    pp, virtual, r = ctx.pp, ctx.virtual_stages, ctx.pp_rank
    for v in range(virtual):
        if v == 0 and ctx.is_first_stage:
            x = tokens
        else:
            x = torch.empty(*tokens.shape[:2], model.cfg.dim, dtype=p0.dtype, device=p0.device)
            dist.recv(x, src=ctx.pp_ranks[(r - 1) % pp])
        out = model(x, chunk=v, **kw) if virtual > 1 else model(x, **kw)
        if v == virtual - 1 and ctx.is_last_stage:
            return out
        dist.send(out.detach().to(p0.dtype).contiguous(), dst=ctx.pp_ranks[(r + 1) % pp])
    return None


def from_last_stage(value: torch.Tensor | None, shape, dtype: torch.dtype, device, ctx: ParallelContext) -> torch.Tensor:
    """The last stage's `value` (of `shape`, `dtype`) on every stage of this rank's pipeline group."""
    if ctx.pp == 1:
        return value
    buf = value.detach().to(dtype).contiguous() if ctx.is_last_stage else torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(buf, src=ctx.pp_ranks[-1], group=ctx.pp_group)
    return buf
