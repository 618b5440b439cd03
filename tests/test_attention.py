"""The CPU causal-attention kernel (kernels/csrc/cpu/attention*.cpp) against the reference (torch's SDPA).

Odd lengths cross the 64-query blocks (37, 64, 65, 129), odd head dims, GQA groups; errors are measured
against a float64 reference, as for the other kernels.
"""
from __future__ import annotations

import pytest
import torch

import llamactl.kernels as K
from llamactl.kernels import reference as R


def _inputs(B, H, Hk, T, D, dtype=torch.float32, seed=0, layout="bthd"):
    g = torch.Generator().manual_seed(seed)
    if layout == "bthd":  # what the model passes: transposed views of (B, T, H, D) projections
        q = torch.randn(B, T, H, D, generator=g, dtype=dtype).transpose(1, 2)
        k = torch.randn(B, T, Hk, D, generator=g, dtype=dtype).transpose(1, 2)
        v = torch.randn(B, T, Hk, D, generator=g, dtype=dtype).transpose(1, 2)
    else:
        q, k, v = (torch.randn(B, h, T, D, generator=g, dtype=dtype) for h in (H, Hk, Hk))
    return [t.requires_grad_() for t in (q, k, v)]


def _fwd_bwd(fn, q, k, v, dout):
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return out, grads


@pytest.mark.parametrize("B,H,Hk,T,D", [(2, 4, 4, 37, 16), (1, 6, 2, 129, 64), (2, 3, 1, 65, 8), (1, 2, 2, 64, 24),
                                        (3, 2, 1, 1, 4), (1, 8, 8, 256, 64)])
@pytest.mark.parametrize("layout", ["bthd", "bhtd"])
def test_matches_float64_reference(fused_cpu, B, H, Hk, T, D, layout):
    q, k, v = _inputs(B, H, Hk, T, D, layout=layout)
    dout = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(1))
    out, grads = _fwd_bwd(K.causal_attention, q, k, v, dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_grads = _fwd_bwd(R.causal_attention, q64, k64, v64, dout.double())
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=2e-6)
    for name, a, b in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=5e-6, msg=lambda m: f"d{name}: {m}")
    assert out.stride() == q.stride()  # q's memory layout: the model's transpose back is a view


def test_float64_is_exact_to_rounding_and_gradcheck(fused_cpu):
    q, k, v = _inputs(2, 4, 2, 70, 8, dtype=torch.float64)
    dout = torch.randn(2, 4, 70, 8, dtype=torch.float64)
    out, grads = _fwd_bwd(K.causal_attention, q, k, v, dout)
    ref, ref_grads = _fwd_bwd(R.causal_attention, q, k, v, dout)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-13)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    small = _inputs(1, 2, 1, 9, 4, dtype=torch.float64, seed=3)
    assert torch.autograd.gradcheck(K.causal_attention, small)


