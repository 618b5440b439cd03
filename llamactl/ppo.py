"""PPO's arithmetic (paper section 3.2.3; Schulman et al. 2017; Stiennon et al. 2020), as pure functions.

Every tensor is per token, (B, T-1), aligned with `scoring.token_logprobs`: entry t belongs to the
prediction of token t+1. `mask` (bool, same shape) is True at generated (response) tokens only, so the
prompt and padding never carry KL, reward, advantage or loss. Response tokens of a row are contiguous
(prompt, then response, then right padding: `generation.collate`).

    kl_t       = log pi(y_t) - log pi_0(y_t)                      response tokens only
    r_t        = -beta * kl_t  (+ score at the row's last response token)
    A_t        = GAE(r, V; gamma, lambda) over response tokens, then whitened over valid tokens
    L_policy   = max(-A ratio, -A clip(ratio, 1-eps, 1+eps))     summed over valid tokens
    L_value    = 1/2 max((V-R)^2, (clip(V, V_old-eps, V_old+eps)-R)^2)

Losses and metrics are returned as SUMS over valid tokens (the trainer divides by the valid tokens of
the whole global batch, so accumulation and data parallelism give the gradient of one big batch).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

GAMMA = 1.0
LAMBDA = 0.95
CLIP = 0.2


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi - log pi_0 of each sampled token (the k1 estimator, whose sum over a response is an unbiased
    estimate of KL(pi || pi_0) of that response); 0 on prompt and padding."""
    return (logprobs - ref_logprobs).masked_fill(~mask, 0.0)


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last True entry (rows need at least one)."""
    t = mask.shape[1]
    return t - 1 - mask.flip(1).int().argmax(1)


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token reward of eq. (4): -beta * kl at every response token, plus the sequence score (B,) (the
    whitened logit of R_c) at the row's last response token."""
    r = (-beta * kl).masked_fill(~mask, 0.0)
    idx = last_valid_index(mask)
    return r.scatter_add(1, idx[:, None], score.to(r.dtype)[:, None])


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = GAMMA,
        lam: float = LAMBDA) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens: (advantages, returns = advantages + values),
    0 outside the mask. The value after a row's last response token is 0 (the episode ends there)."""
    b, t = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(b, dtype=rewards.dtype, device=rewards.device)
    next_v = torch.zeros_like(last)
    for i in range(t - 1, -1, -1):
        m = mask[:, i]
        delta = rewards[:, i] + gamma * next_v - values[:, i]
        last = torch.where(m, delta + gamma * lam * last, torch.zeros_like(last))
        next_v = torch.where(m, values[:, i], torch.zeros_like(next_v))
        adv[:, i] = last
    returns = (adv + values).masked_fill(~mask, 0.0)
    return adv, returns


def masked_moments(x: torch.Tensor, mask: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance of x over the True entries of mask, summed over `group` (data parallel)
    when one is given."""
    s = torch.stack([mask.sum().to(torch.float64), (x * mask).sum().to(torch.float64),
                     (x * x * mask).sum().to(torch.float64)])
    if group is not None:
        dist.all_reduce(s, group=group)
    n = s[0].clamp(min=1)
    mean = s[1] / n
    var = (s[2] / n - mean * mean).clamp(min=0)
    return mean.to(x.dtype), var.to(x.dtype)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, group=None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over valid tokens (the advantage whitening); 0 outside the mask."""
    mean, var = masked_moments(x, mask, group)
    return ((x - mean) * torch.rsqrt(var + eps)).masked_fill(~mask, 0.0)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float = CLIP) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate, summed over valid tokens, with summed metrics: clip_frac (tokens whose ratio was
    clipped in the active branch) and approx_kl ((r - 1) - log r, Schulman's k3 estimator of KL(old || new))."""
    m = mask.to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs).masked_fill(~mask, 0.0)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = (torch.maximum(unclipped, clipped) * m).sum()
    with torch.no_grad():
        clip_frac = ((clipped > unclipped).to(m.dtype) * m).sum()
        approx_kl = (((ratio - 1.0) - log_ratio) * m).sum()
    return loss, {"clip_frac": clip_frac, "approx_kl": approx_kl}


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = CLIP) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss, summed over valid tokens, and the summed fraction of tokens where the clipped
    branch was the larger one (vf_clip_frac)."""
    m = mask.to(values.dtype)
    v_clip = old_values + (values - old_values).clamp(-clip, clip)
    a, b = (values - returns) ** 2, (v_clip - returns) ** 2
    loss = 0.5 * (torch.maximum(a, b) * m).sum()
    with torch.no_grad():
        frac = ((b > a).to(m.dtype) * m).sum()
    return loss, {"vf_clip_frac": frac}


def entropy_from_logits(logits: torch.Tensor, group=None) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim, (N,); with `group` the vocabulary is sharded over its
    ranks (tensor parallel): max, sum-exp and sum p*logit are all-reduced, never the logits."""
    logits = logits.float()
    m = logits.max(-1).values
    if group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    e = (logits - m[..., None]).exp()
    s = torch.stack([e.sum(-1), (e * logits).sum(-1)])
    if group is not None:
        dist.all_reduce(s, group=group)
    z, el = s[0], s[1]
    return z.log() + m - el / z


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over valid tokens (1: the value model predicts the returns; <= 0: no better
    than their mean)."""
    _, var_r = masked_moments(returns, mask)
    _, var_d = masked_moments(returns - values, mask)
    if float(var_r) == 0.0:
        return float("nan")
    return float(1.0 - var_d / var_r)


def sequence_sums(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) per-row sums over valid tokens (e.g. a response's KL)."""
    return (x * mask).sum(1)
