"""Benchmark of the fused kernels against eager and torch.compile'd reference (and apex / Liger-Kernel
where importable), forward and forward+backward, for Llama shapes (hidden 4096 / 8192, head_dim 128,
feed-forward 11008 / 28672 for SwiGLU).

Every implementation of a case is timed alternately in the same loop (median of `reps`), so a noisy
machine slows all of them alike. GB/s counts the bytes an implementation must move at least (read the
inputs once, write the outputs once), compared with the device's `dst.copy_(src)` bandwidth measured in
the same loop on a copy of the same number of bytes (row "copy"; %copy = copy time / impl time).
Used by `llamactl bench kernels` and `bench/kernels.py`.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from llamactl.kernels import dispatch, ops, reference

MB = 1 << 20
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16"}


@dataclass
class Result:
    op: str
    shape: str
    dtype: str
    mode: str  # "fwd" | "fwd+bwd"
    bytes: int
    ms: dict[str, float] = field(default_factory=dict)  # impl -> median milliseconds

    def gbs(self, impl: str) -> float:
        return self.bytes / (self.ms[impl] * 1e-3) / 1e9

    def of_copy(self, impl: str) -> float:
        """Share of the copy bandwidth measured in the same loop (a copy moving the same bytes)."""
        return self.ms["copy"] / self.ms[impl]


def tune_malloc() -> bool:
    """Keep freed memory in the heap (glibc): without it every large output is fresh mmap'd memory whose
    page faults cost several times the data movement on this VM (64 MiB: ~25 ms of faults vs ~5 ms of
    copy), for every implementation alike. Same effect as jemalloc/tcmalloc; returns False if not glibc.
    (mallopt takes a C int: no mmap at all, and a trim threshold of INT_MAX.)"""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 512 * MB, reps: int = 9) -> float:
    """GB/s of dst.copy_(src) on a buffer far larger than the caches (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 2):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times[2:]) / 1e9


def _time_alternating(fns: dict[str, Callable[[], object]], device, reps: int, nbytes: int,
                      warmup: int = 3) -> dict[str, float]:
    """Median ms of each fn, timed in turn; "copy" (dst.copy_(src) moving nbytes in all) runs alongside, and on
    CPU "stream", the same copy with non-temporal stores: the floor for any kernel that reads its input once
    and writes an output once (it skips reading the destination lines that copy_ reads before writing)."""
    src = torch.empty(nbytes // 8, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    stream = {"stream": lambda: torch.ops.llamactl_cpu.stream_copy_(dst, src)} if torch.device(device).type == "cpu" else {}
    fns = {"copy": lambda: dst.copy_(src), **stream, **fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def _fwd_bwd(fn, inputs, grads):
    def run():
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.grad(outs, inputs, grads)
    return run


def _peers_rms(device) -> dict[str, Callable]:
    peers = {}
    if device.type != "cuda":
        return peers  # apex and Liger-Kernel are GPU kernels
    try:
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine

        peers["apex"] = lambda x, w, eps: fused_rms_norm_affine(x, w, (x.shape[-1],), eps)
    except Exception:
        pass
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        peers["liger"] = lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps)
    except Exception:
        pass
    return peers


def _peers_rope(device) -> dict[str, Callable]:
    peers = {}
    if device.type != "cuda":
        return peers
    try:
        from liger_kernel.ops.rope import LigerRopeFunction

        def liger(q, k, cos, sin):  # Liger wants (B, H, T, D) and full-width cos/sin (1, T, D)
            c, s = torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None]
            qo, ko = LigerRopeFunction.apply(q.transpose(1, 2), k.transpose(1, 2), c, s)
            return qo.transpose(1, 2), ko.transpose(1, 2)
        peers["liger"] = liger
    except Exception:
        pass
    return peers


def _peers_swiglu(device) -> dict[str, Callable]:
    peers = {}
    if device.type != "cuda":
        return peers
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        peers["liger"] = LigerSiLUMulFunction.apply
    except Exception:
        pass
    return peers


OPS = {  # op -> (reference, fused, peers, label in the table)
    "rms_norm": (reference.rms_norm, ops.rms_norm, _peers_rms, "rms"),
    "rope": (reference.apply_rope, ops.apply_rope, _peers_rope, "rope"),
    "swiglu": (reference.swiglu, ops.swiglu, _peers_swiglu, "swiglu"),
}


def _impls(op: str, device) -> dict[str, Callable]:
    ref, fused, peers, _ = OPS[op]
    impls = {"eager": ref, "compile": torch.compile(ref, dynamic=False), "fused": fused}
    impls.update(peers(device))
    return impls


