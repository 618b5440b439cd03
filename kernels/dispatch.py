"""Which backend runs an op, per device type, decided once per process and logged once.

Order: CUDA extension (CUDA tensors) > CPU extension (CPU tensors) > reference. `LLAMACTL_KERNELS`:
`auto` (default: fused where it builds, else the reference with the reason logged), `reference`
(always the reference), `fused` (a failed build is an error instead of a fallback).
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import threading
from dataclasses import dataclass

import torch

from llamactl.kernels import build

log = logging.getLogger("llamactl.kernels")
MODES = ("auto", "reference", "fused")
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class Backend:
    name: str      # "cpu (AVX2)", "cuda", "reference"
    fused: bool
    reason: str    # why this backend (and why a build was skipped or failed)


_CHOSEN: dict[str, Backend] = {}  # device type -> backend (per process)
_SAID: set[tuple[str, Backend]] = set()  # each distinct choice is logged once per process
_LOCK = threading.Lock()  # one build / choice at a time within the process


def mode() -> str:
    m = os.environ.get("LLAMACTL_KERNELS", "auto").strip().lower() or "auto"
    if m not in MODES:
        raise ValueError(f"LLAMACTL_KERNELS={m!r}: expected one of {', '.join(MODES)}")
    return m


def _say(msg: str) -> None:
    """One line for the user: through logging if the app configured it, else on stderr."""
    log.info(msg)
    if not logging.getLogger().hasHandlers() and not log.handlers:
        print(f"llamactl kernels: {msg}", file=sys.stderr, flush=True)


def _choose(device_type: str) -> Backend:
    m = mode()
    if m == "reference":
        return Backend("reference", False, "LLAMACTL_KERNELS=reference")
    if device_type not in ("cpu", "cuda"):
        return Backend("reference", False, f"no fused kernels for {device_type} tensors")
    if device_type == "cuda" and not torch.version.cuda:
        return Backend("reference", False, "torch was built without CUDA, the CUDA extension is skipped")
    try:
        build.ensure(device_type, announce=_say)
    except build.BuildError as e:
        if m == "fused":
            raise
        return Backend("reference", False, f"{e}; falling back to the reference")
    if device_type == "cpu":
        isa = torch.ops.llamactl_cpu.isa()
        return Backend(f"cpu ({isa})", True, f"fused CPU kernels, {isa} (host best: {build.host_isa()})")
    return Backend("cuda", True, f"fused CUDA kernels (archs {build.cuda_arch_list()})")


def backend(device_type: str) -> Backend:
    """The backend for tensors on `device_type`; the first call may build the extension (logged)."""
    b = _CHOSEN.get(device_type)
    if b is not None:
        return b
    with _LOCK:
        b = _CHOSEN.get(device_type)
        if b is None:
            b = _CHOSEN[device_type] = _choose(device_type)
            if device_type != "meta" and (device_type, b) not in _SAID:
                _SAID.add((device_type, b))
                _say(f"{device_type} tensors use the {b.name} backend: {b.reason}")
    return b


def reset() -> None:
    """Forget the per-process choices (tests; a loaded library stays loaded)."""
    _CHOSEN.clear()


def use_fused(device_type: str, x_dtype: torch.dtype, w_dtype: torch.dtype) -> bool:
    """Constant under torch.compile: the choice is made (and the extension built) at trace time."""
    return x_dtype in FUSED_DTYPES and w_dtype == x_dtype and backend(device_type).fused


def attention_fused(device_type: str, dtype: torch.dtype) -> bool:
    """The CPU attention kernel: fp32/fp64 (bf16 on CPU and every CUDA dtype run torch's SDPA), and only
    where torch exports the BLAS symbols it calls."""
    if device_type != "cpu" or dtype not in (torch.float32, torch.float64) or not backend("cpu").fused:
        return False
    return _has_blas()


def gemv_fused(device_type: str, x_dtype: torch.dtype, w_dtype: torch.dtype) -> bool:
    """The CPU decode matrix-vector kernel: fp32 x and weight on CPU (else F.linear)."""
    return device_type == "cpu" and x_dtype == w_dtype == torch.float32 and backend("cpu").fused


@functools.cache
def _has_blas() -> bool:
    ok = bool(torch.ops.llamactl_cpu.has_blas())
    if not ok:
        _say("causal attention uses torch's SDPA: this torch exports no sgemm_/dgemm_ for the CPU kernel")
    return ok


# What torch.compiler.assume_constant_result does, without importing torch._dynamo (~3 s) in every
# process that never compiles.
use_fused._dynamo_marked_constant = True
attention_fused._dynamo_marked_constant = True
gemv_fused._dynamo_marked_constant = True
