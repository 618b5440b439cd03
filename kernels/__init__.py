"""Fused RMSNorm and RoPE: one entry point per op, the backend picked per device.

Backend order: CUDA extension (CUDA tensors) > native CPU extension (CPU tensors) > reference.
`LLAMACTL_KERNELS=reference` forces the reference. The fused backends arrive with the kernels issue;
until a backend is built, the reference runs.
"""
from __future__ import annotations

import torch

from llamactl.kernels import reference
from llamactl.kernels.reference import rope_tables


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dim (fp32 statistics, cast back, times weight)."""
    return reference.rms_norm(x, weight, eps)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary embedding of q (B, T, Hq, D) and k (B, T, Hk, D); cos/sin (T, D/2) or (B, T, D/2) fp32."""
    return reference.apply_rope(q, k, cos, sin)


__all__ = ["rms_norm", "apply_rope", "rope_tables"]