def rms_cases(dtypes, target_bytes: int):
    for hidden in (4096, 8192):
        for dt in dtypes:
            rows = max(1, target_bytes // (hidden * torch.finfo(dt).bits // 8))
            yield hidden, rows, dt


def rope_cases(dtypes, target_bytes: int):
    for name, hq, hk in (("7b", 32, 32), ("70b", 64, 8)):  # q/kv heads; head_dim 128
        for dt in dtypes:
            tokens = max(1, target_bytes // (hq * 128 * torch.finfo(dt).bits // 8))
            yield name, hq, hk, tokens, dt


def swiglu_cases(dtypes, target_bytes: int):
    for name, ffn in (("7b", 11008), ("70b", 28672)):
        for dt in dtypes:
            yield name, ffn, max(1, target_bytes // (ffn * torch.finfo(dt).bits // 8)), dt


def run(device: str | None = None, dtypes=("float32", "bfloat16"), target_mb: int = 64, reps: int = 7,
        progress=None) -> tuple[float, list[Result]]:
    """Returns (copy GB/s, results). progress(msg) is told what runs."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    say = progress or (lambda msg: None)
    b = dispatch.backend(dev.type)
    if not b.fused:
        raise RuntimeError(f"no fused backend on {dev.type}: {b.reason}")
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    dts = [DTYPES[d] for d in dtypes]
    say("copy bandwidth")
    copy = copy_bandwidth(dev)
    results: list[Result] = []
    eps = 1e-5
    rms_impls, rope_impls, swiglu_impls = _impls("rms_norm", dev), _impls("rope", dev), _impls("swiglu", dev)
    g = torch.Generator(device=dev).manual_seed(0)
    for hidden, rows, dt in rms_cases(dts, target_mb * MB):
        x = torch.randn(rows, hidden, device=dev, generator=g).to(dt)
        w = (1 + 0.1 * torch.randn(hidden, device=dev, generator=g)).to(dt)
        dy = torch.randn(rows, hidden, device=dev, generator=g).to(dt)
        es = x.element_size()
        shape = f"{rows}x{hidden}"
        say(f"rms_norm {shape} {SHORT[dt]} fwd")
        with torch.no_grad():
            nb = 2 * x.numel() * es + hidden * es
            ms = _time_alternating({k: (lambda f=f: f(x, w, eps)) for k, f in rms_impls.items()}, dev, reps, nb)
        results.append(Result("rms_norm", shape, SHORT[dt], "fwd", nb, ms))
        say(f"rms_norm {shape} {SHORT[dt]} fwd+bwd")
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        fns = {k: _fwd_bwd(lambda a, b_, f=f: f(a, b_, eps), (xg, wg), (dy,)) for k, f in rms_impls.items()}
        nb = 5 * x.numel() * es + 2 * hidden * es
        ms = _time_alternating(fns, dev, reps, nb)
        results.append(Result("rms_norm", shape, SHORT[dt], "fwd+bwd", nb, ms))
        del x, dy, xg, wg
    for name, hq, hk, tokens, dt in rope_cases(dts, target_mb * MB):
        bsz, t = (2, tokens // 2) if tokens % 2 == 0 else (1, tokens)
        cos, sin = reference.rope_tables(128, t, device=dev)
        q = torch.randn(bsz, t, hq, 128, device=dev, generator=g).to(dt)
        k = torch.randn(bsz, t, hk, 128, device=dev, generator=g).to(dt)
        dq, dk = torch.randn_like(q), torch.randn_like(k)
        es = q.element_size()
        qk = (q.numel() + k.numel()) * es
        tables = 2 * cos.numel() * 4
        shape = f"{name} {bsz}x{t}"
        say(f"rope {shape} {SHORT[dt]} fwd")
        with torch.no_grad():
            ms = _time_alternating({kk: (lambda f=f: f(q, k, cos, sin)) for kk, f in rope_impls.items()}, dev, reps,
                                   2 * qk + tables)
        results.append(Result("rope", shape, SHORT[dt], "fwd", 2 * qk + tables, ms))
        say(f"rope {shape} {SHORT[dt]} fwd+bwd")
        qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
        fns = {kk: _fwd_bwd(lambda a, b_, f=f: f(a, b_, cos, sin), (qg, kg), (dq, dk)) for kk, f in rope_impls.items()}
        ms = _time_alternating(fns, dev, reps, 4 * qk + tables)
        results.append(Result("rope", shape, SHORT[dt], "fwd+bwd", 4 * qk + tables, ms))
        del q, k, dq, dk, qg, kg
    for name, ffn, rows, dt in swiglu_cases(dts, target_mb * MB):
        a, b = [torch.randn(rows, ffn, device=dev, generator=g).to(dt) for _ in range(2)]
        dy = torch.randn(rows, ffn, device=dev, generator=g).to(dt)
        n = a.numel() * a.element_size()
        shape = f"{name} {rows}x{ffn}"
        say(f"swiglu {shape} {SHORT[dt]} fwd")
        with torch.no_grad():  # read a and b, write the product
            ms = _time_alternating({kk: (lambda f=f: f(a, b)) for kk, f in swiglu_impls.items()}, dev, reps, 3 * n)
        results.append(Result("swiglu", shape, SHORT[dt], "fwd", 3 * n, ms))
        say(f"swiglu {shape} {SHORT[dt]} fwd+bwd")
        ag, bg = a.clone().requires_grad_(), b.clone().requires_grad_()
        fns = {kk: _fwd_bwd(f, (ag, bg), (dy,)) for kk, f in swiglu_impls.items()}
        ms = _time_alternating(fns, dev, reps, 8 * n)  # + read dy, a, b, write da, db
        results.append(Result("swiglu", shape, SHORT[dt], "fwd+bwd", 8 * n, ms))
        del a, b, dy, ag, bg
    return copy, results


def table_rows(copy: float, results: list[Result]) -> list[list[str]]:
    rows = []
    for r in results:
        for i, (impl, ms) in enumerate(r.ms.items()):
            case = f"{OPS[r.op][3]} {r.shape} {r.dtype} {r.mode}" if i == 0 else ""
            rows.append([case, impl, f"{ms:.2f}", f"{r.gbs(impl):.1f}", f"{100 * r.of_copy(impl):.0f}%",
                         f"{r.ms['eager'] / ms:.2f}", f"{r.ms['compile'] / ms:.2f}"])
    return rows


COLUMNS = ["case", "impl", "ms", "GB/s", "%copy", "xeager", "xcompile"]


def summary(copy: float, results: list[Result], device: str) -> list[str]:
    """`<what>: <ratio>x <peer> (<details>)` lines; each ratio is the worst case over shapes/dtypes."""
    lines = []

    def worst(op, mode, key):
        rs = [r for r in results if r.op == op and r.mode == mode]
        return min(rs, key=key) if rs else None

    for op, mode in [(op, mode) for op in OPS for mode in ("fwd", "fwd+bwd")]:
        for peer in ("eager", "compile"):
            r = worst(op, mode, lambda r: r.ms[peer] / r.ms["fused"])
            if r is None:
                continue
            lines.append(f"{op} {mode} speed: {r.ms[peer] / r.ms['fused']:.2f}x {'torch.compile' if peer == 'compile' else peer} "
                         f"(worst case {r.shape} {r.dtype}: {r.ms['fused']:.2f} vs {r.ms[peer]:.2f} ms, {device})")
    r = worst("rms_norm", "fwd", lambda r: r.of_copy("fused"))
    if r is not None:
        lines.append(f"rms_norm fwd bandwidth: {r.of_copy('fused'):.2f}x copy bandwidth "
                     f"(worst case {r.shape} {r.dtype}: {r.gbs('fused'):.1f} vs {r.gbs('copy'):.1f} GB/s copying the "
                     f"same bytes in the same loop; {copy:.1f} GB/s on 512 MiB at start, {device})")
    r = worst("rms_norm", "fwd", lambda r: r.ms.get("stream", 0) / r.ms["fused"])
    if r is not None and "stream" in r.ms:
        lines.append(f"rms_norm fwd vs the streaming-copy floor: fused at {r.ms['stream'] / r.ms['fused']:.2f}x its speed, "
                     f"eager {r.ms['stream'] / r.ms['eager']:.2f}x (worst case {r.shape} {r.dtype}: {r.ms['fused']:.2f} ms "
                     f"fused, {r.ms['stream']:.2f} ms non-temporal copy of the same bytes; no kernel that reads x once and "
                     f"writes y once beats that copy, so eager / copy = {r.ms['eager'] / r.ms['stream']:.2f}x bounds the "
                     f"speed-up over eager, {device})")
    return lines


def n_steps(dtypes) -> int:
    return 1 + 3 * 2 * 2 * len(dtypes)  # copy; rms (2 hidden), rope, swiglu (2 models each); fwd + fwd+bwd


def report(console, *, device: str | None = None, dtypes=("float32", "bfloat16"), target_mb: int = 64, reps: int = 7,
           progress_factory=None, malloc_tune: bool = True) -> list[str]:
    """Run the benchmark, print one rich table and the summary lines to `console`; return the lines."""
    from rich import box
    from rich.table import Table

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tuned = malloc_tune and dev == "cpu" and tune_malloc()
    if progress_factory is None:
        copy, results = run(dev, dtypes, target_mb, reps)
    else:
        with progress_factory() as bar:
            task = bar.add_task("bench kernels", total=n_steps(dtypes))

            def step(msg):
                bar.update(task, advance=0 if bar.tasks[task].description == "bench kernels" else 1,
                           description=msg)
            copy, results = run(dev, dtypes, target_mb, reps, progress=step)
            bar.update(task, completed=n_steps(dtypes))
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, title=f"fused kernels vs reference on {name} (copy bandwidth {copy:.1f} GB/s, "
                    f"backend {dispatch.backend(torch.device(dev).type).name}, median of {reps}"
                    + (", glibc malloc tuned" if tuned else "") + ")", title_justify="left")
    for i, c in enumerate(COLUMNS):
        t.add_column(c, justify="left" if i < 2 else "right")
    rows = table_rows(copy, results)
    for i, row in enumerate(rows):
        t.add_row(*row, end_section=i + 1 < len(rows) and rows[i + 1][0] != "")
    console.print(t)
    lines = summary(copy, results, name)
    for ln in lines:
        console.print(ln, highlight=False, markup=False, soft_wrap=True)
    return lines
