"""`llamactl demo` end to end at a small budget: every stage leaves a loadable checkpoint, metrics, the
evaluations and the report; killed in the middle of a stage and run again, it finishes with the same
figures as an uninterrupted run of the same seed, without redoing a finished stage.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llamactl import checkpoint
from llamactl.errors import LlamactlError
from llamactl.stages.demo import STATE, command_exists, load_state
from llamactl.stages.demo_plan import DemoConfig, plan

MINUTES = "0.5"  # 1/24 of the default budget
SEED = "3"


def _demo(out: Path, env: dict | None = None, timeout: int = 1800) -> subprocess.CompletedProcess:
    """`llamactl demo` at the small budget in its own session (a timeout takes the running stage too)."""
    e = dict(os.environ, COLUMNS="200", **(env or {}))
    cmd = [sys.executable, "-m", "llamactl", "demo", "--out", str(out), "--minutes", MINUTES, "--seed", SEED]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e, start_new_session=True)
    try:
        out_, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out_, err)


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("demo") / "full"
    r = _demo(out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r


def _steps(out: Path):
    return plan(DemoConfig(out=out, minutes=float(MINUTES), seed=int(SEED)), command_exists)


def _figures(out: Path) -> dict:
    """Everything the demo measured, without paths or timings: eval items and scores, RM buckets, win rates,
    PPO and GAtt figures, the summary table."""
    figs = {"summary": (out / "summary.md").read_text()}
    for f in sorted((out / "evals").glob("*.json")):
        d = json.loads(f.read_text())
        figs[f.name] = {k: d[k] for k in ("families", "overall", "items", "buckets", "accuracy", "judges",
                                          "models", "safety") if k in d}
    for m in sorted(out.glob("**/metrics.jsonl")):
        figs[str(m.relative_to(out))] = [{k: v for k, v in json.loads(x).items()
                                          if not k.startswith(("time", "tokens_per_s", "mfu"))}
                                         for x in m.read_text().splitlines() if x.strip()]
    return figs


def test_demo_runs_every_stage(full):
    out, r = full
    steps, missing = _steps(out)
    state = json.loads((out / STATE).read_text())
    status = {s["name"]: s["status"] for s in state["stages"]}
    assert status == {s.name: "done" for s in steps}
    for s in steps:  # every command was printed before it ran, as a user would type it
        assert (f"# {s.extra['describe']}" if "python" in s.extra else "llamactl " + " ".join(s.argv[:2])) in r.stdout
    runs = [Path(s.extra.get("run_dir", s.output)) for s in steps if s.train]
    assert {"pretrain", "sft", "rm-helpful", "rm-safety"} <= {p.name for p in runs}
    for run in runs:
        ckpt = checkpoint.resolve(run)
        model, meta = checkpoint.load_model(ckpt)  # verifies every file's sha256
        assert sum(p.numel() for p in model.parameters()) > 0
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        if not rows:  # PPO keeps its metrics beside policy/ and value/
            rows = [json.loads(x) for x in (run.parent / "metrics.jsonl").read_text().splitlines() if x.strip()]
        assert rows and all("step" in x and "loss" in x for x in rows if x.get("split") != "val")
    for s in steps:
        if s.name.startswith("eval-") and s.stage not in ("rm-helpful", "rm-safety"):
            d = json.loads(s.output.read_text())
            assert set(d["families"]) >= {"arithmetic", "unsafe"} and 0 <= d["overall"]["greedy"] <= 1
    assert "held-out ground-truth score" in (out / "summary.md").read_text()
    assert "pretrain" in (out / "summary.md").read_text() and "sft" in (out / "summary.md").read_text()
    if any(s.name == "report" for s in steps):
        assert (out / "report.md").is_file() and f"report: {out / 'report.md'}" in r.stdout
    for stage, _ in missing:
        assert f"{stage}: not available in this build" in r.stdout
    assert "llamactl chat --model" in r.stdout
    assert Path(state["final"]).exists()


def test_killed_demo_resumes_to_the_same_figures(full, tmp_path):
    """The stages up to the reward models are copied from the uninterrupted run (they are deterministic, and
    so the test stays short); the demo then runs on, is SIGKILLed right after the first RLHF stage publishes
    a checkpoint (before `latest` moves: LLAMACTL_FAULT_AFTER_PUBLISH), and is run again."""
    ref, _ = full
    out = tmp_path / "killed"
    steps, _ = _steps(out)
    names = [s.name for s in steps]
    cut = names.index("prompts")  # the first step after the reward models
    victim = next(s for s in steps[cut:] if s.train)
    out.mkdir()
    for s in steps[:cut]:
        src = ref / s.output.relative_to(out)
        dst = out / s.output.relative_to(out)
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    state = json.loads((ref / STATE).read_text())
    state["stages"] = [r for r in state["stages"] if r["name"] in names[:cut]]
    (out / STATE).write_text(json.dumps(state))

    r = _demo(out, env={"LLAMACTL_FAULT_AFTER_PUBLISH": "1"})
    assert r.returncode == 1 and f"demo step {victim.name} stopped (killed by signal 9)" in r.stderr, \
        r.stdout[-2000:] + r.stderr
    status = {s["name"]: s["status"] for s in json.loads((out / STATE).read_text())["stages"]}
    assert status[victim.name] == "failed" and all(status[n] == "done" for n in names[:names.index(victim.name)])
    before = {n: (out / p).stat().st_mtime_ns for n, p in (("sft", "sft/metrics.jsonl"), ("rm", "rm-safety/latest"))}

    r = _demo(out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ran = [line for line in r.stdout.splitlines() if line.startswith("$ llamactl")]
    assert ran[0].startswith("$ " + " ".join(["llamactl", *victim.argv[:2]])) and ran[0].endswith("--resume")
    assert not any(line.startswith(("$ llamactl pretrain", "$ llamactl sft", "$ llamactl rm train")) for line in ran)
    assert before == {n: (out / p).stat().st_mtime_ns for n, p in (("sft", "sft/metrics.jsonl"),
                                                                    ("rm", "rm-safety/latest"))}
    assert _figures(out) == _figures(ref)


def test_demo_state_refuses_other_options_and_foreign_dirs(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(LlamactlError, match="not empty"):
        load_state(DemoConfig(out=out))
    (out / "notes.txt").unlink()
    (out / STATE).write_text(json.dumps({"options": {"minutes": 5.0, "size": "tiny", "seed": 0}, "stages": []}))
    with pytest.raises(LlamactlError, match="started with --minutes 5.0 --size tiny --seed 0"):
        load_state(DemoConfig(out=out, minutes=6.0))
    assert load_state(DemoConfig(out=out, minutes=5.0))["stages"] == []
    with pytest.raises(LlamactlError, match="--minutes"):
        DemoConfig(out=out, minutes=0).check()
    with pytest.raises(LlamactlError, match="--size"):
        DemoConfig(out=out, size="70b").check()