def test_runs_the_kernel_and_keeps_only_lse(fused_cpu, monkeypatch):
    """The fused path really runs (the reference is never called) and autograd saves q, k, v, out and the
    (B, H, T) log-sum-exp, nothing of size T x T."""
    monkeypatch.setattr(R, "causal_attention", lambda *a: pytest.fail("the reference ran"))
    q, k, v = _inputs(2, 4, 2, 100, 16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        K.causal_attention(q, k, v).sum().backward()
    assert all(s.numel() <= 2 * 4 * 100 * 16 for s in saved) and torch.Size([2, 4, 100]) in saved


def test_gqa_gradients_are_deterministic(fused_cpu):
    """dk/dv are summed over the query heads of a group in a fixed order: bit-identical run to run, and the
    same with one thread as with two."""
    q, k, v = _inputs(3, 8, 2, 150, 32)
    dout = torch.randn(3, 8, 150, 32)
    old = torch.get_num_threads()
    try:
        runs = []
        for n in (2, 2, 1):
            torch.set_num_threads(n)
            runs.append(_fwd_bwd(K.causal_attention, q, k, v, dout))
    finally:
        torch.set_num_threads(old)
    for out, grads in runs[1:]:
        assert torch.equal(out, runs[0][0]) and all(torch.equal(a, b) for a, b in zip(grads, runs[0][1]))


def test_bad_inputs_raise(fused_cpu):
    q, k, v = (t.detach() for t in _inputs(1, 4, 2, 10, 8))
    op = torch.ops.llamactl.causal_attention
    with pytest.raises(RuntimeError, match="not a multiple"):
        op(q, k[:, :1].expand(1, 3, 10, 8), v[:, :1].expand(1, 3, 10, 8), 1.0)
    with pytest.raises(RuntimeError, match="same batch, length"):
        op(q, k[:, :, :9], v[:, :, :9], 1.0)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        op(q.bfloat16(), k.bfloat16(), v.bfloat16(), 1.0)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        op(q, k.double(), v, 1.0)
    with pytest.raises(RuntimeError, match="k and v shapes differ"):
        op(q, k, v[..., :4], 1.0)


def test_other_dtypes_use_the_reference(fused_cpu):
    q, k, v = (t.detach().bfloat16() for t in _inputs(1, 2, 1, 20, 8))
    torch.testing.assert_close(K.causal_attention(q, k, v), R.causal_attention(q, k, v))


def test_empty_batch(fused_cpu):
    q, k, v = _inputs(0, 2, 1, 5, 4)
    out = K.causal_attention(q, k, v)
    out.sum().backward()
    assert out.shape == (0, 2, 5, 4) and k.grad.shape == k.shape


def test_torch_compile_fullgraph(fused_cpu):
    q, k, v = _inputs(2, 4, 2, 33, 8)
    qc, kc, vc = (t.detach().clone().requires_grad_() for t in (q, k, v))

    def f(q, k, v):
        return K.causal_attention(q, k, v).transpose(1, 2).reshape(2, 33, -1).pow(2).sum()

    out_c = torch.compile(f, backend="aot_eager", fullgraph=True)(qc, kc, vc)
    out_e = f(q, k, v)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    for a, b in zip((qc, kc, vc), (q, k, v)):
        torch.testing.assert_close(a.grad, b.grad)


def test_model_prefill_and_training_use_it_and_match_decoding(fused_cpu):
    """A model's full-sequence logits (the kernel) equal token-by-token decoding with the KV cache (SDPA)."""
    from llamactl.config import preset
    from llamactl.model import build_model

    model = build_model(preset("tiny"), seed=0).eval()
    tokens = torch.randint(0, 2048, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(2, 32)
        steps = [model(tokens[:, i:i + 1], start_pos=i, cache=cache) for i in range(21)]
    torch.testing.assert_close(full, torch.cat(steps, 1), rtol=1e-5, atol=1e-5)


def test_bench_runs_and_prints_the_ratio(fused_cpu, monkeypatch, capsys):
    import runpy
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench" / "attention.py"
    monkeypatch.setattr(sys, "argv", ["attention.py", "--shapes", "1x2x16x8,2x2x70x4", "--reps", "1", "--rounds", "1"])
    runpy.run_path(str(bench), run_name="__main__")
    out = capsys.readouterr().out
    assert "attention fwd+bwd:" in out and "x sdpa (worst shape" in out


def test_fake_shapes_and_strides_match_the_kernel(fused_cpu):
    """torch.compile plans memory from the fake implementations: they must give the real layouts, also for
    an input whose head dim is strided (the kernel copies it first)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = (t.detach() for t in _inputs(2, 4, 2, 9, 8))
    strided = torch.randn(2, 4, 8, 9).transpose(-1, -2)
    for args in ((q, k, v), (strided, k, v)):
        real = torch.ops.llamactl.causal_attention(*args, 0.5)
        with FakeTensorMode(allow_non_fake_inputs=True):
            fake = torch.ops.llamactl.causal_attention(*args, 0.5)
        assert [(t.shape, t.stride()) for t in real] == [(t.shape, t.stride()) for t in fake]
