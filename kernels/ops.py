"""The fused ops as torch custom ops: schemas, shape functions (fake) and autograd, defined here once.

The device kernels come from the compiled extensions (`TORCH_LIBRARY_IMPL(llamactl, CPU|CUDA)` in
csrc/); this module only declares the ops, so torch.compile can trace models that call them (fake
implementations give output shapes without running anything) and autograd knows their backward:

  llamactl::rms_norm_fwd(x, weight, eps) -> (y, rstd)      rstd: fp32 (fp64 for fp64) per row
  llamactl::rms_norm_bwd(dy, x, weight, rstd) -> (dx, dw)
  llamactl::rope(q, k, cos, sin, inverse) -> (q_out, k_out) inverse=True rotates by -angle (backward)
  llamactl::swiglu(a, b) -> silu(a) * b                    saves a and b only (silu recomputed)
  llamactl::swiglu_bwd(dout, a, b) -> (da, db)
  llamactl::causal_attention(q, k, v, scale) -> (out, lse)  q (B, H, T, D), k/v (B, Hkv, T, D); lse (B, H, T)
  llamactl::causal_attention_bwd(dout, q, k, v, out, lse, scale) -> (dq, dk, dv)
  llamactl::gemv(x, w) -> x @ w^T                           decode products: x (..., K) of a few rows, w (N, K)
                                                            row- or column-major; inference only (no autograd)

causal_attention has a CPU kernel only (fp32, fp64); CUDA runs torch's own flash attention (reference).
gemv has a CPU kernel only (fp32).
"""
from __future__ import annotations

import torch

torch.library.define("llamactl::rms_norm_fwd", "(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)")
torch.library.define("llamactl::rms_norm_bwd", "(Tensor dy, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)")
torch.library.define("llamactl::rope", "(Tensor q, Tensor k, Tensor cos, Tensor sin, bool inverse) -> (Tensor, Tensor)")
torch.library.define("llamactl::swiglu", "(Tensor a, Tensor b) -> Tensor")
torch.library.define("llamactl::swiglu_bwd", "(Tensor dout, Tensor a, Tensor b) -> (Tensor, Tensor)")
torch.library.define("llamactl::causal_attention", "(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)")
torch.library.define("llamactl::causal_attention_bwd",
                     "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale) "
                     "-> (Tensor, Tensor, Tensor)")
torch.library.define("llamactl::gemv", "(Tensor x, Tensor w) -> Tensor")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("llamactl::rms_norm_fwd")
def _rms_norm_fwd_fake(x, weight, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), x.new_empty(x.shape[:-1], dtype=_acc(x.dtype))


@torch.library.register_fake("llamactl::rms_norm_bwd")
def _rms_norm_bwd_fake(dy, x, weight, rstd):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), weight.new_empty(weight.shape)


@torch.library.register_fake("llamactl::rope")
def _rope_fake(q, k, cos, sin, inverse):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device))


@torch.library.register_fake("llamactl::swiglu")
def _swiglu_fake(a, b):
    return torch.empty(a.shape, dtype=a.dtype, device=a.device)


@torch.library.register_fake("llamactl::swiglu_bwd")
def _swiglu_bwd_fake(dout, a, b):
    return torch.empty(a.shape, dtype=a.dtype, device=a.device), torch.empty(b.shape, dtype=b.dtype, device=b.device)


@torch.library.register_fake("llamactl::causal_attention")
def _causal_attention_fake(q, k, v, scale):  # out takes q's layout (made contiguous first if D is strided)
    return torch.empty_like(q if q.stride(-1) == 1 else q.contiguous()), q.new_empty(q.shape[:3])


@torch.library.register_fake("llamactl::causal_attention_bwd")
def _causal_attention_bwd_fake(dout, q, k, v, out, lse, scale):
    return tuple(torch.empty_like(t if t.stride(-1) == 1 else t.contiguous()) for t in (q, k, v))


@torch.library.register_fake("llamactl::gemv")
def _gemv_fake(x, w):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _rms_setup(ctx, inputs, output):
    x, weight, _eps = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rms_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    if dy is None:
        return None, None, None
    dx, dw = torch.ops.llamactl.rms_norm_bwd(dy, x, weight, rstd)
    return dx, dw, None


def _rope_setup(ctx, inputs, output):
    _q, _k, cos, sin, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse = inverse


def _rope_backward(ctx, dq, dk):
    """The adjoint of a rotation is the rotation by the opposite angle (sin negated)."""
    cos, sin = ctx.saved_tensors
    dq, dk = torch.ops.llamactl.rope(dq, dk, cos, sin, not ctx.inverse)
    return dq, dk, None, None, None


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, dout):
    a, b = ctx.saved_tensors
    return torch.ops.llamactl.swiglu_bwd(dout, a, b)


def _attn_setup(ctx, inputs, output):
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.scale = scale


def _attn_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.llamactl.causal_attention_bwd(dout, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


torch.library.register_autograd("llamactl::rms_norm_fwd", _rms_backward, setup_context=_rms_setup)
torch.library.register_autograd("llamactl::swiglu", _swiglu_backward, setup_context=_swiglu_setup)
torch.library.register_autograd("llamactl::rope", _rope_backward, setup_context=_rope_setup)
torch.library.register_autograd("llamactl::causal_attention", _attn_backward, setup_context=_attn_setup)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.ops.llamactl.rms_norm_fwd(x, weight, eps)[0]


def apply_rope(q, k, cos, sin):
    return torch.ops.llamactl.rope(q, k, cos, sin, False)


def swiglu(a, b):
    return torch.ops.llamactl.swiglu(a, b)
