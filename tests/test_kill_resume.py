"""SIGKILL at random moments of `llamactl pretrain` (1 process and --tp 2 --nproc 2), then --resume, until the
run finishes: the loss curve in metrics.jsonl must equal the uninterrupted run's bit for bit, every time.

Kill moments come from a seeded RNG: during start-up or resume (loading, truncating metrics), at a random
time after training got going (inside a step, a save, the rename, the `latest` update, the pruning of old
checkpoints), and exactly between a checkpoint's rename and the `latest` update
(LLAMACTL_FAULT_AFTER_PUBLISH, the window that used to make a run impossible to resume). A kill takes the
whole process tree (launcher, torchrun, ranks), as a node failure would.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llamactl import checkpoint

STEPS = 10
KILLS = {"1": 12, "tp2": 8}  # at least 20 kills in all
LAYOUT_ARGS = {"1": [], "tp2": ["--tp", "2", "--nproc", "2"]}
ARGS = ["--size", "tiny", "--steps", str(STEPS), "--seq-len", "16", "--batch-tokens", "64", "--micro-batch", "4",
        "--save-every", "1", "--eval-tokens", "0", "--peak-flops", "1e11", "--lr", "3e-3", "--warmup", "2"]
MODEL_TOML = "[model]\ndim = 32\nn_layers = 2\nn_heads = 4\nn_kv_heads = 2\nmultiple_of = 16\n"
LAUNCH_TIMEOUT = 180


@pytest.fixture(scope="module")
def setup(tiny_corpus, tiny_tokenizer, tmp_path_factory) -> tuple[Path, Path]:
    """(token data, config file of a dim-32 2-layer model)."""
    from llamactl.data import prepare

    root = tmp_path_factory.mktemp("kill")
    src = root / "text.txt"
    src.write_text("\n\n".join(tiny_corpus.read_text().split("\n\n")[:300]))
    prepare([src], tiny_tokenizer, root / "data", val_fraction=0.05, workers=1, show_progress=False)
    (root / "model.toml").write_text(MODEL_TOML)
    return root / "data", root / "model.toml"


def _cmd(setup, run: Path, layout: str, resume: bool) -> list[str]:
    data, toml = setup
    return [sys.executable, "-m", "llamactl", "pretrain", "--data", str(data), "--out", str(run), "--config", str(toml),
            *ARGS, *LAYOUT_ARGS[layout], *(["--resume"] if resume else [])]


def _launch(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    e = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200", **(env or {}))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=e,
                            start_new_session=True)


def _processes_of(root_pid: int, run: Path) -> set[int]:
    """root_pid's descendants, and any process whose command line names the run dir (re-parented ranks)."""
    children: dict[int, list[int]] = {}
    named = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            cmdline = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(d))
        if str(run) in cmdline and int(d) != os.getpid():
            named.add(int(d))
    out, todo = set(), [root_pid]
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo += children.get(p, [])
    return out | named


def _kill_tree(p: subprocess.Popen, run: Path) -> None:
    """SIGKILL the launcher and everything it started, and wait until none of it is left."""
    for _ in range(100):
        pids = _processes_of(p.pid, run) if p.poll() is None else _processes_of(p.pid, run) - {p.pid}
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.poll()
        time.sleep(0.05)
    else:
        raise AssertionError(f"processes of {run} survive SIGKILL")
    p.communicate(timeout=30)


def _rows(run: Path) -> list[dict]:
    """metrics.jsonl rows of training steps (a torn last line of a killed process is not a row)."""
    out = []
    path = run / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if row.get("split", "train") == "train":
            out.append(row)
    return out


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in _rows(run)]


@pytest.fixture(scope="module")
def references(setup, tmp_path_factory) -> dict[str, tuple[Path, list, float, float]]:
    """Per layout: the uninterrupted run, its curve, its wall time and the time to its first metrics row."""
    out = {}
    for layout in LAYOUT_ARGS:
        run = tmp_path_factory.mktemp("ref") / layout
        t0 = time.monotonic()
        p = _launch(_cmd(setup, run, layout, resume=False))
        first = None
        while p.poll() is None:
            if first is None and _rows(run):
                first = time.monotonic() - t0
            time.sleep(0.02)
        log = p.communicate()[0]
        assert p.returncode == 0, log
        total = time.monotonic() - t0
        curve = _losses(run)
        assert [s for s, _ in curve] == list(range(1, STEPS + 1)), log
        out[layout] = (run, curve, total, first or total)
    return out


