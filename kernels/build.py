"""JIT build of the fused kernels (torch.utils.cpp_extension + ninja, -O3), cached and crash-safe.

One cache directory per build key: extension kind, torch version, host ISA (CPU) or CUDA version and
arch list, compiler and a hash of the sources and flags, under `~/.cache/llamactl/kernels/<key>`
(`LLAMACTL_KERNEL_CACHE` moves the root). A build always runs in a fresh `<key>.tmp-<pid>-<rand>`
directory that is renamed to `<key>` only when complete, so a build killed midway never poisons the
next one; `<key>.lock` (pid, host, time) serialises concurrent builds of one key (e.g. torchrun ranks),
and a lock whose process is dead, or that is older than LLAMACTL_KERNEL_LOCK_MINUTES (20), is stale
and removed.

CPU: each csrc/cpu/*_isa.cpp (kernels, attention softmax) is compiled three times (DEFAULT, AVX2,
AVX-512 flags) by a small ninja file; the bindings (the other .cpp files, no ISA flags, linked first so
shared inline code comes from the baseline object) pick the table the host supports at run time.
CUDA: csrc/cuda/*.cu (no torch headers) + the binding ops_cuda.cpp, built only when torch has CUDA.
"""
from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch

from llamactl.kernels import ops as _ops  # noqa: F401  (op schemas must exist before a binding loads)

CSRC = Path(__file__).resolve().parent / "csrc"
CPU_NAME, CUDA_NAME = "llamactl_kernels_cpu", "llamactl_kernels_cuda"
COMMON_CFLAGS = ["-O3", "-ffp-contract=off"]  # torch adds -std=c++20 to its own compiles
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
ISA_FLAGS = {  # name -> compiler flags of that copy of each *_isa.cpp
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2"] + (["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"] if _X86 else []),
    "AVX512": ["-DCPU_CAPABILITY=AVX512"] + (["-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
                                              "-mavx512dq", "-mfma", "-mavx2", "-mf16c"] if _X86 else []),
}
# at::parallel_for is an inline `#pragma omp parallel`: a binding compiled without -fopenmp runs every
# kernel on one thread. The library it links (libgomp.so.1) is the copy torch already loaded.
OPENMP_FLAGS = ["-fopenmp"] if torch.backends.openmp.is_available() and sys.platform.startswith("linux") else []
DEFAULT_CUDA_ARCHS = "8.0;9.0"

_LOADED: dict[str, Path] = {}  # kind -> library loaded into this process (a library loads once)


class BuildError(RuntimeError):
    """The extension could not be built or loaded; the message says why (one line + log path)."""


def cache_root() -> Path:
    env = os.environ.get("LLAMACTL_KERNEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llamactl" / "kernels"


def host_isa() -> str:
    """The best kernel copy this host can run (what the binding will pick)."""
    cap = torch.backends.cpu.get_cpu_capability().upper()
    return "AVX512" if cap.startswith("AVX512") else "AVX2" if cap.startswith("AVX2") else "DEFAULT"


def cxx() -> str:
    return os.environ.get("CXX", "c++")


def _sources(kind: str) -> list[Path]:
    d = CSRC / kind
    return sorted(p for p in d.iterdir() if p.suffix in (".cpp", ".cu", ".h", ".cuh"))


def cuda_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST, else 8.0;9.0 (cross-compiling) plus the visible GPU's own arch."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env
    archs = DEFAULT_CUDA_ARCHS.split(";")
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if f"{major}.{minor}" not in archs:
            archs.append(f"{major}.{minor}")
    return ";".join(archs)


def build_key(kind: str) -> str:
    h = hashlib.sha256()
    for p in _sources(kind):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(repr((COMMON_CFLAGS, OPENMP_FLAGS, ISA_FLAGS, cxx(), sys.version_info[:2])).encode())
    if kind == "cpu":
        tag = host_isa()
    else:
        tag = f"cu{torch.version.cuda}-sm{cuda_arch_list()}"
        h.update(tag.encode())
    key = f"{kind}-torch{torch.__version__}-{tag}-{h.hexdigest()[:16]}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", key)


