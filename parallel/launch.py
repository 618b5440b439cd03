"""Launching: `llamactl <stage> --nproc N` re-runs itself under torch.distributed.run (torchrun), and every
rank, however launched (`torchrun ... -m llamactl <stage>` too), calls `init_distributed(tp, pp)`.

Under torchrun the environment carries RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; the
process group uses NCCL when CUDA is available (each rank on cuda:LOCAL_RANK), gloo otherwise.
Multi-node: the same command on every node with --nnodes / --node-rank / --master-addr / --master-port,
which pass straight through to torchrun: its static rendezvous, hosted by node 0's agent at
master-addr:master-port, which every node's agent joins (tests/test_multinode.py runs two on one machine;
examples/ has a Slurm script and a plain one). The ranks are numbered node by node, so --node-rank fixes
which pipeline stages a node holds. dp = world / (tp * pp).
torch is imported inside the functions that need it: the CLI reads this module before any torch work.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from llamactl.parallel.context import LayoutError, ParallelContext, check_layout

# launcher flags consumed here: never passed on to the ranks (they would re-launch again)
LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port")
# folder where ranks started by relaunch() leave their one-line error for the launcher to print once
RANK_ERRORS_ENV = "LLAMACTL_RANK_ERRORS"


class RanksFailed(Exception):
    """Ranks of a --nproc launch failed: `message` (None: the ranks said it themselves) and the exit code."""

    def __init__(self, message: str | None, exit_code: int):
        super().__init__(message or f"exit code {exit_code}")
        self.message, self.exit_code = message, exit_code


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


def torchrun_args(argv: list[str], lc: LaunchConfig) -> list[str]:
    """torch.distributed.run's arguments that run `llamactl <argv>` on lc.nproc ranks per node."""
    args = [f"--nproc-per-node={lc.nproc}", f"--nnodes={lc.nnodes}"]
    if lc.nnodes == 1 and lc.master_addr is None and lc.master_port is None:
        args.append("--standalone")  # local rendezvous on a free port
    else:
        args += [f"--node-rank={lc.node_rank}", f"--master-addr={lc.master_addr or '127.0.0.1'}",
                 f"--master-port={lc.master_port or 29500}"]
    return args + ["-m", "llamactl", *strip_flags(argv)]


def torchrun_command(argv: list[str], lc: LaunchConfig) -> list[str]:
    """The same launch as a torchrun command line (what relaunch() runs in-process)."""
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_args(argv, lc)]


def validate_world(tp: int, pp: int, lc: LaunchConfig) -> int:
    """dp for this launch, or a one-line LayoutError naming the flags."""
    dp = check_layout(tp, pp, nproc=lc.nproc, nnodes=lc.nnodes)
    if not 0 <= lc.node_rank < lc.nnodes:
        raise LayoutError(f"--node-rank {lc.node_rank} must be in 0..{lc.nnodes - 1} (--node-rank, --nnodes {lc.nnodes})")
    if lc.master_port is not None and not 1 <= lc.master_port <= 65535:
        raise LayoutError(f"--master-port {lc.master_port} is not a TCP port: it must be in 1..65535 (--master-port)")
    return dp


SHUTDOWN_GRACE_S = 900  # TORCH_ELASTIC_SHUTDOWN_TIMEOUT, when the user has not set it


def relaunch(argv: list[str], tp: int, pp: int, lc: LaunchConfig, *, debug: bool = False) -> int:
    """Run this command again on lc.nproc local ranks through torchrun's agent, in this process.

    Returns 0 when every rank succeeded, 128 + signal when this launcher was stopped by SIGINT / SIGTERM
    (the ranks then get the same signal and stop on their own). Failed ranks raise RanksFailed with the
    one error line a rank left (printed once, not once per rank) and its exit code, instead of torchrun's
    ChildFailedError traceback; with debug=True that traceback and torchrun's log are shown as they are.
    """
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args, run

    validate_world(tp, pp, lc)
    if lc.nnodes > 1 and not lc.master_addr:  # torchrun would default to 127.0.0.1: node 1 would wait on itself
        raise LayoutError(f"--nnodes {lc.nnodes} needs --master-addr: the address of node 0, the same on every "
                          f"node (--master-addr)")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // lc.nproc)))
    # On SIGINT / SIGTERM the agent passes the signal on and SIGKILLs ranks still running after this many
    # seconds (torch's default: 30). Ranks finish their step and write a checkpoint first, which takes
    # longer than that for a large model (or on a busy machine): give them SHUTDOWN_GRACE_S.
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_GRACE_S))
    with tempfile.TemporaryDirectory(prefix="llamactl-ranks-") as reports, _quiet_torchrun(not debug):
        os.environ[RANK_ERRORS_ENV] = reports
        try:
            run(parse_args(torchrun_args(argv, lc)))
            return 0
        except ChildFailedError as e:
            if debug:
                raise
            root, _ = e.get_first_failure()
            codes = {r: f.exitcode for r, f in e.failures.items()}
            raise RanksFailed(*summarize_failures(codes, read_rank_errors(Path(reports)), root)) from None
        except SignalException as e:
            return 128 + int(e.sigval)
        except (RendezvousError, DistError) as e:
            if debug:
                raise
            where = "--master-addr/--master-port" if lc.nnodes > 1 else "--nproc"
            raise RanksFailed(f"could not start the ranks: {_one_line(e)} ({where})", 1) from None
        finally:
            os.environ.pop(RANK_ERRORS_ENV, None)


