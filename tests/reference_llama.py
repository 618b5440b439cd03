"""Llama 2 written out plainly (explicit softmax, repeat_interleave GQA), for tests to compare against.

The RoPE variant is a parameter: the half ("rotate half", Hugging Face) layout of our model, or Meta's
interleaved complex-number form for checking converted weights.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F


def rope_half(hd: int, t: int, theta: float) -> Callable[[torch.Tensor], torch.Tensor]:
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1).float(), torch.cat([ang.sin()] * 2, -1).float()

    def rope(x):  # (b, t, h, hd)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos[None, :, None] + torch.cat([-x2, x1], -1) * sin[None, :, None]

    return rope


def rope_interleaved(hd: int, t: int, theta: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Meta's reference: complex rotation of interleaved (even, odd) pairs."""
    freqs = 1.0 / (theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    cis = torch.polar(torch.ones(t, hd // 2), torch.outer(torch.arange(t).float(), freqs))

    def rope(x):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * cis[None, :, None]).flatten(3)

    return rope


def llama_forward(sd: dict, tokens: torch.Tensor, *, n_layers: int, n_heads: int, n_kv_heads: int, eps: float,
                  rope: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Logits of a Llama 2 model from Meta-named weights `sd`."""
    b, t = tokens.shape
    nh, nkv = n_heads, n_kv_heads
    hd = sd["tok_embeddings.weight"].shape[1] // nh

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    h = sd["tok_embeddings.weight"][tokens]
    causal = torch.full((t, t), float("-inf")).triu(1)
    for i in range(n_layers):
        p = f"layers.{i}."
        x = norm(h, sd[p + "attention_norm.weight"])
        q = rope((x @ sd[p + "attention.wq.weight"].T).view(b, t, nh, hd)).transpose(1, 2)
        k = rope((x @ sd[p + "attention.wk.weight"].T).view(b, t, nkv, hd)).transpose(1, 2)
        v = (x @ sd[p + "attention.wv.weight"].T).view(b, t, nkv, hd).transpose(1, 2)
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + causal, -1)
        h = h + (att @ v).transpose(1, 2).reshape(b, t, -1) @ sd[p + "attention.wo.weight"].T
        x = norm(h, sd[p + "ffn_norm.weight"])
        ff = F.silu(x @ sd[p + "feed_forward.w1.weight"].T) * (x @ sd[p + "feed_forward.w3.weight"].T)
        h = h + ff @ sd[p + "feed_forward.w2.weight"].T
    return norm(h, sd["norm.weight"]) @ sd["output.weight"].T
