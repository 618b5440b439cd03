"""The one path every training command takes: resolve -> check -> dry-run -> relaunch -> init -> run.

A stage supplies three functions: `resolve(flags, config_file, parallel_flags) -> plan` (preset <- config
file <- flags; the plan has `.parallel` (ParallelConfig) and `.model` (ModelConfig)), `describe(plan)` (what
--dry-run prints) and `run(plan, ctx, resume=...)` (this rank's training; returns something with an
`exit_code`, e.g. trainer.FitResult). The launcher flags (--tp --pp --nproc --nnodes --node-rank
--master-addr --master-port --zero) arrive as one LaunchOptions, declared once in cli/app.py for every command.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from llamactl.config import ParallelConfig, apply_overrides
from llamactl.errors import LlamactlError


@dataclass
class LaunchOptions:
    """The launcher flags of a training command (None: not given, the config file or default decides)."""

    tp: int | None = None
    pp: int | None = None
    nproc: int | None = None
    nnodes: int | None = None
    zero: bool | None = None
    sequence_parallel: bool | None = None
    virtual_stages: int | None = None
    overlap_grad_reduce: bool | None = None
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None

    def parallel_flags(self) -> dict[str, Any]:
        """The flags that are part of the run's [parallel] config, as given."""
        return {k: getattr(self, k) for k in ("tp", "pp", "nproc", "nnodes", "zero", "sequence_parallel", "virtual_stages",
                                             "overlap_grad_reduce") if getattr(self, k) is not None}


def resolve_parallel(section: dict[str, Any], flags: dict[str, Any], config_file: Path | None = None) -> ParallelConfig:
    """ParallelConfig defaults <- the config file's [parallel] <- flags. Inside a launched rank the world that
    was launched is the truth (nproc / nnodes from torchrun's environment)."""
    par = apply_overrides(ParallelConfig(), section, f"[parallel] in {config_file}")
    par = apply_overrides(par, {k: v for k, v in flags.items() if v is not None}, "flags")
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        world = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        par.nproc, par.nnodes = local, max(1, world // max(1, local))
    par.validate()
    return par


def plan_world(launch: LaunchOptions, config: Path | None) -> LaunchOptions:
    """What --dry-run plans for: without --nproc (flag or [parallel] nproc), as many processes as tp x pp need,
    so a dry run shows the plan of a layout this machine could never start instead of refusing it."""
    if launch.nproc is not None or ("WORLD_SIZE" in os.environ and "RANK" in os.environ):
        return launch
    from dataclasses import replace

    from llamactl.config import load_toml

    section = (load_toml(config).get("parallel", {}) if config else {}) or {}
    if "nproc" in section:
        return launch
    tp, pp = launch.tp or section.get("tp", 1), launch.pp or section.get("pp", 1)
    return replace(launch, nproc=tp * pp if isinstance(tp, int) and isinstance(pp, int) and tp * pp > 0 else None)


def run_stage(resolve: Callable, describe: Callable, run: Callable, *, flags: dict[str, Any],
              launch: LaunchOptions, config: Path | None = None, dry_run: bool = False, resume: bool = False) -> Any:
    """Resolve the stage's plan, check its layout, print it (--dry-run) or relaunch under torchrun (--nproc > 1),
    join the process group and run. A run stopped by a signal exits with its exit code (130 SIGINT,
    143 SIGTERM) after its checkpoint is saved, so a scheduler can tell it from a finished one."""
    from llamactl.parallel.launch import LaunchConfig, init_distributed, maybe_relaunch
    from llamactl.plan import layout_error

    plan = resolve(flags, config, (plan_world(launch, config) if dry_run else launch).parallel_flags())
    par = plan.parallel
    err = layout_error(plan.model, par.tp, par.pp)
    if err:
        raise LlamactlError(err)
    accum = getattr(plan, "accum", None)  # micro-batches per step of a stage with a fixed count (sft, rm train)
    if accum is not None and par.virtual_stages > 1:  # refused before a run dir exists, not at the first step
        from llamactl.parallel.pipeline import check_microbatches

        check_microbatches(par.pp, par.virtual_stages, accum)
    if dry_run:
        describe(plan)
        return None
    maybe_relaunch(par.tp, par.pp, LaunchConfig(par.nproc, par.nnodes, launch.node_rank, launch.master_addr,
                                                launch.master_port))
    ctx = init_distributed(par.tp, par.pp)
    ctx.virtual_stages = par.virtual_stages  # interleaved 1F1B: layer chunks per pipeline rank (no groups)
    result = run(plan, ctx, resume=resume)
    code = getattr(result, "exit_code", 0)
    if code:
        raise SystemExit(code)
    return result
