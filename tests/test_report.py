"""`llamactl report` (llamactl/report.py): a synthetic demo directory with every section, single run dirs of
each stage, matplotlib missing, the compare-to-stage-row arithmetic, and the errors. Files written by hand."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

FAMS = ("arithmetic", "copy", "unsafe")


def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _run_dir(path: Path, stage: str, steps: int, *, val_every: int = 0, extra=None) -> list[dict]:
    rows = []
    for s in range(1, steps + 1):
        rows.append({"step": s, "split": "train", "loss": 5.0 / s, "lr": 1e-3, "grad_norm": 1.0, "tokens": 64 * s,
                     "tokens_per_s": 100.0, **(extra(s) if extra else {})})
        if val_every and s % val_every == 0:
            rows.append({"step": s, "split": "val", "loss": 6.0 / s, "tokens": 64 * s})
    _jsonl(path / "metrics.jsonl", rows)
    (path / "config.toml").write_text(f'[{stage}]\nout = "{path}"\n\n[model]\ndim = 32\n\n[parallel]\ntp = 1\n')
    return rows


def _eval_tasks(scores: dict[str, float]) -> dict:
    fams = {f: {"prompts": 10, "safety": f == "unsafe", "greedy": v, "sampled": v / 2} for f, v in scores.items()}
    return {"families": fams, "overall": {"prompts": 30, "greedy": sum(scores.values()) / len(scores),
                                          "sampled": sum(scores.values()) / len(scores) / 2},
            "samples": 2, "temperature": 0.7, "items": []}


def _compare(a: str, b: str, rm_help: tuple, rm_safe: tuple, gt=None) -> dict:
    def kind(w):
        return {"win": w[0], "tie": w[1], "loss": w[2], "prompts": 10, "mean_a": 0.5, "mean_b": 0.4}

    d = {"a": a, "b": b, "prompts": 20,
         "judges": {"reward_model": {"helpfulness": kind(rm_help), "safety": kind(rm_safe)},
                    "ground_truth": None if gt is None else {"helpfulness": kind(gt), "safety": None}}}
    if gt is None:
        d["ground_truth_absent"] = "prompts without task fields"
    return d


GATT = {"turns": [1, 2, 3, 4, 5, 6], "constraints": 4, "dialogues": 8,
        "models": {"sft": {"adherence": [0.9, 0.6, 0.4, 0.3, 0.2, None], "mean_turn_5_plus": 0.2},
                   "gatt": {"adherence": [1.0, 0.9, 0.9, 0.8, 0.8, 0.75], "mean_turn_5_plus": 0.775}}}
RS = {"iterations": [{"iteration": i, "k": 4, "n": [1, 2, 3, 4], "max": [0.3 + i / 10, 0.4, 0.5, 0.6 + i / 10],
                      "median": [0.3, 0.32, 0.33, 0.34], "temperatures": {"0.7": 0.4, "1.0": 0.45},
                      "pool_size": 20, "pool_mean_reward": 0.5 + i / 10} for i in (1, 2)]}


def _ppo_row(s):
    return {"value_loss": 0.1, "reward_helpful": 0.4 + s / 100, "reward_safety": 0.7, "reward_combined": 0.45 + s / 100,
            "reward_whitened": 0.0, "kl": s / 50, "entropy": 2.0, "clip_frac": 0.1, "approx_kl": 0.01,
            "explained_var": 0.3, "response_len": 12.0, "truncated_frac": 0.0}


@pytest.fixture
def demo(tmp_path) -> Path:
    d = tmp_path / "demo"
    _run_dir(d / "pretrain", "pretrain", 12, val_every=4)
    _run_dir(d / "sft", "sft", 8, val_every=4)
    _run_dir(d / "rm-helpful", "reward", 5, extra=lambda s: {"accuracy": 0.5 + s / 20})
    _run_dir(d / "rs" / "sft", "sft", 4)
    _json(d / "rs" / "rs.json", RS)
    rows = _run_dir(d / "ppo", "ppo", 30, extra=_ppo_row)
    with (d / "ppo" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 30, "split": "val", "reward_combined": 0.8, "reward_helpful": 0.7,
                            "reward_safety": 0.9, "kl": 0.5}) + "\n")
    assert rows
    _run_dir(d / "gatt", "sft", 3)
    ev = d / "evals"
    for stage, base in (("pretrain", 0.1), ("sft", 0.5), ("rs", 0.6), ("ppo", 0.7)):
        _json(ev / f"{stage}.json", _eval_tasks({f: base + i / 100 for i, f in enumerate(FAMS)}))
    _json(ev / "compare-pretrain-vs-sft.json", _compare(str(d / "sft" / "step-000008"), str(d / "pretrain"),
                                                        (0.7, 0.1, 0.2), (0.6, 0.3, 0.1), gt=(0.8, 0.2, 0.0)))
    # A is the older model here: the rs row must show B's (rs's) share, i.e. A's loss
    _json(ev / "compare-sft-vs-rs.json", _compare(str(d / "sft"), str(d / "rs" / "sft" / "latest"),
                                                  (0.25, 0.1, 0.65), (0.3, 0.3, 0.4)))
    _json(ev / "rm-helpful.json", {"pairs": 40, "accuracy": 0.75, "unrated": 0, "mean_margin": 1.0, "kind": "helpfulness",
                                   "buckets": {"significantly_better": {"pairs": 10, "accuracy": 0.9},
                                               "better": {"pairs": 10, "accuracy": 0.8},
                                               "slightly_better": {"pairs": 10, "accuracy": 0.7},
                                               "negligibly_better": {"pairs": 10, "accuracy": 0.6}}})
    _json(ev / "gatt-eval.json", GATT)
    _json(d / "demo.json", {"stages": [{"name": "pretrain", "command": "llamactl pretrain --out x", "status": "done",
                                        "seconds": 12.5}, {"name": "sft", "command": "llamactl sft", "status": "done",
                                                           "seconds": 7.5}]})
    return d


def _main(*args) -> int:
    from llamactl.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return 0


def _table(md: str, header_start: str) -> list[list[str]]:
    """Rows (cells) of the first markdown table whose header line starts with header_start (or, for a
    "**title", the table under that title)."""
    lines = md.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(header_start))
    if header_start.startswith("**"):
        i += 2
    out = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        out.append([c.strip() for c in line.strip("|").split(" | ")])
    return [lines[i].strip("| ").split(" | ")] + out


SECTIONS = ("Held-out ground-truth score per stage", "Model-based evaluation", "Loss curves", "Reward models",
            "Rejection sampling", "PPO", "Ghost Attention", "Demo stages")


def test_demo_directory_has_every_section(demo, capsys):
    assert _main("report", demo) == 0
    md = (demo / "report.md").read_text()
    for title in SECTIONS:
        assert f"## {title}" in md
    stage = _table(md, "| stage | arithmetic")
    head, rows = stage[0], {r[0]: dict(zip(stage[0], r)) for r in stage[1:]}
    assert [r[0] for r in stage[1:]] == ["pretrain", "sft", "rs", "ppo"]
    assert rows["sft"]["copy"] == "0.510" and rows["ppo"]["overall"] == f"{(0.7 + 0.71 + 0.72) / 3:.3f}"
    assert rows["sft"]["RM win help."] == "70.0 %" and rows["sft"]["RM win safe."] == "60.0 %"
    assert rows["sft"]["GT win help."] == "80.0 %" and rows["sft"]["GT win safe."] == "-" and rows["sft"]["vs"] == "pretrain"
    assert rows["rs"]["RM win help."] == "65.0 %" and rows["rs"]["RM win safe."] == "40.0 %" and rows["rs"]["vs"] == "sft"
    assert rows["pretrain"]["RM win help."] == "-" and "overall sampled" in head
    runs = _table(md, "| run |")
    assert [r[0] for r in runs[1:]] == ["pretrain", "sft", "rm-helpful", "rs/sft", "ppo", "gatt"]
    assert runs[2][1:] == ["sft", "8", "512", "5.0000", "0.6250", "0.7500", "0.7500"]
    # every referenced plot exists, one per figure kind
    pngs = re.findall(r"!\[[^\]]*\]\((plots/[^)]+)\)", md)
    assert all((demo / p).is_file() and (demo / p).stat().st_size > 0 for p in pngs)
    names = {Path(p).name for p in pngs}
    assert {"loss-pretrain.png", "loss-rs_sft.png", "rm-buckets.png", "rs-best-of-n-rs.png", "rs-temperature-rs.png",
            "ppo-reward-ppo.png", "ppo-kl-ppo.png", "gatt-adherence-gatt-eval.png"} <= names
    assert not list(demo.glob(".report.md.tmp*"))
    # tables: RM buckets in rating order, GAtt None shown as "-", RS gain, PPO thinned to 15 rows with the last
    rm = _table(md, "| reward model")
    assert rm[1][:7] == ["rm-helpful", "helpfulness", "90.0 %", "80.0 %", "70.0 %", "60.0 %", "75.0 %"]
    gatt = _table(md, "| turn |")
    assert gatt[6] == ["6", "-", "75.0 %"] and gatt[-1] == ["5+", "20.0 %", "77.5 %"]
    rs = _table(md, "| iteration | K")
    assert rs[2][5] == f"{0.6 + 0.2 - 0.34:.4f}"
    ppo = _table(md, "| iteration | R_c")
    assert len(ppo) - 1 == 15 and ppo[1][0] == "1" and ppo[-1][0] == "30" and ppo[-1][4] == f"{30 / 50:.4f}"
    assert _table(md, "**ppo: held-out prompts")[1] == ["30", "0.8000", "0.7000", "0.9000", "0.5000"]
    cmp = _table(md, "| comparison")
    assert [r[0] for r in cmp[1:]] == ["compare-pretrain-vs-sft", "compare-sft-vs-rs"]
    assert cmp[2][4:6] == ["25 / 10 / 65 (10)", "30 / 30 / 40 (10)"] and cmp[1][6] == "80 / 20 / 0 (10)"
    assert "no ground truth: prompts without task fields" in md
    out = capsys.readouterr().out
    assert f"report: {demo / 'report.md'}" in out and "Held-out ground-truth" in out
    # the terminal: scores turned (a row per family, a column per stage), win rates as their own table
    assert re.search(r"arithmetic\s*│\s*0\.100\s*│\s*0\.500\s*│\s*0\.600\s*│\s*0\.700\s*│", out)
    assert re.search(r"│ sft\s*│\s*70\.0 %\s*│\s*60\.0 %\s*│\s*80\.0 %\s*│\s*-\s*│\s*pretrain\s*│", out)


def test_without_matplotlib_tables_stay(demo, monkeypatch, capsys):
    from llamactl import plots

    assert _main("report", demo, "--out", demo / "with.md") == 0
    with_md = (demo / "with.md").read_text()
    monkeypatch.setattr(plots, "available", lambda: False)
    out = demo / "sub" / "without.md"
    assert _main("report", demo, "--out", out) == 0
    md = out.read_text()
    assert plots.MISSING in md and "![" not in md and not (out.parent / "plots").exists()
    strip = [line for line in with_md.splitlines() if not line.startswith("![")]
    assert [line for line in md.splitlines() if line.startswith("|")] == [x for x in strip if x.startswith("|")]
    assert capsys.readouterr().out.count(plots.MISSING) == 1


def test_single_run_dirs(tmp_path):
    from llamactl.report import build, markdown

    pre = tmp_path / "pre"
    _run_dir(pre, "pretrain", 6, val_every=3)
    md = markdown(build(pre))
    assert "## Loss curves" in md and [s for s in SECTIONS if f"## {s}" in md] == ["Loss curves"]
    row = _table(md, "| run |")[1]
    assert row == ["pre", "pretrain", "6", "384", "5.0000", f"{5 / 6:.4f}", "1.0000", "1.0000"]
    # an RM run dir with its eval JSON kept beside it (--with)
    rm = tmp_path / "rm"
    _run_dir(rm, "reward", 3, extra=lambda s: {"accuracy": 0.6})
    _json(tmp_path / "rm_eval.json", {"pairs": 4, "accuracy": 0.5, "kind": "safety",
                                      "buckets": {"better": {"pairs": 4, "accuracy": 0.5}},
                                      "safety": {"precision": 1.0, "recall": 0.25}})
    md = markdown(build(rm, extra=[tmp_path / "rm_eval.json"]))
    assert _table(md, "| reward model")[1] == ["rm_eval", "safety", "-", "50.0 %", "-", "-", "50.0 %", "4",
                                               "100.0 % / 25.0 %"]
    # an rs run dir: rs.json + its sft/ run; a ppo run dir; a gatt eval file alone
    rs = tmp_path / "rs"
    _json(rs / "rs.json", RS)
    _run_dir(rs / "sft", "sft", 2)
    md = markdown(build(rs))
    assert "## Rejection sampling" in md and "| sft | sft |" in md and "## PPO" not in md
    ppo = tmp_path / "ppo"
    _run_dir(ppo, "ppo", 3, extra=_ppo_row)
    md = markdown(build(ppo))
    assert "## PPO" in md and "## Loss curves" in md and "## Held-out" not in md
    g = tmp_path / "g"
    _json(g / "gatt.json", GATT)
    assert [s.title for s in build(g).sections] == ["Ghost Attention: constraint adherence per turn"]
    # only compare results (no eval tasks): the comparison table, no stage table
    c = tmp_path / "c"
    _json(c / "cmp.json", _compare("x/a", "x/b", (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)))
    assert [s.title.split(" ")[0] for s in build(c).sections] == ["Held-out", "Model-based"]


def test_compare_rows_from_paths_or_file_name():
    from llamactl.report import attach_compare

    labels = ["pretrain", "sft", "rs"]
    d = _compare("/x/sft/step-1", "/x/pretrain", (0.7, 0.1, 0.2), (0.5, 0.0, 0.5))
    assert attach_compare(("whatever", None, d), labels)[0] == "sft"
    # under root only the part below it counts (a demo kept in a folder named like a stage)
    d = _compare("/runs/sft/demo/rs/sft", "/runs/sft/demo/sft", (0.7, 0.1, 0.2), (0.5, 0.0, 0.5))
    assert attach_compare(("x", None, d), labels, Path("/runs/sft/demo"))[0] == "rs"
    # paths that name no stage: the file name decides, compare-<b>-vs-<a> (the demo's naming)
    d = _compare("/elsewhere/a", "/elsewhere/b", (0.7, 0.1, 0.2), (0.5, 0.0, 0.5))
    row, w = attach_compare(("compare-sft-vs-rs", None, d), labels)
    assert row == "rs" and w["reward_model"]["helpfulness"] == 0.7 and w["vs"] == "sft"
    # ... unless a path says otherwise: B lies in rs/, so A is sft and the rs row gets A's losses
    d = _compare("/elsewhere/a", "/x/rs/sft", (0.7, 0.1, 0.2), (0.5, 0.0, 0.5))
    row, w = attach_compare(("compare-sft-vs-rs", None, d), labels)
    assert row == "rs" and w["reward_model"]["helpfulness"] == 0.2 and w["ground_truth"] is None
    assert attach_compare(("cmp", None, d), labels) == (None, None)


def test_errors_and_damaged_metrics(tmp_path, capsys):
    from llamactl.report import build

    assert _main("report", tmp_path / "none") == 1
    assert "run directory not found" in capsys.readouterr().err
    (tmp_path / "empty" / "step-000001").mkdir(parents=True)
    (tmp_path / "empty" / "step-000001" / "metrics.jsonl").write_text("{}")  # checkpoints are not looked into
    assert _main("report", tmp_path / "empty") == 1
    err = capsys.readouterr().err
    assert "nothing to report" in err and err.count("\n") == 1 and not (tmp_path / "empty" / "report.md").exists()
    run = tmp_path / "run"
    _run_dir(run, "sft", 3)
    assert _main("report", run, "--out", run) == 1 and "is a directory" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text(json.dumps({"hello": 1}))
    assert _main("report", run, "--with", tmp_path / "junk.json") == 1 and "unrecognised" in capsys.readouterr().err
    # JSON that only looks like a result (wrong types, empty curves) is not taken for one
    for i, junk in enumerate([{"judges": 3}, {"families": [], "overall": {}}, {"iterations": [{"max": [], "median": []}]},
                              {"turns": 5, "models": {}}, {"buckets": {}, "accuracy": "high"}]):
        (run / f"junk{i}.json").write_text(json.dumps(junk))
    assert [s.title for s in build(run).sections] == ["Loss curves"]
    # a crash cut the last line: skipped and said; an old report is replaced whole
    (run / "report.md").write_text("old")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "split": "tr')
    assert _main("report", run) == 0
    md = (run / "report.md").read_text()
    assert "1 unreadable line(s)" in md and _table(md, "| run |")[1][2] == "3"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


def test_thin_keeps_first_and_last():
    from llamactl.report import thin

    rows = list(range(100))
    t = thin(rows, 15)
    assert len(t) == 15 and t[0] == 0 and t[-1] == 99 and t == sorted(t)
    assert thin(rows[:5], 15) == rows[:5]
