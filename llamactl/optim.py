"""The optimizer side of a training step: AdamW parameter groups, the learning-rate schedule, and the
clipped update.

Paper recipe: AdamW (0.9, 0.95, eps 1e-5), weight decay 0.1 on matrices only, cosine with warmup to 10 %
of peak (or constant), clip 1.0. The AdamW maker itself lives in parallel/data.py (with its ZeRO-1 form),
so the parallel package needs nothing from here; the gradient norm is measured there too (GradNorm) and
only applied here (`clipped_step`), inside the fused AdamW kernel where it can.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from llamactl.parallel.context import ParallelContext
from llamactl.parallel.data import make_optimizer


def lr_at(step: int, cfg) -> float:
    """Learning rate of update `step` (0-based): linear warmup, then cosine to min_lr_ratio * peak."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (2-D and up: linears, embeddings), never norms' gains or biases."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_adamw(groups: list[dict], cfg, ctx: ParallelContext | None = None):
    """The run's AdamW from a TrainConfig: sharded over dp (ZeRO-1) when cfg.zero and dp > 1."""
    ctx = ctx or ParallelContext.single()
    return make_optimizer(groups, ctx, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                          zero=bool(getattr(cfg, "zero", False)))


def clip_coef(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, max_norm / (norm + 1e-6)) exactly as clip_grad_norm_ computes it; kept a tensor on the norm's
    device, so clipping needs no host sync."""
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def takes_grad_scale(opt) -> bool:
    """torch's fused optimizers divide every gradient by `opt.grad_scale` inside their update kernel (the
    hook GradScaler unscales through); ZeroOptimizer forwards `defaults` and `grad_scale` to its inner one.
    foreach / for-loop AdamW assert that grad_scale is None."""
    return bool(getattr(opt, "defaults", {}).get("fused"))


def clipped_step(opt, params, norm: torch.Tensor, max_norm: float) -> None:
    """opt.step() on the gradients clipped to max_norm, given their total norm (max_norm 0: no clipping).

    A fused optimizer gets grad_scale = 1 / coef for this one step (set to None again afterwards, also
    when step raises, so it never reaches a later step): its kernel scales each gradient as it reads it
    (and writes it back scaled, as GradScaler expects), which saves clip_grad_norm_'s separate pass, one
    read of every fp32 gradient (~240 MB a step for `small`). Others get the in-place multiply
    clip_grad_norm_ does. Either way the result equals clip_grad_norm_ then step up to rounding
    (g / (1 / coef) against g * coef).
    """
    if not max_norm or max_norm <= 0:
        opt.step()
        return
    coef = clip_coef(norm, max_norm)
    if not takes_grad_scale(opt):
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, coef.to(grads[0].device))
        opt.step()
        return
    opt.grad_scale = torch.reciprocal(coef).float()
    try:
        opt.step()
    finally:
        opt.grad_scale = None
