"""Launching: the one layout check, and how the failures of ranks started by --nproc become one line.

The end-to-end runs (a corrupt shard under `generate --tp 2 --nproc 2`, nothing to resume at tp 2) are in
tests/test_cli_errors.py; here the pieces: check_layout, the per-rank report files, the choice of line.
"""
from __future__ import annotations

import os
import signal

import pytest

from llamactl.parallel.context import LayoutError, ParallelContext, check_layout
from llamactl.parallel.launch import (RANK_ERRORS_ENV, LaunchConfig, init_distributed, maybe_relaunch,
                                      read_rank_errors, report_rank_error, summarize_failures, validate_world)


# ---- check_layout: every layout number, one place ----------------------------------------------------
@pytest.mark.parametrize("flag,kwargs", [("--tp", dict(tp=0)), ("--tp", dict(tp=-2)), ("--pp", dict(pp=0)),
                                         ("--nproc", dict(nproc=0)), ("--nproc", dict(nproc=-1)),
                                         ("--nnodes", dict(nproc=2, nnodes=0))])
def test_layout_numbers_below_one_name_the_flag(flag, kwargs):
    value = next(iter(kwargs.values())) if flag != "--nnodes" else 0
    with pytest.raises(LayoutError) as e:
        check_layout(**kwargs)
    msg = str(e.value)
    assert msg.startswith(f"{flag} {value} ") and msg.endswith(f"({flag})") and "\n" not in msg


def test_layout_divisibility_and_dp():
    assert check_layout(2, 3) == 1                                   # world unknown: numbers only
    assert check_layout(2, 2, nproc=8) == 2
    assert check_layout(2, 2, nproc=4, nnodes=3) == 3
    assert check_layout(3, 1, world=9) == 3
    with pytest.raises(LayoutError, match=r"--tp 4 x --pp 1 = 4 does not divide the 6 processes \(--nproc 6\)"):
        check_layout(4, 1, nproc=6)
    with pytest.raises(LayoutError, match=r"does not divide the 10 processes \(--nproc 5 x --nnodes 2\)"):
        check_layout(2, 2, nproc=5, nnodes=2)
    with pytest.raises(LayoutError, match="does not divide the world of 6 processes"):
        check_layout(2, 2, world=6)
    with pytest.raises(LayoutError, match=r"\(--tp\)"):
        check_layout(True)                                           # not a number of processes


def test_every_entry_point_uses_the_check():
    """--tp 0 gave ZeroDivisionError (issue 13, item 7): each place that takes a layout refuses it by name."""
    for call in (lambda: ParallelContext(tp=0).validate(4, 2, 4, 2048, 352),
                 lambda: ParallelContext(pp=0).validate(4, 2, 4, 2048, 352),
                 lambda: ParallelContext.from_world(0, 1),
                 lambda: init_distributed(0, 1),
                 lambda: validate_world(0, 1, LaunchConfig(nproc=2)),
                 lambda: validate_world(1, 1, LaunchConfig(nproc=2, nnodes=0)),
                 lambda: maybe_relaunch(0, 1, LaunchConfig())):
        with pytest.raises(LayoutError, match=r"it must be at least 1 \(--(tp|pp|nnodes)\)"):
            call()
    assert validate_world(2, 1, LaunchConfig(nproc=2, nnodes=2, node_rank=1)) == 2
    with pytest.raises(LayoutError, match="--node-rank 2 must be in 0..1"):
        validate_world(1, 1, LaunchConfig(nproc=2, nnodes=2, node_rank=2))
    with pytest.raises(LayoutError, match=r"--master-port 70000 is not a TCP port.*\(--master-port\)"):
        validate_world(1, 1, LaunchConfig(nproc=2, nnodes=2, master_addr="10.0.0.1", master_port=70000))


