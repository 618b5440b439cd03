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

MINUTES = "0.15"  # 1/80 of the default budget (scale 0.042)
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


def _scrub(x):
    """A result without its timings (the one thing two runs of the same seed may differ in)."""
    if isinstance(x, dict):
        return {k: _scrub(v) for k, v in x.items() if not k.startswith(("time", "mfu")) and not k.endswith("_per_s")}
    if isinstance(x, list):
        return [_scrub(v) for v in x]
    return x


def _figures(out: Path, copied_from: Path | None = None) -> dict:
    """Everything the demo measured: every evaluation's JSON, every metrics.jsonl, the summary table (the
    demo directory's path, and that of the demo its first stages were copied from, written as DEMO)."""
    def read(path):
        text = path.read_text().replace(str(out), "DEMO")
        return text.replace(str(copied_from), "DEMO") if copied_from else text

    figs = {"summary": read(out / "summary.md")}
    for f in sorted((out / "evals").glob("*.json")):
        figs[f.name] = _scrub(json.loads(read(f)))
    for m in sorted(out.glob("**/metrics.jsonl")):
        figs[str(m.relative_to(out))] = _scrub([json.loads(x) for x in read(m).splitlines() if x.strip()])
    return figs


def test_demo_runs_every_stage(full):
    out, r = full
    steps, missing = _steps(out)
    state = json.loads((out / STATE).read_text())
    status = {s["name"]: s["status"] for s in state["stages"]}
    assert status == {s.name: "done" for s in steps}
    for s in steps:  # every command was printed before it ran, as a user would type it
        assert (f"# {s.extra['describe']}" if "python" in s.extra else "llamactl " + " ".join(s.argv[:2])) in r.stdout
    # the model each training stage leaves (PPO: ppo/policy; rejection sampling: the SFT run on its pool)
    runs = [s.output if s.output.is_dir() else s.extra["run_dir"] for s in steps if s.train]
    assert {"pretrain", "sft", "rm-helpful", "rm-safety"} <= {p.name for p in runs}
    for run in runs:
        model, meta = checkpoint.load_model(checkpoint.resolve(run))  # verifies every file's sha256
        assert sum(p.numel() for p in model.parameters()) > 0
        metrics = next(m for m in (run / "metrics.jsonl", run.parent / "metrics.jsonl") if m.is_file())  # PPO: beside policy/
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        assert rows and all("step" in x and "loss" in x for x in rows if x.get("split") != "val")
    for s in steps:
        if s.argv[:2] == ["eval", "tasks"]:
            d = json.loads(s.output.read_text())
            assert set(d["families"]) >= {"arithmetic", "unsafe"} and 0 <= d["overall"]["greedy"] <= 1
    assert "Held-out ground-truth score" in (out / "summary.md").read_text()
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
    for s in steps[:cut]:  # a stage's directory (suite/, sft/, ...), or its file in evals/ or prefs/
        rel = s.output.relative_to(out)
        rel = rel if rel.parts[0] in ("evals", "prefs") else Path(rel.parts[0])
        if not (out / rel).exists():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if (ref / rel).is_dir() else shutil.copy2)(ref / rel, out / rel)
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
    assert _figures(out, copied_from=ref) == _figures(ref)


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


def test_val_prompts_are_train_prompts_outside_the_rl_set(tmp_path):
    """PPO's held-out prompts (early stopping) come from the train split and skip every RL prompt's text, so
    picking the best iteration never looks at the held-out prompts the demo's table scores."""
    from llamactl.stages.demo_later import subset_prompts

    rows = [{"family": f, "prompt": f"{f} {i % 5}"} for f in ("a", "b") for i in range(12)]  # each text twice or more
    src, rl, val = tmp_path / "train.jsonl", tmp_path / "rl.jsonl", tmp_path / "val.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    subset_prompts(src, rl, 3)
    subset_prompts(src, val, 2, exclude=rl)
    got = lambda p: [json.loads(x)["prompt"] for x in p.read_text().splitlines()]  # noqa: E731
    assert got(rl) == ["a 0", "a 1", "a 2", "b 0", "b 1", "b 2"]  # distinct texts, the first of each family
    assert got(val) == ["a 3", "a 4", "b 3", "b 4"]
    names = {s.name: s for s in _steps(tmp_path / "d")[0]}
    fn, args = names["prompts-val"].extra["python"]
    assert fn is subset_prompts and args[0].name == "prompts.train.jsonl" and args[3] == names["prompts"].output


def test_change_interval_is_a_paired_bootstrap_over_families():
    from llamactl.stages.demo_table import change_interval

    def ev(scores):  # {family: [greedy scores]}
        return {"items": [{"family": f, "greedy_score": x} for f, xs in scores.items() for x in xs]}

    zeros, ones = ev({"a": [0.0] * 5, "b": [0.0] * 3}), ev({"a": [1.0] * 5, "b": [1.0] * 3})
    assert change_interval(zeros, zeros) == "+0.000 (+0.000, +0.000)"
    assert change_interval(zeros, ones) == "+1.000 (+1.000, +1.000)"
    # family a gains 2 of 4 prompts, family b loses none: the overall is the mean of families, +0.25
    got = change_interval(ev({"a": [0, 0, 0, 0], "b": [1, 1]}), ev({"a": [1, 1, 0, 0], "b": [1, 1]}))
    point, low, high = float(got.split()[0]), *map(float, got.split("(")[1].rstrip(")").split(","))
    assert point == 0.25 and 0.0 <= low < point < high <= 0.5
    assert change_interval(zeros, ev({"a": [1.0] * 5})) == "-"  # not the same prompts: no paired interval