def _one_launch(setup, run: Path, layout: str, rng: random.Random, start_up: float,
                kill: bool = True) -> tuple[bool, bool, str]:
    """Launch (resuming when a checkpoint exists) and kill it at a random moment: (killed, finished, log)."""
    ckpt = checkpoint.latest(run)
    done_step = int(ckpt.name.split("-")[1]) if ckpt is not None else 0
    env, kill_at = {}, None
    mode = rng.random() if kill else None
    if mode is None:
        pass
    elif mode < 0.3 and done_step < STEPS:
        env["LLAMACTL_FAULT_AFTER_PUBLISH"] = str(rng.randint(done_step + 1, min(done_step + 2, STEPS)))
    elif mode < 0.45:
        kill_at = ("start", rng.uniform(0.2, 1.0) * start_up)
    else:
        kill_at = ("running", rng.uniform(0.0, 0.4))
    p = _launch(_cmd(setup, run, layout, resume=ckpt is not None), env)
    t0 = time.monotonic()
    progressed_at = None
    while p.poll() is None:
        now = time.monotonic()
        if now - t0 > LAUNCH_TIMEOUT:
            _kill_tree(p, run)
            raise AssertionError(f"launch in {run} did not finish in {LAUNCH_TIMEOUT} s")
        if kill_at is not None:
            if kill_at[0] == "start" and now - t0 >= kill_at[1]:
                break
            if kill_at[0] == "running":
                if progressed_at is None and any(r["step"] > done_step for r in _rows(run)):
                    progressed_at = now
                if progressed_at is not None and now - progressed_at >= kill_at[1]:
                    break
        time.sleep(0.01)
    if p.poll() is None:
        _kill_tree(p, run)
        return True, False, f"killed by the test ({kill_at[0]})"
    log = p.communicate()[0]
    _kill_tree(p, run)  # ranks a failed launcher left behind, if any
    if p.returncode == 0:
        return False, True, log
    assert env, f"exit {p.returncode} without a kill:\n{log}"
    return True, False, log


@pytest.mark.parametrize("layout", list(LAYOUT_ARGS))
def test_random_kills_resume_to_the_same_curve(setup, references, layout, tmp_path):
    _, want, _, start_up = references[layout]
    rng = random.Random(1234 + len(layout))
    kills, runs, total, t0 = 0, 0, 0, time.monotonic()
    while kills < KILLS[layout]:
        run = tmp_path / f"run{runs}"
        runs += 1
        launches, log = 0, ""
        while True:
            killed, finished, log = _one_launch(setup, run, layout, rng, start_up, kill=kills < KILLS[layout])
            kills += killed
            launches += 1
            total += 1
            assert launches <= 4 * STEPS + 10, f"no progress in {run}: {log}"
            if finished:
                break
            # every resume point: the curve up to the newest complete checkpoint is the reference's
            ckpt = checkpoint.latest(run)
            done = int(ckpt.name.split("-")[1]) if ckpt is not None else 0
            assert _losses(run)[:done] == want[:done], (run, launches, log)
        got = _losses(run)
        assert got == want, (run, launches, got, want, log)  # exact float equality, every step once
        assert checkpoint.latest(run).name == f"step-{STEPS:06d}"
        assert checkpoint.verify(checkpoint.latest(run)) == []
    print(f"{layout}: {kills} kills, {total} launches, {runs} runs, {time.monotonic() - t0:.0f} s")


def test_stale_latest_after_deleting_the_last_step(setup, references, tmp_path):
    """Issue 13's reproduction: from a finished run, delete its last step and point `latest` at the one
    before the previous; --resume continues from the newest complete step and ends on the same curve."""
    ref, want, _, _ = references["1"]
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    shutil.rmtree(run / f"step-{STEPS:06d}")
    (run / "latest").write_text(f"step-{STEPS - 2:06d}\n")
    (run / f".step-{STEPS:06d}.tmp-killed").mkdir()  # and what a kill during that save would have left
    newest = (run / f"step-{STEPS - 1:06d}").stat().st_ino
    p = _launch(_cmd(setup, run, "1", resume=True))
    log = p.communicate(timeout=LAUNCH_TIMEOUT)[0]
    assert p.returncode == 0, log
    # resumed from the newest complete checkpoint, not from `latest`: that step was not computed again
    assert (run / f"step-{STEPS - 1:06d}").stat().st_ino == newest
    assert _losses(run) == want
    assert (run / "latest").read_text().strip() == f"step-{STEPS:06d}"
    assert not list(run.glob(".step-*"))  # the leftover went with the run's next save