# ---- one line for failed ranks ------------------------------------------------------------------------
def test_ranks_leave_their_line_for_the_launcher(tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", RANK_ERRORS_ENV):
        monkeypatch.delenv(k, raising=False)
    assert not report_rank_error("x", 1, user=True)                  # a plain process prints it itself
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert not report_rank_error("x", 1, user=True)                  # torchrun started by hand: each rank prints
    monkeypatch.setenv(RANK_ERRORS_ENV, str(tmp_path))
    assert report_rank_error("shard is corrupt (a.bin)", 1, user=True)
    monkeypatch.setenv("RANK", "11")
    assert report_rank_error("RuntimeError: Connection closed by peer", 1, user=False)
    assert read_rank_errors(tmp_path) == {
        3: {"message": "shard is corrupt (a.bin)", "exit_code": 1, "user": True},
        11: {"message": "RuntimeError: Connection closed by peer", "exit_code": 1, "user": False}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank-000003.json", "rank-000011.json"]  # no .tmp left
    monkeypatch.setenv(RANK_ERRORS_ENV, str(tmp_path / "gone"))
    assert not report_rank_error("x", 1, user=True)                  # cannot leave it: the rank prints it


def _report(message, user=True, code=1):
    return {"message": message, "exit_code": code, "user": user}


def test_one_line_for_failed_ranks():
    same = "nothing to resume: no complete checkpoint in r (--resume, --out)"
    # every rank said the same: once, without a rank
    assert summarize_failures({0: -15, 1: 1}, {0: _report(same), 1: _report(same)}, root=1) == (same, 1)
    assert summarize_failures({0: -15, 1: 1}, {1: _report(same)}, root=1) == (same, 1)
    # the user error wins over what it caused on the other ranks, whatever failed first
    line, code = summarize_failures({0: 1, 1: 3}, {0: _report("RuntimeError: Connection reset", user=False),
                                                   1: _report("shard is corrupt (b.bin)", code=3)}, root=0)
    assert (line, code) == ("shard is corrupt (b.bin)", 3)
    # ranks disagree: the lowest rank's line, naming it
    line, _ = summarize_failures({2: 1, 3: 1}, {3: _report("bad shard (c.bin)"), 2: _report("bad shard (d.bin)")},
                                 root=3)
    assert line == "bad shard (d.bin) (rank 2)"
    # no user error: the first rank that failed, not the ones that lost their peer after it
    line, _ = summarize_failures({0: 1, 1: 1}, {0: _report("RuntimeError: Connection closed by peer", user=False),
                                               1: _report("KeyError: 'w1'", user=False)}, root=1)
    assert line == "KeyError: 'w1' (rank 1)"
    # nothing reported: a rank killed by a signal is named; a code of the rank's own is passed on silently
    assert summarize_failures({0: -9, 1: -15}, {}, root=0) == ("rank 0 was killed by SIGKILL", 128 + signal.SIGKILL)
    assert summarize_failures({0: 1, 1: -9}, {0: _report("RuntimeError: Connection reset", user=False)},
                              root=1) == ("rank 1 was killed by SIGKILL", 137)
    assert summarize_failures({1: 143}, {}, root=1) == (None, 143)
    assert summarize_failures({1: 75}, {}, root=1) == (None, 75)



# ---- signals through the launcher ---------------------------------------------------------------------
def _pretrain_tp2(data, run, steps):
    import sys

    return [sys.executable, "-m", "llamactl", "pretrain", "--data", str(data), "--out", str(run), "--size", "tiny",
            "--steps", str(steps), "--seq-len", "32", "--batch-tokens", "128", "--micro-batch", "4",
            "--eval-tokens", "0", "--warmup", "0", "--peak-flops", "1e11", "--save-every", "100000",
            "--tp", "2", "--nproc", "2"]


def test_sigterm_to_the_launcher_stops_the_ranks_with_143(tiny_data, tmp_path):
    """The launcher passes SIGTERM on to the ranks, which save and stop; it exits 143 with no error line."""
    import json
    import subprocess
    import time

    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    p = subprocess.Popen(_pretrain_tp2(tiny_data, run, 10000), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if (run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2:
            break
        time.sleep(0.5)
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=240)
    assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "error:" not in err, err[-3000:]
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert (run / "latest").read_text().strip() == f"step-{steps[-1]:06d}"   # saved the step it stopped after


def test_a_killed_rank_is_named_once(tiny_data, tmp_path):
    """A rank killed outright (the OOM killer, say) leaves no line of its own: the launcher names it, once."""
    import re
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", LLAMACTL_FAULT_AT_STEP="1",
               LLAMACTL_FAULT_SIGNAL="KILL")
    p = subprocess.run(_pretrain_tp2(tiny_data, tmp_path / "run", 3), capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 128 + signal.SIGKILL, p.stderr[-3000:]
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and re.fullmatch(r"error: rank [01] was killed by SIGKILL", errors[0]), p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "ChildFailedError" not in p.stderr, p.stderr[-3000:]
