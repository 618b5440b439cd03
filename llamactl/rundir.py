"""The run directory: numbered step checkpoints, the `latest` pointer, metrics.jsonl bookkeeping.

    RUN/metrics.jsonl   one JSON object per optimizer step (and per evaluation, with "split")
    RUN/config.toml     the resolved config
    RUN/step-000123/    complete checkpoints (written under `.step-000123.tmp-*` and renamed when whole)
    RUN/latest          name of the newest complete checkpoint (a hint for people and scripts: resume and
                        `--model RUN` take the newest complete checkpoint, whatever `latest` says, because
                        a kill between publishing a checkpoint and updating `latest` leaves it stale)

Kept apart from checkpoint.py (the format of one checkpoint) and trainer.py (the loop): every stage and
every command that resumes or reads "the newest checkpoint of a run" goes through here.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import time
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


_STEP_NAME = re.compile(re.escape(CKPT_PREFIX) + r"(\d+)")
_TEMP_NAME = re.compile(r"\." + re.escape(CKPT_PREFIX) + r"\d+\.(tmp|old)-.+|\.(" + LATEST_FILE + r"|metrics\.jsonl)\..+")


def is_step_dir(path, step: int | None = None) -> bool:
    """Is `path` named like a run's step checkpoint (`step-000123`), of `step` when given?"""
    m = _STEP_NAME.fullmatch(Path(path).name)
    return m is not None and (step is None or int(m.group(1)) == step)


def remove_stale_temps(run_dir) -> list[Path]:
    """Remove what a killed writer left in run_dir: `.step-*.tmp-*` (a checkpoint being written),
    `.step-*.old-*` (one being replaced or deleted), `.latest.*` and `.metrics.jsonl.*` (being rewritten).

    Only for the process that writes run_dir (at the start of a run or resume, or before its next save):
    another process writing the same run dir at the same time would lose its temporary directory."""
    run_dir = Path(run_dir)
    removed = []
    if not run_dir.is_dir():
        return removed
    for p in run_dir.iterdir():
        if _TEMP_NAME.fullmatch(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def fault_after_publish(step: int) -> None:
    """Test hook: LLAMACTL_FAULT_AFTER_PUBLISH=N SIGKILLs this process right after checkpoint step N is
    renamed into place and before `latest` is updated (the window of a stale `latest`)."""
    at = os.environ.get("LLAMACTL_FAULT_AFTER_PUBLISH")
    if at and int(at) == step:
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)


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
    _replace_text(path, "".join(x + "\n" for x in keep))


def _replace_text(path: Path, text: str) -> None:
    """Write `path` through a temporary file and a rename: a kill leaves the old or the new file, never half."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_checkpoint(ckpt_dir) -> None:
    """Delete a checkpoint so that a kill midway cannot leave a half-deleted directory under its name:
    renamed to `.{name}.old-*` first (removed by remove_stale_temps if the kill comes during rmtree)."""
    p = Path(ckpt_dir)
    if not p.exists():
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{p.name}.old-", dir=p.parent))
    os.rename(p, aside / p.name)
    shutil.rmtree(aside, ignore_errors=True)


def recover(run_dir) -> Path | None:
    """Start of a run or resume, by the process that will write run_dir: remove what killed writers left
    (remove_stale_temps), point `latest` at the newest complete checkpoint if it is stale, and return that
    checkpoint (None when there is none)."""
    remove_stale_temps(run_dir)
    ckpt = latest(run_dir)
    if ckpt is not None:
        f = Path(run_dir) / LATEST_FILE
        try:
            named = f.read_text().strip() if f.is_file() else ""
        except (OSError, UnicodeDecodeError):
            named = ""
        if named not in (ckpt.name, str(ckpt.resolve())):
            set_latest(run_dir, ckpt)
    return ckpt


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
    """The complete checkpoint of run_dir with the highest step, among its subdirectories and the one
    `latest` names (None when there is none). `latest` alone is not trusted: a kill after a checkpoint is
    renamed into place and before `latest` is rewritten leaves it pointing at an older step."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    candidates = [p for p in run_dir.iterdir() if is_complete(p)]
    f = run_dir / LATEST_FILE
    if f.is_file():
        try:
            name = f.read_text().strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        p = (Path(name) if os.path.isabs(name) else run_dir / name) if name else None
        if p is not None and is_complete(p) and p.resolve().parent != run_dir.resolve():
            candidates.append(p)
    best, best_key = None, None
    for p in candidates:
        step = _step_of(p)
        if step is None:
            continue
        key = (step, p.name)
        if best_key is None or key > best_key:
            best, best_key = p, key
    return best


def _step_of(ckpt: Path) -> int | None:
    """The step of a checkpoint: from its `step-N` name, else from its llamactl.json (None if unreadable)."""
    m = _STEP_NAME.fullmatch(ckpt.name)
    if m is not None:
        return int(m.group(1))
    try:
        return int(json.loads((ckpt / META_FILE).read_text()).get("step", -1))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError, AttributeError):
        return None
