"""Launching: `llamactl <stage> --nproc N` re-runs itself under torch.distributed.run (torchrun), and every
rank, however launched (`torchrun ... -m llamactl <stage>` too), calls `init_distributed(tp, pp)`.

Under torchrun the environment carries RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; the
process group uses NCCL when CUDA is available (each rank on cuda:LOCAL_RANK), gloo otherwise.
Multi-node: the same command on every node with --nnodes / --node-rank / --master-addr / --master-port,
which pass straight through to torchrun. dp = world / (tp * pp).
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from llamactl.parallel.context import LayoutError, ParallelContext

# launcher flags consumed here: never passed on to the ranks (they would re-launch again)
LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port")


@dataclass
class LaunchConfig:
    """Processes on this node and the multi-node rendezvous (torchrun's static c10d-free form)."""

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None


def under_launcher() -> bool:
    """True inside a rank started by torchrun (or any launcher setting RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def strip_flags(argv: list[str], flags=LAUNCH_FLAGS) -> list[str]:
    """argv without the launcher flags, in both `--flag value` and `--flag=value` forms."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in flags:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def torchrun_command(argv: list[str], lc: LaunchConfig) -> list[str]:
    """The torch.distributed.run command line that runs `llamactl <argv>` on lc.nproc ranks per node."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={lc.nproc}", f"--nnodes={lc.nnodes}"]
    if lc.nnodes == 1 and lc.master_addr is None and lc.master_port is None:
        cmd.append("--standalone")  # local rendezvous on a free port
    else:
        cmd += [f"--node-rank={lc.node_rank}", f"--master-addr={lc.master_addr or '127.0.0.1'}",
                f"--master-port={lc.master_port or 29500}"]
    return cmd + ["-m", "llamactl", *strip_flags(argv)]


def validate_world(tp: int, pp: int, lc: LaunchConfig) -> int:
    """dp for this launch, or a one-line LayoutError naming the flags."""
    if lc.nproc < 1 or lc.nnodes < 1:
        raise LayoutError(f"--nproc {lc.nproc} and --nnodes {lc.nnodes} must be at least 1")
    if not 0 <= lc.node_rank < lc.nnodes:
        raise LayoutError(f"--node-rank {lc.node_rank} must be in 0..{lc.nnodes - 1} (--nnodes {lc.nnodes})")
    world = lc.nproc * lc.nnodes
    if tp < 1 or pp < 1 or world % (tp * pp):
        raise LayoutError(f"--tp {tp} x --pp {pp} does not divide the {world} processes (--nproc x --nnodes)")
    return world // (tp * pp)


def relaunch(argv: list[str], tp: int, pp: int, lc: LaunchConfig) -> int:
    """Run this command again under torchrun on lc.nproc local ranks; return torchrun's exit code.

    Call it from the stage command when lc.nproc > 1 (or nnodes > 1) and not under_launcher().
    """
    validate_world(tp, pp, lc)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // lc.nproc)))
    return subprocess.call(torchrun_command(argv, lc), env=env)


def maybe_relaunch(tp: int, pp: int, lc: LaunchConfig, argv: list[str] | None = None) -> bool:
    """Re-launch under torchrun when more than one process is asked for and we are not a rank yet.

    Returns False when the caller should go on in this process; otherwise exits with torchrun's code.
    """
    if under_launcher() or (lc.nproc == 1 and lc.nnodes == 1):
        return False
    raise SystemExit(relaunch(sys.argv[1:] if argv is None else argv, tp, pp, lc))


def init_distributed(tp: int = 1, pp: int = 1, *, timeout_s: float = 1800.0) -> ParallelContext:
    """This rank's ParallelContext: joins the launcher's process group (once) and builds the groups.

    Without a launcher environment it is the single-process context (then tp * pp must be 1).
    """
    if not under_launcher() or (int(os.environ["WORLD_SIZE"]) == 1 and tp * pp == 1):
        if tp * pp != 1:
            raise LayoutError(f"--tp {tp} --pp {pp} needs {tp * pp} processes: add --nproc {tp * pp} "
                              f"or start with torchrun")
        return ParallelContext.single()
    if not dist.is_initialized():
        world = int(os.environ["WORLD_SIZE"])
        if world % (tp * pp):
            raise LayoutError(f"--tp {tp} x --pp {pp} does not divide the world of {world} processes")
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            backend = "nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    ctx = ParallelContext.from_world(tp, pp)
    # one collective on the whole world first: NCCL then sets up its communicator with every rank present
    # (batched p2p as a group's first operation would need all of its ranks to take part)
    dist.barrier()
    return ctx


def device_for(ctx: ParallelContext) -> torch.device:
    """The device of this rank: cuda:LOCAL_RANK under a launcher with CUDA, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def shutdown() -> None:
    """Leave the process group cleanly at the end of a stage (no-op when single-process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
