"""The decode GEMV kernel (llamactl::gemv, kernels/csrc/cpu/gemv_isa.cpp) against x @ w.T in float64.

Odd sizes (outputs / inputs not multiples of the vector width), 1..8 rows and more, every weight layout the
decode path hands it (row-major, column-major from decode_layout, slices of a fused matrix), per-row and
per-thread-count determinism, the AVX2 and portable copies, and the fallback to F.linear.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import llamactl.kernels as K
from llamactl.kernels import dispatch


def _check(y, x, w, rtol=1e-5):
    """|y - x @ w.T| within rtol of the sum of |products| (any summation order stays inside it)."""
    ref = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    assert y.dtype == torch.float32 and y.shape == ref.shape
    bad = (y.double() - ref).abs() > rtol * scale + 1e-30
    assert not bool(bad.any()), f"max error {((y.double() - ref).abs() / scale).max().item():.3g} of the scale"


def _layout(w, kind):
    """w (N, K) in a given memory layout, same values."""
    n, k = w.shape
    if kind == "row":
        return w.contiguous()
    if kind == "col":
        return w.t().contiguous().t()
    if kind == "col_slice":  # rows of a fused column-major matrix (decode_layout's q|k|v): ldw > N
        buf = torch.randn(k, n + 13)
        buf[:, 5:5 + n] = w.t()
        return buf.t()[5:5 + n]
    if kind == "row_slice":  # leading stride > K
        buf = torch.randn(n, k + 7)
        buf[:, 3:3 + k] = w
        return buf[:, 3:3 + k]
    if kind == "strided":  # neither layout: the binding copies it first
        return torch.randn(n, 2 * k)[:, ::2].copy_(w)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["row", "col", "col_slice", "row_slice", "strided"])
@pytest.mark.parametrize("n,k", [(1, 1), (7, 5), (37, 53), (100, 17), (33, 1000), (257, 129)])
def test_gemv_matches_float64(fused_cpu, kind, n, k):
    torch.manual_seed(n * 1000 + k)
    w = _layout(torch.randn(n, k), kind)
    for rows in range(1, 9):
        x = torch.randn(rows, k)
        _check(K.gemv(x, w), x, w)
    x = torch.randn(2, 1, 11, k)  # leading dims kept; more than 8 rows run in groups of 8
    y = K.gemv(x, w)
    assert y.shape == (2, 1, 11, n)
    _check(y.reshape(-1, n), x.reshape(-1, k), w)


@pytest.mark.parametrize("kind", ["row", "col"])
def test_gemv_rows_and_threads_do_not_change_bits(fused_cpu, kind):
    """Each output is summed over k in one fixed order: a row alone, in a batch, on 1 or 2 threads, same bits."""
    torch.manual_seed(1)
    w = _layout(torch.randn(3001, 517), kind)
    x = torch.randn(8, 517)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        y = K.gemv(x, w)
        torch.set_num_threads(1)
        y1 = K.gemv(x, w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(y, y1)
    for r in (0, 3, 7):
        assert torch.equal(K.gemv(x[r:r + 1], w), y[r:r + 1])
    assert torch.equal(K.gemv(x[2:5], w), y[2:5])


def test_gemv_empty_and_degenerate(fused_cpu):
    assert K.gemv(torch.randn(3, 4), torch.randn(0, 4)).shape == (3, 0)
    assert K.gemv(torch.randn(0, 4), torch.randn(5, 4)).shape == (0, 5)
    assert torch.equal(K.gemv(torch.randn(2, 0), torch.randn(5, 0)), torch.zeros(2, 5))


def test_gemv_other_dtypes_run_f_linear(fused_cpu):
    x, w = torch.randn(3, 40, dtype=torch.float64), torch.randn(9, 40, dtype=torch.float64)
    assert torch.equal(K.gemv(x, w), F.linear(x, w))
    xb, wb = x.bfloat16(), w.bfloat16()
    assert torch.equal(K.gemv(xb, wb), F.linear(xb, wb))
    assert not dispatch.gemv_fused("cpu", torch.float32, torch.bfloat16)
    assert dispatch.gemv_fused("cpu", torch.float32, torch.float32)


def test_gemv_reference_mode_falls_back_to_torch(fused_cpu, monkeypatch):
    x, w = torch.randn(2, 37), torch.randn(19, 37).t().contiguous().t()
    try:
        monkeypatch.setenv("LLAMACTL_KERNELS", "reference")
        dispatch.reset()
        assert not dispatch.gemv_fused("cpu", torch.float32, torch.float32)
        assert torch.equal(K.gemv(x, w), F.linear(x, w))
    finally:
        monkeypatch.undo()
        dispatch.reset()
    assert dispatch.gemv_fused("cpu", torch.float32, torch.float32)


@pytest.mark.parametrize("isa", ["avx2", "default"])
def test_gemv_other_isa_copies(fused_cpu, isa):
    """The AVX2 and portable copies (LLAMACTL_CPU_ISA caps the choice), both layouts, odd sizes."""
    code = textwrap.dedent("""
        import torch
        import llamactl.kernels as K
        torch.manual_seed(0)
        worst = 0.0
        for n, k, col in [(37, 53, False), (37, 53, True), (300, 129, True), (129, 300, False)]:
            w = torch.randn(n, k)
            w = w.t().contiguous().t() if col else w
            for rows in (1, 3, 8):
                x = torch.randn(rows, k)
                ref = x.double() @ w.double().T
                err = ((K.gemv(x, w).double() - ref).abs() / (x.double().abs() @ w.double().abs().T)).max()
                worst = max(worst, float(err))
        print("ISA", torch.ops.llamactl_cpu.isa(), "WORST", worst)
    """)
    env = dict(os.environ, LLAMACTL_CPU_ISA=isa)
    env.pop("LLAMACTL_KERNELS", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("ISA")][-1].split()
    assert line[1].lower() == isa and float(line[3]) < 1e-5


def test_inference_linear_takes_the_gemv_for_decode_rows(fused_cpu):
    """What the decode path calls: up to 8 rows run the kernel (same bits), more rows the GEMM."""
    from torch import nn

    from llamactl.model import GEMV_MAX_ROWS, inference_linear

    owner = nn.Module()
    w = torch.randn(70, 33).t().contiguous().t()
    x = torch.randn(GEMV_MAX_ROWS, 1, 33)
    with torch.no_grad():
        assert torch.equal(inference_linear(owner, "w", x, w), torch.ops.llamactl.gemv(x, w))
        x = torch.randn(GEMV_MAX_ROWS + 1, 33)
        torch.testing.assert_close(inference_linear(owner, "w", x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_decode_layout_under_bf16_autocast_generates_as_without_it(fused_cpu):
    """autocast rollouts (bf16 from fp32 masters) after decode_layout take F.linear, which autocasts, so they
    give what the plain model gives; the packed oneDNN copy once failed here on a bf16 input."""
    from llamactl.config import preset
    from llamactl.generation import decode_layout, generate
    from llamactl.model import build_model

    plain = build_model(preset("tiny"), seed=3).eval()
    fast = build_model(preset("tiny"), seed=3).eval()
    decode_layout(fast)
    prompts = [[1, 5, 9, 3], [1, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    kw = dict(max_new_tokens=5, autocast_dtype=torch.bfloat16)
    for a, b in zip(generate(plain, prompts, **kw), generate(fast, prompts, **kw)):
        assert a.tokens == b.tokens
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-2)
