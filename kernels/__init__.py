"""Fused RMSNorm, RoPE, SwiGLU, causal attention and the decode GEMV: one entry point per op, the backend picked per device.

Backend order: CUDA extension (CUDA tensors) > native CPU extension (CPU tensors) > reference
(`kernels/dispatch.py`). `LLAMACTL_KERNELS=reference` forces the reference. The first use on a device
builds the extension if it is not cached (kernels/build.py) and logs once which backend runs and why.
The fused paths take float32, bfloat16 and float64 (weight in the dtype of x); anything else runs the
reference. Causal attention has a CPU kernel only (fp32/fp64; elsewhere torch's SDPA, flash attention on
CUDA). Both directions of autograd are fused (kernels/ops.py registers them as torch custom ops,
so torch.compile traces through them).
"""
from __future__ import annotations

import torch

from llamactl.kernels import reference
from llamactl.kernels.dispatch import attention_fused, backend, gemv_fused, use_fused
from llamactl.kernels.reference import rope_tables


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dim (fp32 statistics, cast back, times weight)."""
    if use_fused(x.device.type, x.dtype, weight.dtype):
        return torch.ops.llamactl.rms_norm_fwd(x, weight, eps)[0]
    return reference.rms_norm(x, weight, eps)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary embedding of q (B, T, Hq, D) and k (B, T, Hk, D); cos/sin (T, D/2) or (B, T, D/2) fp32."""
    if use_fused(q.device.type, q.dtype, k.dtype):
        return torch.ops.llamactl.rope(q, k, cos, sin, False)
    return reference.apply_rope(q, k, cos, sin)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b (the feed-forward gate); fused, only a and b are kept for the backward."""
    if use_fused(a.device.type, a.dtype, b.dtype):
        return torch.ops.llamactl.swiglu(a, b)
    return reference.swiglu(a, b)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal self-attention, scale 1/sqrt(D): q (B, H, T, D), k and v (B, Hkv, T, D) with H a multiple of
    Hkv (GQA: query head h reads kv head h // (H / Hkv)). The output has q's memory layout, so for q viewed
    from (B, T, H, D) its transpose back to (B, T, H*D) is free."""
    if attention_fused(q.device.type, q.dtype) and k.dtype == v.dtype == q.dtype:
        return torch.ops.llamactl.causal_attention(q, k, v, q.shape[-1] ** -0.5)[0]
    return reference.causal_attention(q, k, v)


__all__ = ["rms_norm", "apply_rope", "swiglu", "causal_attention", "gemv", "gemv_fused", "rope_tables", "backend"]


def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T for decoding (x (..., K) of a few rows, w (N, K) row- or column-major), no autograd: on CPU
    in fp32 a kernel that streams w once for all rows (kernels/csrc/cpu/gemv_isa.cpp), else F.linear."""
    if gemv_fused(x.device.type, x.dtype, w.dtype):
        return torch.ops.llamactl.gemv(x, w)
    return reference.linear(x, w)
