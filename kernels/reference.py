"""Plain PyTorch specification of the fused ops. Every backend is tested against these functions.

Numerics follow Meta's reference implementation:
  rms_norm:  y = (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype) * weight
  apply_rope (half / rotate-half layout, as in Hugging Face checkpoints): with x = [x1, x2] split in
  halves of the head dim,  out = [x1*cos - x2*sin, x2*cos + x1*sin], computed in fp32, cast back.
  Its backward is the same rotation with sin negated.
  swiglu:    silu(a) * b, the gate of the feed-forward w2(silu(w1 x) * w3 x).
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