def maybe_relaunch(tp: int, pp: int, lc: LaunchConfig, argv: list[str] | None = None) -> bool:
    """Re-launch under torchrun when more than one process is asked for and we are not a rank yet.

    Returns False when the caller should go on in this process; otherwise exits with the ranks' code
    (or raises RanksFailed, which the CLI prints as one line).
    """
    if under_launcher() or (lc.nproc == 1 and lc.nnodes == 1):
        check_layout(tp, pp)  # the numbers themselves (world checks come once the world is known)
        return False
    argv = sys.argv[1:] if argv is None else argv
    raise SystemExit(relaunch(argv, tp, pp, lc, debug="--debug" in argv))


# ---- one error line per launch -----------------------------------------------------------------------
def report_rank_error(message: str, exit_code: int, *, user: bool) -> bool:
    """In a rank started by relaunch(): leave the error line for the launcher, which prints it once.

    Returns True when it was left there (the rank then prints nothing); False outside such a rank,
    or when the folder cannot be written, so the caller prints it itself. `user` marks mistakes a
    user made (preferred over the follow-on failures of the other ranks, e.g. a closed connection).
    """
    folder = os.environ.get(RANK_ERRORS_ENV)
    if not folder or not under_launcher():
        return False
    path = Path(folder) / f"rank-{int(os.environ['RANK']):06d}.json"
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps({"message": message, "exit_code": exit_code, "user": user}))
        os.replace(tmp, path)  # the launcher never reads half a line
    except OSError:
        return False
    return True


def read_rank_errors(folder: Path) -> dict[int, dict]:
    """rank -> {"message", "exit_code", "user"} of every rank that reported an error."""
    out = {}
    for p in sorted(folder.glob("rank-*.json")):
        try:
            out[int(p.stem.split("-")[1])] = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
    return out


def summarize_failures(codes: dict[int, int], reports: dict[int, dict], root: int) -> tuple[str | None, int]:
    """The one line to print and the exit code for failed ranks.

    codes: rank -> exit code (negative: killed by that signal) of the failed ranks; reports: what ranks
    said (read_rank_errors); root: the first rank that failed. A user error wins over the failures it
    caused on other ranks (the lowest such rank is shown); without one, the first rank that failed is.
    "(rank N)" is added only when ranks disagree.
    A first rank killed by a signal, with no user error anywhere, is named; a rank that exited with a code
    of its own and no report (a stop on SIGTERM, say) said what it had to say, so only its code is passed on.
    """
    user = {r: v for r, v in reports.items() if v.get("user")}
    code = codes.get(root, 1)
    if user or root in reports or (reports and code >= 0):
        chosen = user or reports
        rank = min(user) if user else (root if root in reports else min(reports))  # a bug: where it began
        msg = chosen[rank]["message"]
        if len({v["message"] for v in chosen.values()}) > 1:
            msg += f" (rank {rank})"
        return msg, int(chosen[rank].get("exit_code") or 1)
    if code < 0:  # killed (out of memory, say): the others' lost connections are not the news
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"rank {root} was killed by {name}", 128 - code
    return None, code or 1


def _one_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return lines[0] if lines else type(e).__name__


@contextmanager
def _quiet_torchrun(quiet: bool):
    """torchrun's agent logs each rank's exit at WARNING / ERROR: with the one-line report they are noise."""
    if not quiet:
        yield
        return
    before = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(before)


def init_distributed(tp: int = 1, pp: int = 1, *, timeout_s: float = 1800.0) -> ParallelContext:
    """This rank's ParallelContext: joins the launcher's process group (once) and builds the groups.

    Without a launcher environment it is the single-process context (then tp * pp must be 1).
    """
    import torch
    import torch.distributed as dist

    check_layout(tp, pp)
    if not under_launcher() or (int(os.environ["WORLD_SIZE"]) == 1 and tp * pp == 1):
        if tp * pp != 1:
            raise LayoutError(f"--tp {tp} --pp {pp} needs {tp * pp} processes: add --nproc {tp * pp} "
                              f"or start with torchrun")
        return ParallelContext.single()
    if not dist.is_initialized():
        check_layout(tp, pp, world=int(os.environ["WORLD_SIZE"]))
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


def device_for(ctx: ParallelContext) -> "torch.device":
    """The device of this rank: cuda:LOCAL_RANK under a launcher with CUDA, else cpu."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def shutdown() -> None:
    """Leave the process group cleanly at the end of a stage (no-op when single-process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
