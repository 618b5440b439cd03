"""The run directory: numbered step checkpoints, the `latest` pointer, metrics.jsonl bookkeeping.

    RUN/metrics.jsonl   one JSON object per optimizer step (and per evaluation, with "split")
    RUN/config.toml     the resolved config
    RUN/step-000123/    complete checkpoints (written under `.step-000123.tmp-*` and renamed when whole)
    RUN/latest          name of the newest complete checkpoint

Kept apart from checkpoint.py (the format of one checkpoint) and trainer.py (the loop): every stage and
every command that resumes or reads "the newest checkpoint of a run" goes through here.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from llamactl.errors import LlamactlError

CKPT_PREFIX = "step-"
META_FILE = "llamactl.json"
LATEST_FILE = "latest"


def fsync_dir(path: Path) -> None:
    """Make a rename / create inside `path` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"{CKPT_PREFIX}{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete step checkpoints, oldest first (incomplete ones are written under a temporary name)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    out = []
    for p in run_dir.glob(f"{CKPT_PREFIX}*"):
        suffix = p.name[len(CKPT_PREFIX):]
        if p.is_dir() and suffix.isdigit() and (p / META_FILE).is_file():
            out.append(p)
    return sorted(out, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows of steps after the checkpoint we resume from (they will be recomputed)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):
            break  # a torn last line from a killed process
    path.write_text("".join(x + "\n" for x in keep))


def is_complete(ckpt_dir) -> bool:
    p = Path(ckpt_dir)
    return p.is_dir() and not p.name.startswith(".") and (p / META_FILE).is_file()


def set_latest(run_dir, ckpt_dir) -> None:
    """Point run_dir/latest at ckpt_dir (atomic replace; relative when it lives in run_dir)."""
    run_dir, ckpt_dir = Path(run_dir), Path(ckpt_dir)
    if not is_complete(ckpt_dir):
        raise LlamactlError(f"not a complete checkpoint: {ckpt_dir}")
    target = ckpt_dir.name if ckpt_dir.resolve().parent == run_dir.resolve() else str(ckpt_dir.resolve())
    run_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".latest.", dir=run_dir)
    with os.fdopen(fd, "w") as f:
        f.write(target + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_dir / LATEST_FILE)
    fsync_dir(run_dir)


def latest(run_dir) -> Path | None:
    """The checkpoint named by run_dir/latest; if that is missing or incomplete, the complete checkpoint
    subdirectory with the highest step (None when there is none)."""
    run_dir = Path(run_dir)
    f = run_dir / LATEST_FILE
    if f.is_file():
        name = f.read_text().strip()
        if name:
            p = Path(name) if os.path.isabs(name) else run_dir / name
            if is_complete(p):
                return p
    if not run_dir.is_dir():
        return None
    best, best_key = None, None
    for p in run_dir.iterdir():
        if not is_complete(p):
            continue
        try:
            step = int(json.loads((p / META_FILE).read_text()).get("step", -1))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError, AttributeError):
            continue
        key = (step, p.name)
        if best_key is None or key > best_key:
            best, best_key = p, key
    return best
