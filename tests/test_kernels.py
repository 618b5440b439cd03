"""Fused RMSNorm / RoPE / SwiGLU against the reference (kernels/reference.py), forward and backward.

The CPU extension is built once per session (cached under LLAMACTL_KERNEL_CACHE or ~/.cache) by the
`fused_cpu` fixture (conftest.py); a failed build fails these tests instead of silently testing the reference.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import llamactl.kernels as K
from llamactl.kernels import build, dispatch, reference as R

REPO = Path(__file__).resolve().parents[1]
CUDA_DIR = REPO / "kernels" / "csrc" / "cuda"


def _rms_truth(x, w, eps):
    """float64 RMSNorm, the yardstick for both implementations."""
    xd, wd = x.double(), w.double()
    return xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * wd


def _grads(fn, inputs, dy):
    ins = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*ins)
    return out, torch.autograd.grad(out, ins, dy)


# ---- RMSNorm ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 17, 64, 4097])
def test_rms_norm_fp32_matches_reference(fused_cpu, n):
    torch.manual_seed(n)
    x = torch.randn(3, 5, n) * 3
    w = 1 + 0.1 * torch.randn(n)
    dy = torch.randn(3, 5, n)
    y, (dx, dw) = _grads(lambda a, b: K.rms_norm(a, b, 1e-5), (x, w), dy)
    yr, (rdx, rdw) = _grads(lambda a, b: R.rms_norm(a, b, 1e-5), (x, w), dy)
    torch.testing.assert_close(y, yr, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx, rdx, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dw, rdw, rtol=1e-6, atol=1e-5)
    # no less accurate than the reference itself against float64
    truth = _rms_truth(x, w, 1e-5)
    assert (y.double() - truth).abs().max() <= 2 * (yr.double() - truth).abs().max() + 1e-6


@pytest.mark.parametrize("n", [7, 33, 4096])
def test_rms_norm_bf16_within_bf16_tolerance(fused_cpu, n):
    torch.manual_seed(n)
    x = torch.randn(4, 9, n).bfloat16()
    w = (1 + 0.1 * torch.randn(n)).bfloat16()
    dy = torch.randn(4, 9, n).bfloat16()
    y, (dx, dw) = _grads(lambda a, b: K.rms_norm(a, b, 1e-5), (x, w), dy)
    assert y.dtype == dx.dtype == dw.dtype == torch.bfloat16
    # forward: same roundings as the reference (fp32 statistics, cast, times weight)
    torch.testing.assert_close(y, R.rms_norm(x, w, 1e-5), rtol=1.6e-2, atol=1e-2)
    # backward: fp32 accumulation, so compare with the fp32 reference gradients at bf16 precision
    _, (rdx, rdw) = _grads(lambda a, b: R.rms_norm(a, b, 1e-5), (x.float(), w.float()), dy.float())
    torch.testing.assert_close(dx.float(), rdx, rtol=1.6e-2, atol=2e-2)
    torch.testing.assert_close(dw.float(), rdw, rtol=1.6e-2, atol=2e-2 * (4 * 9) ** 0.5)


def test_rms_norm_saves_fp32_inverse_rms(fused_cpu):
    x = torch.randn(6, 40).bfloat16()
    y, rstd = torch.ops.llamactl.rms_norm_fwd(x, torch.ones(40).bfloat16(), 1e-5)
    assert rstd.dtype == torch.float32 and rstd.shape == (6,)
    torch.testing.assert_close(rstd, torch.rsqrt(x.float().pow(2).mean(-1) + 1e-5), rtol=1e-6, atol=0)


def test_rms_norm_dw_is_deterministic_across_thread_counts(fused_cpu):
    torch.manual_seed(0)
    x = torch.randn(517, 300)
    w = torch.randn(300)
    dy = torch.randn(517, 300)
    _, rstd = torch.ops.llamactl.rms_norm_fwd(x, w, 1e-5)
    threads = torch.get_num_threads()
    outs = []
    try:
        for nt in (1, 2, 1, max(2, threads)):
            torch.set_num_threads(nt)
            outs.append(torch.ops.llamactl.rms_norm_bwd(dy, x, w, rstd))
    finally:
        torch.set_num_threads(threads)
    for dx, dw in outs[1:]:
        assert torch.equal(dw, outs[0][1]) and torch.equal(dx, outs[0][0])


def test_rms_norm_gradcheck_float64(fused_cpu):
    torch.manual_seed(0)
    x = torch.randn(3, 2, 13, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: K.rms_norm(a, b, 1e-5), (x, w))
    # float64 runs the fused kernel in float64 (the reference computes in float32)
    torch.testing.assert_close(K.rms_norm(x, w, 1e-5), _rms_truth(x, w, 1e-5), rtol=1e-12, atol=1e-12)


def test_rms_norm_noncontiguous_input(fused_cpu):
    x = torch.randn(20, 8, 30).transpose(0, 1)  # (8, 20, 30), not contiguous
    w = torch.randn(30)
    torch.testing.assert_close(K.rms_norm(x, w), R.rms_norm(x, w), rtol=1e-6, atol=1e-6)


# ---- RoPE -------------------------------------------------------------------------------------------
def _tables(kind: str, B: int, T: int, D: int):
    """cos/sin as (T, D/2) slice at an offset, (B, T, D/2) gathered, or non-contiguous views."""
    cos, sin = R.rope_tables(D, 64)
    if kind == "offset":  # KV-cache style: positions 5..5+T
        return cos[5:5 + T], sin[5:5 + T]
    if kind == "batched":  # per-sequence positions
        pos = torch.stack([torch.arange(T) + 3 * b for b in range(B)])
        return cos[pos], sin[pos]
    if kind == "strided":  # a column slice of a wider table: row stride != D/2
        wc, ws = R.rope_tables(2 * D, 64)
        c2, s2 = torch.cat([cos, wc], 1)[:T, : D // 2], torch.cat([sin, ws], 1)[:T, : D // 2]
        assert not c2.is_contiguous()
        return c2, s2
    if kind == "expanded":  # (1, T, D/2) broadcast over the batch: stride 0
        c, s = cos[:T][None].expand(B, T, D // 2), sin[:T][None].expand(B, T, D // 2)
        assert c.stride(0) == 0
        return c, s
    raise ValueError(kind)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D,hq,hk", [(128, 3, 1), (64, 4, 2), (14, 5, 5), (2, 1, 1)])
@pytest.mark.parametrize("kind", ["offset", "batched", "strided", "expanded"])
def test_rope_matches_reference(fused_cpu, dtype, D, hq, hk, kind):
    torch.manual_seed(D + hq)
    B, T = 2, 11
    cos, sin = _tables(kind, B, T, D)
    q = torch.randn(B, T, hq, D).to(dtype)
    k = torch.randn(B, T, hk, D).to(dtype)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    (qo, ko), gf = _grads(lambda a, b: K.apply_rope(a, b, cos, sin), (q, k), (dq, dk))
    (rq, rk), gr = _grads(lambda a, b: R.apply_rope(a, b, cos, sin), (q, k), (dq, dk))
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    for a, b in [(qo, rq), (ko, rk), *zip(gf, gr)]:
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, **tol)


def test_rope_backward_is_inverse_rotation(fused_cpu):
    q, k = torch.randn(1, 7, 2, 32), torch.randn(1, 7, 1, 32)
    cos, sin = R.rope_tables(32, 7)
    qo, ko = torch.ops.llamactl.rope(q, k, cos, sin, False)
    qb, kb = torch.ops.llamactl.rope(qo, ko, cos, sin, True)
    torch.testing.assert_close(qb, q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kb, k, rtol=1e-6, atol=1e-6)


def test_rope_gradcheck_float64(fused_cpu):
    torch.manual_seed(0)
    cos, sin = R.rope_tables(10, 5)
    q = torch.randn(2, 5, 3, 10, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 5, 1, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: K.apply_rope(a, b, cos, sin), (q, k))


def test_rope_shape_errors(fused_cpu):
    cos, sin = R.rope_tables(16, 4)
    with pytest.raises(RuntimeError, match="rope"):
        torch.ops.llamactl.rope(torch.randn(1, 5, 2, 16), torch.randn(1, 5, 1, 16), cos, sin, False)  # T 5 != 4


# ---- dispatch, compile, model ----------------------------------------------------------------------
# ---- SwiGLU -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1,), (17,), (3, 64), (5, 7, 97), (2, 1536)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_swiglu_matches_reference(fused_cpu, shape, dtype):
    """fp32/fp64: the forward is the reference's bits (same formula), d a and d b within 1e-6 (the backward
    recomputes silu as a * sigmoid; the compiler may contract a multiply-add). bf16 (fast exp, rounded where
    the reference rounds): at most one bf16 step off, and on only a few elements."""
    g = torch.Generator().manual_seed(sum(shape))
    a, b, dy = [(torch.randn(shape, generator=g) * 4).to(dtype) for _ in range(3)]
    y, (da, db) = _grads(K.swiglu, (a, b), dy)
    yr, (rda, rdb) = _grads(R.swiglu, (a, b), dy)
    if dtype == torch.bfloat16:
        for got, want in ((y, yr), (da, rda), (db, rdb)):
            torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-6)
            assert (got != want).float().mean() <= 0.01
        return
    # torch's own silu rounds differently in its short-array tail than in its vector loop on some CPUs (AMD
    # Zen 4: F.silu of 17 elements differs by an ulp from the same elements inside a longer array), so the
    # bits are compared with the reference run over a zero-padded array that torch takes through its vector loop.
    n = a.numel()
    ap, bp = [torch.nn.functional.pad(t.detach().reshape(-1), (0, -n % 64)) for t in (a, b)]
    assert torch.equal(y, R.swiglu(ap, bp)[:n].view(shape))
    torch.testing.assert_close(y, yr, rtol=2 * torch.finfo(dtype).eps, atol=0)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(da, rda, rtol=tol, atol=tol)
    torch.testing.assert_close(db, rdb, rtol=tol, atol=tol)


def test_swiglu_bf16_mostly_exact_on_a_large_tensor(fused_cpu):
    """The fast exp moves fewer than 1 in 10,000 bf16 results by one step against the reference."""
    g = torch.Generator().manual_seed(0)
    a, b, dy = [(torch.randn(1 << 18, generator=g) * 4).bfloat16() for _ in range(3)]
    y, (da, db) = _grads(K.swiglu, (a, b), dy)
    yr, (rda, rdb) = _grads(R.swiglu, (a, b), dy)
    for got, want in ((y, yr), (da, rda), (db, rdb)):
        assert (got != want).float().mean() < 1e-4
        torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-6)


def test_swiglu_saves_only_its_inputs(fused_cpu):
    """The point of fusing on memory: autograd keeps a and b, not silu(a) as well."""
    a, b = torch.randn(4, 64, requires_grad=True), torch.randn(4, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        K.swiglu(a * 1, b * 1)
    assert len(saved) == 2 and all(t.shape == (4, 64) for t in saved)


def test_swiglu_gradcheck_float64(fused_cpu):
    a = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(K.swiglu, (a, b))


def test_swiglu_noncontiguous_and_errors(fused_cpu):
    a, b = torch.randn(6, 10), torch.randn(10, 6)
    # (torch's strided silu uses the scalar exp, its contiguous one the vector exp: ulps apart)
    torch.testing.assert_close(K.swiglu(a[:, ::2], b.t()[:, ::2]), R.swiglu(a[:, ::2], b.t()[:, ::2]), rtol=1e-6,
                               atol=1e-7)
    with pytest.raises(RuntimeError, match="differ"):
        torch.ops.llamactl.swiglu(a, b)
    with pytest.raises(RuntimeError, match="differ"):
        torch.ops.llamactl.swiglu(a, a.double())


def test_unsupported_dtype_runs_reference(fused_cpu):
    x, w = torch.randn(4, 16).half(), torch.randn(16).half()
    torch.testing.assert_close(K.rms_norm(x, w), R.rms_norm(x, w))
    x32 = torch.randn(4, 16)  # weight in another dtype than x: reference semantics (type promotion)
    torch.testing.assert_close(K.rms_norm(x32.bfloat16(), w.float()), R.rms_norm(x32.bfloat16(), w.float()))


def test_torch_compile_fullgraph_traces_the_ops(fused_cpu):
    cos, sin = R.rope_tables(16, 8)

    def f(x, w, q, k):
        qo, ko = K.apply_rope(q, k, cos, sin)
        return (K.swiglu(K.rms_norm(x, w), x) * 2).sum() + (qo * ko.sum(2, keepdim=True)).sum()

    torch.manual_seed(0)
    args = [torch.randn(8, 24), torch.randn(24), torch.randn(2, 8, 2, 16), torch.randn(2, 8, 1, 16)]
    ins_c = [a.clone().requires_grad_() for a in args]
    ins_e = [a.clone().requires_grad_() for a in args]
    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    out_c = cf(*ins_c)
    out_e = f(*ins_e)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    for a, b in zip(ins_c, ins_e):
        torch.testing.assert_close(a.grad, b.grad)


def test_reference_mode_and_fallback_logic(fused_cpu, monkeypatch):
    try:
        monkeypatch.setenv("LLAMACTL_KERNELS", "reference")
        dispatch.reset()
        b = dispatch.backend("cpu")
        assert not b.fused and "LLAMACTL_KERNELS=reference" in b.reason

        def broken(kind, announce=None):
            raise build.BuildError("no C++ compiler ('nope' not found; set CXX)")

        monkeypatch.setattr(build, "ensure", broken)
        monkeypatch.setenv("LLAMACTL_KERNELS", "auto")
        dispatch.reset()
        b = dispatch.backend("cpu")
        assert not b.fused and "no C++ compiler" in b.reason and "falling back" in b.reason
        x, w = torch.randn(3, 8), torch.randn(8)
        torch.testing.assert_close(K.rms_norm(x, w), R.rms_norm(x, w), rtol=0, atol=0)
        monkeypatch.setenv("LLAMACTL_KERNELS", "fused")
        dispatch.reset()
        with pytest.raises(build.BuildError, match="no C\\+\\+ compiler"):
            dispatch.backend("cpu")
    finally:
        monkeypatch.undo()
        dispatch.reset()
    assert dispatch.backend("cpu").fused


def _run_py(code: str, **env) -> subprocess.CompletedProcess:
    e = dict(os.environ, **env)
    e.pop("LLAMACTL_KERNELS", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=e,
                          timeout=300)


CHECK = """
    import torch, llamactl.kernels as K
    from llamactl.kernels import reference as R
    x, w = torch.randn(5, 37), torch.randn(37)
    q, k = torch.randn(2, 3, 2, 18), torch.randn(2, 3, 1, 18)
    cos, sin = R.rope_tables(18, 3)
    torch.testing.assert_close(K.rms_norm(x, w), R.rms_norm(x, w), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(K.apply_rope(q, k, cos, sin), R.apply_rope(q, k, cos, sin), rtol=1e-6, atol=1e-6)
    a, b = torch.randn(2, 4, 70, 8), torch.randn(2, 2, 70, 8)
    torch.testing.assert_close(K.causal_attention(a, b, b), R.causal_attention(a, b, b), rtol=1e-5, atol=2e-6)
    print("BACKEND", K.backend("cpu").name)
"""


def test_failed_build_falls_back_and_says_why(fused_cpu, tmp_path):
    """A real build attempt with a compiler that fails: reference results, one explanatory line."""
    r = _run_py(CHECK, CXX="/bin/false", LLAMACTL_KERNEL_CACHE=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "BACKEND reference" in r.stdout
    lines = [ln for ln in r.stderr.splitlines() if "use the reference backend" in ln]
    assert len(lines) == 1 and "failed" in lines[0] and "falling back" in lines[0], r.stderr
    assert not list(tmp_path.glob("*.tmp-*")) and not list(tmp_path.glob("*.lock"))  # nothing half-built left


def test_baseline_isa_copy_matches(fused_cpu):
    """The non-vectorised (DEFAULT) copy of the kernels, chosen by LLAMACTL_CPU_ISA, agrees as well."""
    r = _run_py(textwrap.dedent(CHECK) + "print('ISA', torch.ops.llamactl_cpu.isa())\n", LLAMACTL_CPU_ISA="default")
    assert r.returncode == 0, r.stderr
    assert "ISA DEFAULT" in r.stdout and "BACKEND cpu (DEFAULT)" in r.stdout


def test_kernels_run_on_all_threads(fused_cpu):
    """at::parallel_for in the binding really spreads work (a binding built without OpenMP runs serial)."""
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.ops.llamactl_cpu.parallel_threads() == 2
        torch.set_num_threads(1)
        assert torch.ops.llamactl_cpu.parallel_threads() == 1
    finally:
        torch.set_num_threads(old)


STREAMED = """
    import sys, torch, llamactl.kernels as K
    from llamactl.kernels import reference as R
    torch.manual_seed(0)
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        for n in (64, 37, 4096):
            x, w, dy = torch.randn(9, n).to(dt), torch.randn(n).to(dt), torch.randn(9, n).to(dt)
            xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
            y = K.rms_norm(xg, wg)
            dx, dw = torch.autograd.grad(y, (xg, wg), dy)
            out[f"rms{n}{dt}"] = (y.detach(), dx, dw)
        for D in (128, 18):
            q, k = torch.randn(2, 5, 3, D).to(dt), torch.randn(2, 5, 1, D).to(dt)
            cos, sin = R.rope_tables(D, 5)
            qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
            qo, ko = K.apply_rope(qg, kg, cos, sin)
            dq, dk = torch.autograd.grad((qo, ko), (qg, kg), (torch.ones_like(qo), torch.ones_like(ko)))
            out[f"rope{D}{dt}"] = (qo.detach(), ko.detach(), dq, dk)
        for n in (64, 37, 4099):
            a, b = torch.randn(3, n).to(dt).requires_grad_(), torch.randn(3, n).to(dt).requires_grad_()
            y = K.swiglu(a, b)
            out[f"swiglu{n}{dt}"] = (y.detach(), *torch.autograd.grad(y, (a, b), torch.ones_like(y)))
    torch.save(out, sys.argv[1])
"""


def test_streamed_outputs_are_bit_identical(fused_cpu, tmp_path):
    """Non-temporal stores (LLAMACTL_CPU_STREAM_BYTES=0 streams every output; aligned and unaligned rows,
    tails; RMSNorm, RoPE and SwiGLU) write exactly the bits that normal stores write."""
    files = {}
    for tag, limit in (("stream", "0"), ("plain", "-1")):
        files[tag] = tmp_path / f"{tag}.pt"
        e = dict(os.environ, LLAMACTL_CPU_STREAM_BYTES=limit)
        e.pop("LLAMACTL_KERNELS", None)
        r = subprocess.run([sys.executable, "-c", textwrap.dedent(STREAMED), str(files[tag])], capture_output=True,
                           text=True, env=e, timeout=300)
        assert r.returncode == 0, r.stderr
    a, b = torch.load(files["stream"]), torch.load(files["plain"])
    assert a.keys() == b.keys() and len(a) == 16
    for key in a:
        for u, v in zip(a[key], b[key]):
            assert torch.equal(u, v), key


def test_tiny_model_same_with_fused_and_reference(fused_cpu, monkeypatch):
    from llamactl.config import preset
    from llamactl.model import build_model

    model = build_model(preset("tiny"), seed=0)
    tokens = torch.randint(0, 2048, (2, 12))
    fused = model(tokens)
    fused.float().pow(2).mean().backward()
    g_fused = model.layers["0"].attention_norm.weight.grad.clone()
    model.zero_grad()
    try:
        monkeypatch.setenv("LLAMACTL_KERNELS", "reference")
        dispatch.reset()
        ref = model(tokens)
        ref.float().pow(2).mean().backward()
    finally:
        monkeypatch.undo()
        dispatch.reset()
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_fused, model.layers["0"].attention_norm.weight.grad, rtol=1e-4, atol=1e-6)


# ---- build machinery --------------------------------------------------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_lock_from_dead_process_is_broken(tmp_path):
    lock = tmp_path / "k.lock"
    lock.write_text(f"{_dead_pid()} {os.uname().nodename} 0\n")
    t0 = time.time()
    with build.file_lock(lock, wait_s=5):
        assert str(os.getpid()) in lock.read_text()
    assert time.time() - t0 < 3 and not lock.exists()


def test_old_lock_is_broken_and_live_lock_waits(tmp_path):
    lock = tmp_path / "k.lock"
    lock.write_text(f"{os.getpid()} {os.uname().nodename} 0\n")  # alive owner ...
    with pytest.raises(build.BuildError, match="timed out"):
        with build.file_lock(lock, max_age_s=600, wait_s=1):
            pass
    os.utime(lock, (time.time() - 3600, time.time() - 3600))  # ... but an hour old: stale
    with build.file_lock(lock, max_age_s=600, wait_s=1):
        pass


def test_half_built_tmp_dirs_are_cleaned(tmp_path):
    d = tmp_path / "key.tmp-1-abc"
    d.mkdir()
    (d / "owner").write_text(f"{_dead_pid()} {os.uname().nodename} 0\n")
    live = tmp_path / "key.tmp-2-def"
    live.mkdir()
    (live / "owner").write_text(f"{os.getpid()} {os.uname().nodename} 0\n")
    build._clean_stale_tmp(tmp_path, "key")
    assert not d.exists() and live.exists()


def test_old_builds_are_pruned_keeping_the_newest(tmp_path):
    prefix = "cpu-torch2.13.0_cpu-AVX2-"
    dirs = []
    for i in range(6):
        d = tmp_path / f"{prefix}{i:016x}"
        d.mkdir()
        (tmp_path / f"{d.name}.log").write_text("log")
        os.utime(d, (1000 + i, 1000 + i))
        dirs.append(d)
    other = tmp_path / "cpu-torch2.13.0_cpu-AVX512-0000000000000001"  # another ISA: not ours to prune
    other.mkdir()
    tmp = tmp_path / f"{prefix}{5:016x}.tmp-1-abc"  # a build in progress
    tmp.mkdir()
    removed = build.prune(tmp_path, dirs[5].name, keep=2)
    assert sorted(removed) == dirs[:3]
    assert all(d.exists() for d in dirs[3:]) and other.exists() and tmp.exists()
    assert not (tmp_path / f"{dirs[0].name}.log").exists() and (tmp_path / f"{dirs[4].name}.log").exists()


def test_cache_key_tracks_isa_torch_and_sources():
    key = build.build_key("cpu")
    assert build.host_isa() in key and torch.__version__.replace("+", "_") in key


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    cands = sorted(glob.glob("/usr/local/cuda*/bin/nvcc"))
    return cands[-1] if cands else None


@pytest.mark.parametrize("cu", sorted(p.name for p in CUDA_DIR.glob("*.cu")))
def test_cuda_sources_compile_with_nvcc(cu, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not installed: the CUDA sources cannot be compiled on this machine")
    cmd = [nvcc, "-c", "-std=c++17", "-O3", f"-I{CUDA_DIR}", "-gencode", "arch=compute_80,code=sm_80",
           "-gencode", "arch=compute_90,code=sm_90", str(CUDA_DIR / cu), "-o", str(tmp_path / (cu + ".o"))]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / (cu + ".o")).stat().st_size > 0


def test_cuda_binding_parses_against_torch_headers(tmp_path):
    """ops_cuda.cpp is built only where torch has CUDA; here it is at least checked by the C++ compiler
    (-fsyntax-only) against this torch's headers and the CUDA toolkit's, so a wrong signature or a missing
    launcher shows up on a CPU-only machine too. The CPU wheel lacks one generated header
    (c10/cuda/impl/cuda_cmake_macros.h): an empty stand-in is enough to parse."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
             *sorted(glob.glob("/usr/local/cuda-*"))]
    found = [Path(r) / "include" for r in roots if r and (Path(r) / "include" / "cuda_runtime.h").exists()]
    if not found:
        pytest.skip("no CUDA toolkit headers on this machine")
    cuda_inc = found[0]
    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = [build.cxx(), "-std=c++17", "-fsyntax-only", f"-I{tmp_path}", *[f"-I{p}" for p in include_paths()],
           f"-I{cuda_inc}", f"-I{CUDA_DIR}", str(CUDA_DIR / "ops_cuda.cpp")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


# ---- benchmark plumbing (no timings asserted) -------------------------------------------------------
def test_bench_summary_lines_have_the_common_format():
    import re

    from llamactl.kernels.bench import Result, summary, table_rows

    res = [Result(op, "s", "fp32", mode, 1 << 20, {"copy": 1.0, "eager": 8.0, "compile": 3.0, "fused": 2.0})
           for op in ("rms_norm", "rope") for mode in ("fwd", "fwd+bwd")]
    lines = summary(10.0, res, "cpu")
    assert len(lines) == 9
    for ln in lines:
        assert re.fullmatch(r"[^:]+: \d+\.\d+x [^(]+ \(.+\)", ln), ln
    assert "rms_norm fwd speed: 4.00x eager" in lines[0] and "0.50x copy bandwidth" in lines[-1]
    assert len(table_rows(10.0, res)) == 16


def test_bench_runs_every_op_on_small_cases(fused_cpu, monkeypatch):
    """The benchmark's plumbing end to end on 1 MiB cases (torch.compile replaced by the eager function so
    the test does not spend its time compiling; no timing is asserted)."""
    from llamactl.kernels import bench

    monkeypatch.setattr(bench, "copy_bandwidth", lambda device: 1.0)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    copy, res = bench.run("cpu", ("float32", "bfloat16"), target_mb=1, reps=1)
    got = {(r.op, r.dtype, r.mode) for r in res}
    assert got == {(op, dt, m) for op in bench.OPS for dt in ("fp32", "bf16") for m in ("fwd", "fwd+bwd")}
    assert all(set(r.ms) >= {"copy", "stream", "eager", "compile", "fused"} and min(r.ms.values()) > 0 for r in res)
    lines = bench.summary(copy, res, "cpu")
    assert sum(ln.startswith("swiglu") for ln in lines) == 4
    assert sum(ln.startswith("rms_norm fwd vs the streaming-copy floor") for ln in lines) == 1


@pytest.mark.parametrize("offset,n", [(0, 1 << 20), (1, 1000), (3, 17), (0, 0), (5, 64 * 1000 + 7)])
def test_stream_copy_copies_every_byte(fused_cpu, offset, n):
    """The benchmark's non-temporal copy (its bandwidth floor) copies exactly, whatever the alignment."""
    src = torch.randint(-100, 100, (n + offset,), dtype=torch.int8)[offset:]
    dst = torch.zeros(n + 2, dtype=torch.int8)[1:n + 1]
    torch.ops.llamactl_cpu.stream_copy_(dst, src)
    assert torch.equal(dst, src)
    with pytest.raises(RuntimeError, match="same size"):
        torch.ops.llamactl_cpu.stream_copy_(torch.empty(n + 1, dtype=torch.int8), src)


def test_cli_bench_kernels_rejects_bad_dtype(capsys):
    from llamactl.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "kernels", "--dtypes", "fp8"])
    assert e.value.code == 1
    assert "unknown dtype" in capsys.readouterr().err
