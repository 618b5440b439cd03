"""A run that trains several models (PPO: policy and value) and resumes them together, exactly.

    RUN/metrics.jsonl, RUN/config.toml    the stage's own rows and resolved config
    RUN/policy/step-000010/, latest       one run directory per model, checkpoints as `fit` writes them:
    RUN/value/step-000010/, latest        weights (a valid `--model` for the next stage) + that Trainer's
                                          state (optimizer, step, tokens) in its train_state/
    RUN/state/step-000010/                the shared train state, one file per rank (the loop's step, data
                                          position, RNG, whatever the stage keeps) + state.json

The shared state is written last, under a temporary name renamed when every rank's file is in: a state
directory exists only when the model checkpoints of its step are complete, so resuming from the newest one
restores all models at the same step (a crash between the model checkpoints and the state leaves the
previous step as the one to resume from).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Mapping

import torch
import torch.distributed as dist

from llamactl.errors import LlamactlError
from llamactl.rundir import CKPT_PREFIX, fsync_dir, list_checkpoints, remove_checkpoint, set_latest, step_dir

STATE_DIR = "state"
STATE_FILE = "state.json"


def _distributed(ctx) -> bool:
    return ctx.world_size > 1 and dist.is_available() and dist.is_initialized()


def state_steps(run_dir: Path) -> list[int]:
    """Steps with a complete shared state, oldest first."""
    root = Path(run_dir) / STATE_DIR
    if not root.is_dir():
        return []
    out = []
    for p in root.glob(f"{CKPT_PREFIX}*"):
        suffix = p.name[len(CKPT_PREFIX):]
        if suffix.isdigit() and (p / STATE_FILE).is_file():
            out.append(int(suffix))
    return sorted(out)


def save_run_state(run_dir: Path, trainers: Mapping[str, "Trainer"], shared: dict, ctx, *, keep: int = 3,  # noqa: F821
                   tokenizer=None, stage: str = "", extra: dict | None = None) -> Path:
    """Checkpoint every model (run_dir/<name>/step-N, N = the first trainer's step), then the shared state of
    this rank; collective over all ranks. Keeps the newest `keep` steps. Returns the state directory."""
    from llamactl.checkpoint.layout import check_train_state

    run_dir = Path(run_dir)
    steps = {t.global_step for t in trainers.values()}
    step = next(iter(trainers.values())).global_step
    check_train_state(shared, "shared train state")
    for name, tr in trainers.items():
        path = tr.save(step_dir(run_dir / name, step), tokenizer=tokenizer, stage=stage,
                       extra={**(extra or {}), "model": name})
        if ctx.rank == 0:
            set_latest(run_dir / name, path)
    holder: list = [None]
    root = run_dir / STATE_DIR
    if ctx.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        holder[0] = tempfile.mkdtemp(prefix=f".{CKPT_PREFIX}{step:06d}.tmp-", dir=root)
    if _distributed(ctx):
        dist.broadcast_object_list(holder, src=0)
    tmp = Path(holder[0])
    torch.save(shared, tmp / f"rank{ctx.rank:05d}.pt")
    if _distributed(ctx):
        dist.barrier()
    final = step_dir(root, step)
    if ctx.rank == 0:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "models": sorted(trainers), "world": ctx.world_size,
                                                  "model_steps": sorted(steps)}))
        remove_checkpoint(final)
        tmp.rename(final)
        fsync_dir(root)
        kept = state_steps(run_dir)[-keep:]
        for s in state_steps(run_dir)[:-keep]:
            remove_checkpoint(step_dir(root, s))
        for name in trainers:
            for ck in list_checkpoints(run_dir / name):
                if int(ck.name[len(CKPT_PREFIX):]) < min(kept):
                    remove_checkpoint(ck)
    if _distributed(ctx):
        dist.barrier()
    return final


def load_run_state(run_dir: Path, trainers: Mapping[str, "Trainer"], ctx) -> dict | None:  # noqa: F821
    """Restore every trainer (weights, exact masters, optimizer, counters) from the newest complete step and
    return this rank's shared state (None when the run has none yet)."""
    run_dir = Path(run_dir)
    steps = state_steps(run_dir)
    if not steps:
        return None
    step = steps[-1]
    d = step_dir(run_dir / STATE_DIR, step)
    info = json.loads((d / STATE_FILE).read_text())
    if sorted(trainers) != info["models"]:
        raise LlamactlError(f"run holds models {info['models']}, this stage trains {sorted(trainers)} ({run_dir})")
    if info["world"] != ctx.world_size:
        raise LlamactlError(f"run was saved by {info['world']} processes, this is {ctx.world_size}; resume with "
                            f"the same --tp/--pp/--nproc ({d})")
    for name, tr in trainers.items():
        tr.load(step_dir(run_dir / name, step))
    if ctx.rank == 0:  # model checkpoints of a later step whose shared state never completed: redone from here
        for name in trainers:
            for ck in list_checkpoints(run_dir / name):
                if int(ck.name[len(CKPT_PREFIX):]) > step:
                    remove_checkpoint(ck)
            set_latest(run_dir / name, step_dir(run_dir / name, step))
    if _distributed(ctx):
        dist.barrier()
    try:
        return torch.load(d / f"rank{ctx.rank:05d}.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise LlamactlError(f"cannot read the shared train state: {str(e).splitlines()[0]} ({d})") from None
