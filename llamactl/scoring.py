"""Teacher-forced scoring at any tensor / pipeline layout: per-token log-probs and sequence scores.

PPO's ratio and KL term, rejection sampling and reward models score given token sequences rather than
sample them. `token_logprobs` gives log p(tokens[:, t+1] | tokens[:, :t+1]) from the lm head without
ever gathering the vocabulary or holding all logits: the fused head's per-token mode
(parallel/head_loss.py, reduction="none") takes a block of tokens at a time, with the vocab-parallel
log-softmax (max all-reduce, then sum-exp all-reduce over the tp group). `sequence_scores` reads the
scalar head (reward / value) at each row's last real token.

Padding follows the one convention of model.py (`real_mask`, `padding_layout`): pass `lengths` (B,)
for right-padded batches (what `collate` and the data loaders produce) or a bool mask (B, T) of real
tokens with padding on either side; a padded row scores exactly as it would alone.

At pp > 1 the values are computed on the last stage and broadcast over the pipeline group, so every
rank returns them (a no-grad scoring pass: training at pp > 1 calls `hidden_logprobs` inside its
pipelined loss_fn instead). At pp == 1 `token_logprobs` is differentiable (PPO's policy ratio).
"""
from __future__ import annotations

import contextlib

import torch

from llamactl.errors import LlamactlError
from llamactl.model import padding_layout, real_mask
from llamactl.parallel.context import ParallelContext
from llamactl.parallel.head_loss import lm_head_cross_entropy
from llamactl.pipe import autocast, from_last_stage, stage_forward

IGNORE = -100


def hidden_logprobs(hidden: torch.Tensor, head, targets: torch.Tensor, valid: torch.Tensor,
                    ctx: ParallelContext) -> torch.Tensor:
    """log p(targets) from final-normed hidden states (B, T, dim) through the vocab-parallel `head`,
    block by block (no full logits, no vocab gather); 0 where `valid` (B, T) is False. Differentiable:
    the piece a pipelined PPO loss_fn calls on the last stage."""
    t = targets.masked_fill(~valid, IGNORE)
    return -lm_head_cross_entropy(hidden, head, t, ctx, reduction="none", ignore_index=IGNORE)


def _prepare(model, tokens: torch.Tensor, lengths_or_mask, ctx: ParallelContext | None):
    ctx = ctx or getattr(model, "ctx", None) or ParallelContext.single()
    device = next(model.parameters()).device
    tokens = torch.as_tensor(tokens, device=device)
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (batch, seq), got shape {tuple(tokens.shape)}")
    real = real_mask(lengths_or_mask, tokens.shape, device)
    positions, key_mask = padding_layout(real)
    grad = contextlib.nullcontext() if ctx.pp == 1 else torch.no_grad()
    return ctx, device, tokens, real, dict(positions=positions, key_mask=key_mask), grad


def token_logprobs(model, tokens: torch.Tensor, mask: torch.Tensor | None = None, ctx: ParallelContext | None = None,
                   *, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, T-1) fp32: entry t is log p(tokens[:, t+1] | tokens[:, :t+1]) under the lm `model`, 0 where
    tokens[:, t+1] or tokens[:, t] is padding. mask: lengths (B,) (right padding) or real-token mask (B, T)
    (either side); None = no padding. Same values on every rank. autocast_dtype: e.g. torch.bfloat16
    GEMMs from fp32 weights (softmax stays fp32)."""
    if getattr(model, "head", "lm") != "lm":
        raise LlamactlError(f"token log-probs need a language-model head, not {model.head} (--model)")
    ctx, device, tokens, real, pad, grad = _prepare(model, tokens, mask, ctx)
    b, t = tokens.shape
    valid = real[:, 1:] & real[:, :-1]
    with grad, autocast(autocast_dtype, device):
        hidden = stage_forward(model, tokens, ctx, return_hidden=True, **pad)
        lp = None if hidden is None else hidden_logprobs(hidden[:, :-1], model.output, tokens[:, 1:], valid, ctx)
    return from_last_stage(lp, (b, t - 1), torch.float32, device, ctx)


def sequence_scores(model, tokens: torch.Tensor, lengths: torch.Tensor | None = None, ctx: ParallelContext | None = None,
                    *, per_token: bool = False, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B,) fp32 score of the reward / value `model` at each row's last real token (the reward of a
    sequence); per_token=True: the (B, T) values at every position instead, 0 at padding (PPO's value
    baseline). lengths: (B,) (right padding) or a real-token mask (B, T); None = no padding. Same values
    on every rank."""
    if getattr(model, "head", "lm") == "lm":
        raise LlamactlError("sequence scores need a reward or value checkpoint, not a language model (--model)")
    from llamactl.model import last_token

    ctx, device, tokens, real, pad, grad = _prepare(model, tokens, lengths, ctx)
    with grad, autocast(autocast_dtype, device):
        values = stage_forward(model, tokens, ctx, **pad)
        if values is not None:
            values = values.float().masked_fill(~real, 0.0) if per_token else last_token(values.float(), real)
    shape = tuple(tokens.shape) if per_token else (tokens.shape[0],)
    return from_last_stage(values, shape, torch.float32, device, ctx)
