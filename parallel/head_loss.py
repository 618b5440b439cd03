"""LM head + cross-entropy in one pass over blocks of tokens: the (tokens x vocab) logits never exist whole.

For a 1024-token micro-batch and a 32k vocabulary the logits and their gradient are 131 MB each in
fp32: written, read back and freed every step (on CPU each fresh allocation of that size is also
page-faulted in). Here the forward takes the tokens a block at a time (at most 128 MB of logits), turns
the block's logits into d loss / d logits in place (`softmax_xent_`, shared with the vocab-parallel
cross-entropy) and folds them straight into d hidden and d weight with two GEMMs, as Liger-Kernel's
fused linear cross-entropy does. Backward then only scales the two saved gradients by the incoming
scalar ("sum" / "mean").

Per-token mode (reduction="none": the log-probs of PPO's ratio and KL term, rejection sampling's
scores) cannot fold the gradient in ahead, since each token's incoming gradient is only known in
backward. Its forward keeps the hidden states and each token's log-sum-exp over the whole (sharded)
vocabulary (8 bytes per token); backward recomputes each block's logits and turns them into
g * (softmax - onehot) with exp(logits - lse) -- no communication, as in the reduced path.

Works at any tensor-parallel size: the head weight is vocab-sharded (ColumnParallelLinear), the hidden
states enter through copy_to_tp (backward all-reduce), and each block's max and sum-exp are all-reduced
across the shards. Under autocast the GEMMs run in the autocast dtype, the softmax in fp32.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from llamactl.parallel.buffers import reusable, scratch
from llamactl.parallel.context import ParallelContext
from llamactl.parallel.tensor import copy_to_tp, reduce_grad_over, softmax_xent_, target_slots

# Logits per block (128 MiB fp32). Smaller blocks cost GEMM efficiency: on the 2-core dev machine the
# small preset's head (1024 tokens x 32k) took 970 ms fwd+bwd in 262-token blocks, 873 ms in one block.
# A 7B micro-batch of 4096 tokens still splits in four.
BLOCK_LOGITS = 1 << 25


def _logits_block(xs: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp32 logits xs @ w.T, on CPU into one scratch block kept across calls (parallel/buffers.py)."""
    if xs.device.type != "cpu" or w.dtype != torch.float32:
        return torch.mm(xs, w.t()).float()
    out = scratch("lm_head.logits", xs.shape[0] * w.shape[0], torch.float32, xs.device)
    return torch.mm(xs, w.t(), out=out.view(xs.shape[0], w.shape[0]))