# ---- locking ----------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(path: Path, max_age_s: float) -> bool:
    """A lock/tmp dir is stale if its owner (same host) is dead or it is older than max_age_s."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False
    if age > max_age_s:
        return True
    try:
        text = (path / "owner" if path.is_dir() else path).read_text()
        pid, host = text.split()[:2]
        return host == socket.gethostname() and not _pid_alive(int(pid))
    except (OSError, ValueError, IndexError):
        return False


def _lock_max_age() -> float:
    return float(os.environ.get("LLAMACTL_KERNEL_LOCK_MINUTES", "20")) * 60


@contextmanager
def file_lock(path: Path, max_age_s: float | None = None, wait_s: float = 3600.0):
    """Exclusive lock file holding 'pid host time'; stale locks (dead owner / too old) are broken."""
    max_age_s = _lock_max_age() if max_age_s is None else max_age_s
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _stale(path, max_age_s):
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
                continue
            if time.time() - t0 > wait_s:
                raise BuildError(f"timed out waiting for the kernel build lock {path} (remove it if no build runs)")
            time.sleep(0.5)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()} {time.time():.0f}\n")
        break
    try:
        yield
    finally:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _clean_stale_tmp(root: Path, key: str) -> None:
    for d in root.glob(f"{key}.tmp-*"):
        if _stale(d, _lock_max_age()):
            shutil.rmtree(d, ignore_errors=True)


# ---- building ---------------------------------------------------------------------------------------
def _ninja() -> str:
    found = shutil.which("ninja") or shutil.which("ninja", path=str(Path(sys.executable).parent))
    if not found:
        raise BuildError("ninja not found (pip install ninja)")
    d = str(Path(found).parent)  # torch's loader looks for ninja on PATH
    if d not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
    return found


def _check_compiler() -> None:
    if not shutil.which(cxx()):
        raise BuildError(f"no C++ compiler ({cxx()!r} not found; set CXX)")


def _isa_objects(tmp: Path, log: Path) -> list[Path]:
    """Compile each csrc/cpu/*_isa.cpp once per ISA with a tiny ninja file (per-file flags)."""
    from torch.utils.cpp_extension import include_paths

    base = COMMON_CFLAGS + ["-std=c++20", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
                            f"-I{CSRC / 'cpu'}"] + [f"-I{p}" for p in include_paths()]
    lines = ["ninja_required_version = 1.3", f"cxx = {cxx()}", "rule cc",
             "  command = $cxx -MMD -MF $out.d $cflags -c $in -o $out", "  depfile = $out.d", "  deps = gcc"]
    objs = []
    for src in sorted((CSRC / "cpu").glob("*_isa.cpp")):
        for isa, flags in ISA_FLAGS.items():
            obj = tmp / f"{src.stem}_{isa.lower()}.o"
            objs.append(obj)
            lines += [f"build {obj}: cc {src}", "  cflags = " + " ".join(base + flags)]
    (tmp / "isa").mkdir(exist_ok=True)
    (tmp / "isa" / "build.ninja").write_text("\n".join(lines) + "\n")
    r = subprocess.run([_ninja(), "-C", str(tmp / "isa")], capture_output=True, text=True)
    log.write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise BuildError(f"compiling the CPU kernels failed ({cxx()}): {_tail(r.stdout + r.stderr)}")
    return objs


def _tail(text: str, n: int = 2) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[-400:] if lines else "no output"


def _build(kind: str, tmp: Path, log: Path) -> None:
    from torch.utils import cpp_extension

    _check_compiler()
    _ninja()
    if kind == "cpu":
        objs = _isa_objects(tmp, log)
        kw = dict(name=CPU_NAME, sources=[str(p) for p in _sources("cpu") if p.suffix == ".cpp" and not p.stem.endswith("_isa")],
                  extra_cflags=COMMON_CFLAGS + OPENMP_FLAGS, extra_ldflags=[str(o) for o in objs] + OPENMP_FLAGS,
                  extra_include_paths=[str(CSRC / "cpu")], with_cuda=False)
    else:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", cuda_arch_list())
        srcs = [str(p) for p in _sources("cuda") if p.suffix in (".cpp", ".cu")]
        kw = dict(name=CUDA_NAME, sources=srcs, extra_cflags=COMMON_CFLAGS + OPENMP_FLAGS,
                  extra_ldflags=OPENMP_FLAGS,
                  extra_cuda_cflags=["-O3"], extra_include_paths=[str(CSRC / "cuda")],
                  with_cuda=True)
    try:
        cpp_extension.load(build_directory=str(tmp), is_python_module=False, verbose=False, **kw)
    except Exception as e:  # torch raises RuntimeError with the compiler output
        log.write_text(str(e))
        raise BuildError(f"building the {kind} extension failed: {_tail(str(e))}") from None


KEEP_BUILDS = 3  # older builds kept per kind/torch/ISA besides the current one (other checkouts use them)


def prune(root: Path, key: str, keep: int = KEEP_BUILDS) -> list[Path]:
    """Remove finished builds for the same kind, torch and ISA as `key` but other sources or flags,
    keeping the `keep` most recently modified. A process that already loaded one keeps its mapping."""
    prefix = key.rsplit("-", 1)[0] + "-"
    old = [d for d in root.glob(prefix + "*") if d.is_dir() and d.name != key and ".tmp-" not in d.name
           and re.fullmatch(r"[0-9a-f]{16}", d.name[len(prefix):])]
    old.sort(key=lambda d: d.stat().st_mtime, reverse=True)
    removed = []
    for d in old[keep:]:
        shutil.rmtree(d, ignore_errors=True)
        (root / f"{d.name}.log").unlink(missing_ok=True)
        removed.append(d)
    return removed


def ensure(kind: str, announce=None) -> Path:
    """Load the `kind` ("cpu" | "cuda") extension into this process, building it first if not cached.

    announce(msg) is called before a (slow) build starts. Raises BuildError with the reason.
    """
    if kind in _LOADED:
        return _LOADED[kind]
    root = cache_root()
    key = build_key(kind)
    final = root / key
    name = CPU_NAME if kind == "cpu" else CUDA_NAME
    if not list(final.glob(f"{name}*.so")):
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BuildError(f"cannot create the kernel cache {root}: {e}") from None
        with file_lock(root / f"{key}.lock"):
            _clean_stale_tmp(root, key)
            if not list(final.glob(f"{name}*.so")):
                if announce:
                    announce(f"building the fused {kind} kernels once (1-2 min), cache {final}")
                tmp = root / f"{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                tmp.mkdir(parents=True)
                (tmp / "owner").write_text(f"{os.getpid()} {socket.gethostname()} {time.time():.0f}\n")
                log = root / f"{key}.log"
                try:
                    _build(kind, tmp, log)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
                if final.exists():  # an older incomplete directory (cannot happen with rename, but be safe)
                    shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
                prune(root, key)
                so = sorted(final.glob(f"{name}*.so"))[0]
                _LOADED[kind] = so  # cpp_extension.load already loaded it (from the tmp path)
                return so
    so = sorted(final.glob(f"{name}*.so"))[0]
    try:
        torch.ops.load_library(str(so))
    except OSError as e:
        raise BuildError(f"loading {so} failed: {e}") from None
    _LOADED[kind] = so
    return so
