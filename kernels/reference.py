"""Plain PyTorch specification of the fused ops. Every backend is tested against these functions.

Numerics follow Meta's reference implementation:
  rms_norm:  y = (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype) * weight
  apply_rope (half / rotate-half layout, as in Hugging Face checkpoints): with x = [x1, x2] split in
  halves of the head dim,  out = [x1*cos - x2*sin, x2*cos + x1*sin], computed in fp32, cast back.
  Its backward is the same rotation with sin negated.
  swiglu:    silu(a) * b, the gate of the feed-forward w2(silu(w1 x) * w3 x).
  linear:    x @ w^T (gemv, the decode products of a few rows against a weight in any layout).
  causal_attention: softmax(q k^T / sqrt(D) + causal mask) v, kv heads shared by groups of query heads (GQA).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(x.dtype) * weight


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.silu(a) * b


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


def repeat_kv(x: torch.Tensor, rep: int) -> torch.Tensor:
    """(B, Hkv, S, D) -> (B, Hkv*rep, S, D): kv head j serves query heads j*rep .. j*rep+rep-1 (GQA)."""
    if rep == 1:
        return x
    b, hk, s, d = x.shape
    return x[:, :, None].expand(b, hk, rep, s, d).reshape(b, hk * rep, s, d)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (B, H, T, D) over k, v (B, Hkv, T, D); query head h uses kv head h // (H / Hkv)."""
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(k, rep), repeat_kv(v, rep), is_causal=True)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, D); cos/sin: (T, D/2) or (B, T, D/2) fp32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q (B, T, Hq, D) and k (B, T, Hk, D) by the angles whose cos/sin are given per position."""
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def rope_tables(head_dim: int, max_len: int, theta: float = 10000.0, device=None):
    """cos, sin of shape (max_len, head_dim/2), fp32: angle[t, i] = t * theta^(-2i/head_dim)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    ang = torch.outer(torch.arange(max_len, device=device, dtype=torch.float64), inv)
    return ang.cos().float(), ang.sin().float()