def _gemm_dtype(device_type: str, default: torch.dtype) -> torch.dtype:
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError, RuntimeError):  # older torch: no per-device autocast queries
        pass
    return default


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, target, vocab_start, group, ignore_index, block_rows):
        n_local, dim = weight.shape
        x = h.reshape(-1, dim)
        valid, in_range, local_t = target_slots(target, vocab_start, n_local, ignore_index)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dt = _gemm_dtype(h.device.type, weight.dtype)
        n = x.shape[0]
        rows = block_rows or max(8, BLOCK_LOGITS // max(1, n_local))
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        dx = torch.empty_like(x) if want_h else None
        dw = reusable("lm_head.dw", weight.shape, torch.float32, weight.device) if want_w else None
        if dw is not None and n == 0:
            dw.zero_()
        with torch.autocast(device_type=h.device.type, enabled=False):
            w = weight.to(dt)
            for s in range(0, n, rows):
                e = min(n, s + rows)
                xs = x[s:e].to(dt)
                logits = _logits_block(xs, w)  # overwritten in place with d loss / d logits
                per_row = softmax_xent_(logits, logits, local_t[s:e], in_range[s:e], group)
                loss += per_row.masked_fill(~valid[s:e], 0.0).sum()
                if not (want_h or want_w):
                    continue
                logits.mul_(valid[s:e].unsqueeze(-1))  # ignored targets contribute nothing
                g = logits.to(dt)
                if want_h:
                    dx[s:e] = torch.mm(g, w)
                if want_w:  # the first block writes dw, later ones add to it (no zero-fill pass)
                    if dt == torch.float32:
                        torch.addmm(dw, g.t(), xs, beta=0 if s == 0 else 1, out=dw)
                    elif s == 0:
                        dw.copy_(torch.mm(g.t(), xs))
                    else:
                        dw += torch.mm(g.t(), xs).float()
        ctx.save_for_backward(dx, dw)
        ctx.h_shape, ctx.w_dtype = h.shape, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        dx, dw = ctx.saved_tensors
        # scaled in place (no second full-size buffer): they were made for this one backward, and a
        # second backward through the same graph raises instead of reusing them
        gh = None if dx is None else dx.mul_(g.to(dx.dtype)).view(ctx.h_shape)
        gw = None if dw is None else dw.mul_(g).to(ctx.w_dtype)
        return gh, gw, None, None, None, None, None


def _block_lse_picked(logits: torch.Tensor, local_t: torch.Tensor, in_range: torch.Tensor, group):
    """(log-sum-exp over the whole vocabulary, logit of the target) per row of a block of sharded fp32
    logits (n, V/tp): max all-reduce, then one all-reduce of (sum exp, picked logit)."""
    m = logits.amax(dim=-1)
    if group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    both = torch.stack([torch.exp(logits - m.unsqueeze(-1)).sum(dim=-1),
                        logits.gather(-1, local_t).squeeze(-1).masked_fill(~in_range, 0.0)])
    if group is not None:
        dist.all_reduce(both, group=group)
    return m + both[0].log(), both[1]


class _HeadTokenCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy (n,) of the head's logits, a block of tokens at a time."""

    @staticmethod
    def forward(ctx, h, weight, target, vocab_start, group, ignore_index, block_rows):
        n_local, dim = weight.shape
        x = h.reshape(-1, dim)
        valid, in_range, local_t = target_slots(target, vocab_start, n_local, ignore_index)
        dt = _gemm_dtype(h.device.type, weight.dtype)
        n = x.shape[0]
        rows = block_rows or max(8, BLOCK_LOGITS // max(1, n_local))
        lse = torch.zeros(n, dtype=torch.float32, device=h.device)
        loss = torch.zeros(n, dtype=torch.float32, device=h.device)
        with torch.autocast(device_type=h.device.type, enabled=False):
            w = weight.to(dt)
            for s in range(0, n, rows):
                e = min(n, s + rows)
                logits = torch.mm(x[s:e].to(dt), w.t()).float()
                lse[s:e], picked = _block_lse_picked(logits, local_t[s:e], in_range[s:e], group)
                loss[s:e] = lse[s:e] - picked
        loss.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(h, weight, lse, valid, in_range, local_t)
        ctx.dt, ctx.rows = dt, rows
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, g):
        h, weight, lse, valid, in_range, local_t = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dim = weight.shape[1]
        x = h.reshape(-1, dim)
        n, dt = x.shape[0], ctx.dt
        scale = g.reshape(-1).float() * valid.float()
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if want_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        with torch.autocast(device_type=h.device.type, enabled=False):
            w = weight.to(dt)
            for s in range(0, n, ctx.rows):
                e = min(n, s + ctx.rows)
                xs = x[s:e].to(dt)
                p = torch.mm(xs, w.t()).float().sub_(lse[s:e].unsqueeze(-1)).exp_()  # softmax of the block
                p.scatter_add_(-1, local_t[s:e], -in_range[s:e].float().unsqueeze(-1))
                p.mul_(scale[s:e].unsqueeze(-1))
                gl = p.to(dt)
                if want_h:
                    dx[s:e] = torch.mm(gl, w).to(x.dtype)
                if want_w:
                    dw += torch.mm(gl.t(), xs).float()
        return (None if dx is None else dx.view(h.shape), None if dw is None else dw.to(weight.dtype),
                None, None, None, None, None)


def lm_head_cross_entropy(hidden: torch.Tensor, head, target: torch.Tensor, ctx: ParallelContext, *,
                          reduction: str = "sum", ignore_index: int = -100,
                          block_rows: int | None = None) -> torch.Tensor:
    """Cross-entropy of `head(hidden)` (a vocab-parallel ColumnParallelLinear, no gather) against global
    target ids, without materialising the logits. hidden (..., dim), target (...). reduction: "sum" or
    "mean" over valid targets, or "none": per token (target's shape, 0 at ignored targets; the negated
    log-probs). block_rows overrides the token block size (tests)."""
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"lm_head_cross_entropy reduction is 'sum', 'mean' or 'none', got {reduction!r}")
    if target.shape != hidden.shape[:-1]:
        raise ValueError(f"target shape {tuple(target.shape)} does not match hidden {tuple(hidden.shape)}")
    weight = reduce_grad_over(head.weight, getattr(head, "grad_group", None))
    x = copy_to_tp(hidden, ctx)
    spec = getattr(head, "tp_shards", {}).get("weight")
    vocab_start = spec.start if spec is not None else 0
    group = ctx.tp_group if ctx.tp > 1 else None
    if reduction == "none":
        return _HeadTokenCrossEntropy.apply(x, weight, target, vocab_start, group, ignore_index, block_rows)
    loss = _HeadCrossEntropy.apply(x, weight, target, vocab_start, group, ignore_index, block_rows)
    if reduction == "mean":
        loss = loss / (target != ignore_index).sum().clamp(min=1)
    return loss
