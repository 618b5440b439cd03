"""`llamactl report RUN_DIR`: report.md with PNG plots, from the files the stages leave behind.

Works on any directory: one stage's run dir (pretrain / sft / rm: metrics.jsonl + config.toml; rs: rs.json;
ppo: metrics.jsonl with reward and KL keys; gatt), a folder of such runs, or the demo's directory. What is
there decides what is reported (nothing is looked up by stage name): every metrics.jsonl up to three levels
down gives a loss curve, and every JSON result is recognised by its keys (see `classify`):
  eval tasks  (`llamactl eval tasks --out`)    held-out ground-truth score per family: the stage table
  rlhf compare                                 RM-judged and scorer-judged win rates of a stage over the previous
  rm eval                                      accuracy per rating bucket (the paper's Table 8)
  rs.json     (`llamactl rlhf rs`)             max / median reward among N samples (Figure 7), per temperature
  gatt eval                                    adherence per turn, with and without GAtt
  eval loss, demo.json                         held-out loss / perplexity; the demo's stages and their times
Results kept elsewhere (an RM's eval JSON beside its run dir) come in with `--with FILE`.

The stage table orders rows pretrain, sft, rs, ppo, gatt (other labels after, by name); a compare result
is put on the row of the newer of its two models (found from the models' paths, else from the demo's file
name compare-<b>-vs-<a>.json), as the newer stage's win rate over the older one.
Without matplotlib every table stays and the report says how to get the plots (plots.MISSING).
"""
from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

from llamactl import plots
from llamactl.errors import LlamactlError

STAGE_ORDER = ("pretrain", "sft", "rs", "ppo", "gatt")
MAX_DEPTH = 3
SKIP_DIRS = re.compile(r"^(step-\d+|train_state|plots|tb|__pycache__)$|^\.|\.tmp")  # checkpoints, TensorBoard, ...
MAX_TABLE_ROWS = 15  # long per-iteration tables are thinned to this many rows (first, evenly spaced, last)
KINDS = ("helpfulness", "safety")
JUDGES = (("reward_model", "RM"), ("ground_truth", "GT"))


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    split: Optional[int] = None  # terminal: columns [1:split] turned (a row each), columns [split:] a second table


@dataclass
class Section:
    title: str
    tables: list[Table] = field(default_factory=list)
    plots: list[tuple[str, str]] = field(default_factory=list)  # (file name under plots/, caption)
    notes: list[str] = field(default_factory=list)


@dataclass
class Found:
    """What a directory holds: metrics files by run label, JSON results by kind as (label, path, data)."""
    runs: dict[str, Path] = field(default_factory=dict)
    results: dict[str, list[tuple[str, Path, dict]]] = field(default_factory=dict)

    def add(self, kind: str, label: str, path: Path, data: dict) -> None:
        self.results.setdefault(kind, []).append((label, path, data))

    def __bool__(self) -> bool:
        return bool(self.runs or self.results)


# ---- finding things ----------------------------------------------------------------------------------
def classify(data) -> Optional[str]:
    """The kind of a JSON result, by its keys; None for anything else (configs, manifests, ...)."""
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("families"), dict) and isinstance(data.get("overall"), dict):
        return "eval_tasks"
    if isinstance(data.get("judges"), dict):
        return "compare"
    if isinstance(data.get("buckets"), dict) and isinstance(data.get("accuracy"), (int, float)):
        return "rm_eval"
    if isinstance(data.get("turns"), list) and isinstance(data.get("models"), dict):
        return "gatt_eval"
    its = data.get("iterations")
    if isinstance(its, list) and its and all(isinstance(i, dict) and isinstance(i.get("max"), list) and i["max"]
                                             and isinstance(i.get("median"), list) and i["median"] for i in its):
        return "rs"
    if isinstance(data.get("stages"), list):
        return "demo"
    if isinstance(data.get("loss"), (int, float)) and ("perplexity" in data or "tokens" in data):
        return "eval_loss"
    return None


def _label(rel: Path, root_name: str) -> str:
    s = rel.as_posix()
    return root_name if s in ("", ".") else s


def find(root: Path, extra: Sequence[Path] = ()) -> Found:
    """Every metrics.jsonl and recognised JSON result under root (MAX_DEPTH levels), plus `extra` files."""
    found = Found()

    def walk(d: Path, depth: int):
        try:
            entries = sorted(d.iterdir())
        except OSError:
            return
        for p in entries:
            if p.is_dir():
                if depth < MAX_DEPTH and not SKIP_DIRS.search(p.name):
                    walk(p, depth + 1)
            elif p.name == "metrics.jsonl":
                found.runs[_label(p.parent.relative_to(root), root.name)] = p
            elif p.suffix == ".json" and not p.name.startswith("."):
                data = _read_json(p)
                kind = classify(data)
                if kind == "rs":  # rs.json is named by its run: the folder it is in
                    found.add(kind, _label(p.parent.relative_to(root), root.name), p, data)
                elif kind:  # evals/<stage>.json by the stage, anything else by its path
                    rel = p.relative_to(root).with_suffix("")
                    found.add(kind, rel.name if rel.parent.name == "evals" else rel.as_posix(), p, data)

    walk(root, 0)
    for p in extra:
        p = Path(p)
        if not p.is_file():
            raise LlamactlError(f"result file not found: {p} (--with)")
        data = _read_json(p)
        if data is None:
            raise LlamactlError(f"not a JSON result file: {p} (--with)")
        kind = classify(data)
        if kind is None:
            raise LlamactlError(f"unrecognised result JSON {p}: not an eval tasks, rm eval, gatt eval, rlhf compare, "
                                f"rs or eval loss result (--with)")
        found.add(kind, p.stem, p, data)
    return found


def _read_json(p: Path):
    try:
        if p.stat().st_size > 64 << 20:
            return None
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """(rows, lines skipped): a line cut by a crash (or otherwise not a JSON object) is skipped, not fatal."""
    rows, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(r, dict) and isinstance(r.get("step"), (int, float)):
            rows.append(r)
        else:
            bad += 1
    return rows, bad


def stage_name(run_dir: Path) -> str:
    """The stage a run dir belongs to: the first table of its config.toml ([pretrain], [sft], [reward], ...)."""
    try:
        cfg = tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return ""
    return next((k for k, v in cfg.items() if isinstance(v, dict) and k not in ("model", "parallel")), "")


# ---- formatting --------------------------------------------------------------------------------------
def num(v, digits: int = 4) -> str:
    if v is None or isinstance(v, bool):
        return "-"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1e4:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}" if v and abs(v) < 1e-3 else f"{v:.{digits}f}"
    return str(v)


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "run"


def thin(rows: Sequence, n: int = MAX_TABLE_ROWS) -> list:
    """At most n rows: evenly spaced, always the first and the last."""
    if len(rows) <= n:
        return list(rows)
    idx = sorted({round(i * (len(rows) - 1) / (n - 1)) for i in range(n)})
    return [rows[i] for i in idx]


def stage_key(label: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(label), "") if label in STAGE_ORDER else (len(STAGE_ORDER), label)


# ---- sections ----------------------------------------------------------------------------------------
class Plotter:
    """Draws into plots_dir through plots.*; remembers whether matplotlib was there."""

    def __init__(self, plots_dir: Path):
        self.dir = plots_dir
        self.available = plots.available()

    def line(self, section: Section, name: str, caption: str, series, **kw) -> None:
        series = {k: v for k, v in series.items() if len(v[0])}
        if series and plots.line_plot(self.dir / name, series, **kw):
            section.plots.append((name, caption))

    def bars(self, section: Section, name: str, caption: str, groups, bars, **kw) -> None:
        if bars and plots.bar_plot(self.dir / name, groups, bars, **kw):
            section.plots.append((name, caption))


def stage_table(found: Found, root: Optional[Path] = None) -> Optional[Section]:
    """Held-out ground-truth score per family after each stage, and each stage's win rates over the previous."""
    evals = sorted(found.results.get("eval_tasks", []), key=lambda e: stage_key(e[0]))
    compares = found.results.get("compare", [])
    if not evals and not compares:
        return None
    labels = [e[0] for e in evals]
    fams: list[str] = []
    for _, _, d in evals:
        fams += [f for f in d["families"] if f not in fams]
    placed = [(c, *attach_compare(c, labels, root)) for c in compares]
    wins = {lab: w for _, lab, w in placed if lab is not None}
    sampled = any(d.get("samples") for _, _, d in evals)
    cols = ["stage", *fams, "overall"] + (["overall sampled"] if sampled else []) + [
        f"{j} win {k[:4]}." for _, j in JUDGES for k in KINDS] + (["vs"] if wins else [])
    rows = []
    for lab, _, d in evals:
        fam = d["families"]
        row = [lab, *[num(fam[f]["greedy"], 3) if f in fam else "-" for f in fams], num(d["overall"]["greedy"], 3)]
        if sampled:
            row.append(num((d["overall"] or {}).get("sampled"), 3))
        w = wins.get(lab)
        row += [pct(w[j][k]) if w and w.get(j) and w[j].get(k) is not None else "-" for j, _ in JUDGES for k in KINDS]
        if wins:
            row.append(w["vs"] if w else "")
        rows.append(row)
    sec = Section("Held-out ground-truth score per stage, and win rates over the previous stage")
    if evals:
        sec.tables.append(Table("ground-truth score per task family (greedy; overall = mean of families); "
                                "win = the stage's answer judged better than the previous stage's", cols, rows,
                                split=len(fams) + 2 + sampled))
        sec.notes.append("Scores: `llamactl eval tasks` on the held-out prompts. Win rates: `llamactl rlhf compare` "
                         "(RM = reward models, R_h on helpfulness and R_s on safety prompts; GT = the suite's scorer).")
    unplaced = [c for c, lab, _ in placed if lab is None]
    if unplaced and evals:
        sec.notes.append(f"compare results not matched to a stage row: {', '.join(c[0] for c in unplaced)} "
                         "(see the comparison table)")
    return sec


def attach_compare(entry, labels: Sequence[str], root: Optional[Path] = None) -> tuple[Optional[str], Optional[dict]]:
    """(row label, {judge: {kind: win rate of that row over the other model}, "vs": other}) of a compare
    result, or (None, None) when its models match no two rows.

    A model's stage: the first part of its path (under root, when it lies there) that is a row label. When
    the paths do not tell, the file name does: compare-<b>-vs-<a>.json (the demo's naming, B first)."""
    name, _, d = entry

    def stage_of(path) -> Optional[str]:
        p = Path(str(path))
        if root is not None:
            try:
                p = p.resolve().relative_to(Path(root).resolve())
            except (ValueError, OSError):
                pass
        return next((part for part in p.parts if part in labels), None)

    sa, sb = stage_of(d.get("a", "")), stage_of(d.get("b", ""))
    if not (sa and sb and sa != sb):
        m = re.fullmatch(r"(?:compare-)?(.+?)-vs-(.+)", name)
        if not m or m.group(1) not in labels or m.group(2) not in labels:
            return None, None
        sb, sa = m.group(1), m.group(2)
        if stage_of(d.get("a", "")) == sb or stage_of(d.get("b", "")) == sa:  # a path that says otherwise wins
            sa, sb = sb, sa
    newer_is_a = stage_key(sa) >= stage_key(sb)
    newer, older = (sa, sb) if newer_is_a else (sb, sa)
    out: dict = {"vs": older}
    for j, _ in JUDGES:
        jd = d["judges"].get(j)
        out[j] = None if jd is None else {
            k: (None if jd.get(k) is None else jd[k]["win" if newer_is_a else "loss"]) for k in KINDS}
    return newer, out


def compare_section(found: Found, root: Optional[Path] = None) -> Optional[Section]:
    """Every compare result, ordered by the stage of its newer model (pretrain, sft, rs, ppo, gatt, others)."""
    labels = list(STAGE_ORDER) + [e[0] for e in found.results.get("eval_tasks", [])]
    compares = sorted(found.results.get("compare", []),
                      key=lambda c: stage_key(attach_compare(c, labels, root)[0] or "~" + c[0]))
    if not compares:
        return None
    cols = ["comparison", "A", "B", "prompts"] + [f"{j} {k} W / T / L" for _, j in JUDGES for k in KINDS]
    rows, notes = [], []
    for label, _, d in compares:
        row = [label, str(d.get("a", "?")), str(d.get("b", "?")), num(d.get("prompts"))]
        for j, _ in JUDGES:
            jd = d["judges"].get(j)
            for k in KINDS:
                r = (jd or {}).get(k)
                row.append("-" if r is None else
                           f"{100 * r['win']:.0f} / {100 * r['tie']:.0f} / {100 * r['loss']:.0f} ({r['prompts']})")
        rows.append(row)
        if d.get("ground_truth_absent"):
            notes.append(f"{label}: no ground truth: {d['ground_truth_absent']}")
    sec = Section("Model-based evaluation (paper 3.4.1, Figure 11)",
                  [Table("win / tie / loss of A over B in % (prompts of that kind)", cols, rows)])
    sec.notes += notes
    return sec


def loss_section(found: Found, plot: Plotter) -> Optional[Section]:
    if not found.runs:
        return None
    cols = ["run", "stage", "steps", "tokens", "first loss", "last loss", "last val loss", "best val loss"]
    rows, sec = [], Section("Loss curves")
    order = ("pretrain", "sft", "reward", "rs", "ppo", "gatt")

    def key(label):  # the demo's stage order by the dir's name, else by its config's stage, then the label
        top, stage = label.split("/")[0], stage_name(found.runs[label].parent)
        name = top if top in STAGE_ORDER else stage
        return (order.index(name) if name in order else len(order), label)

    for label in sorted(found.runs, key=key):
        path = found.runs[label]
        mrows, bad = read_metrics(path)
        train = [r for r in mrows if r.get("split", "train") != "val" and isinstance(r.get("loss"), (int, float))]
        val = [r for r in mrows if r.get("split") == "val" and isinstance(r.get("loss"), (int, float))]
        if bad:
            sec.notes.append(f"{label}: {bad} unreadable line(s) of {path.name} skipped")
        if not train and not val:
            sec.notes.append(f"{label}: {path.name} has no loss rows yet")
            continue
        last = (train or val)[-1]
        rows.append([label, stage_name(path.parent) or "-", num(last["step"]), num(last.get("tokens")),
                     num(train[0]["loss"]) if train else "-", num(train[-1]["loss"]) if train else "-",
                     num(val[-1]["loss"]) if val else "-", num(min(r["loss"] for r in val)) if val else "-"])
        plot.line(sec, f"loss-{slug(label)}.png", f"loss of {label}",
                  {"train": ([r["step"] for r in train], [r["loss"] for r in train]),
                   "val": ([r["step"] for r in val], [r["loss"] for r in val])},
                  title=f"{label}: loss", xlabel="step", ylabel="loss")
    if rows:
        sec.tables.append(Table("loss per run (metrics.jsonl; val rows: \"split\": \"val\")", cols, rows))
    return sec if rows or sec.notes else None


def ppo_section(found: Found, plot: Plotter) -> Optional[Section]:
    sec = Section("PPO: reward and KL per iteration")
    keys = [("reward_combined", "R_c"), ("reward_helpful", "R_h"), ("reward_safety", "R_s"), ("kl", "KL"),
            ("entropy", "entropy"), ("clip_frac", "clip frac"), ("explained_var", "expl. var"),
            ("response_len", "resp. len")]
    for label, path in found.runs.items():
        mrows, _ = read_metrics(path)
        train = [r for r in mrows if r.get("split", "train") != "val" and "kl" in r and "reward_combined" in r]
        if not train:
            continue
        val = [r for r in mrows if r.get("split") == "val" and "reward_combined" in r]
        present = [(k, n) for k, n in keys if any(k in r for r in train)]
        sec.tables.append(Table(f"{label}: per iteration (sigma-space rewards; KL per sequence to the reference)",
                                ["iteration", *[n for _, n in present]],
                                [[num(r["step"]), *[num(r.get(k)) for k, _ in present]] for r in thin(train)]))
        if val:
            vk = [(k, n) for k, n in keys[:4] if any(k in r for r in val)]
            sec.tables.append(Table(f"{label}: held-out prompts", ["iteration", *[n for _, n in vk]],
                                    [[num(r["step"]), *[num(r.get(k)) for k, _ in vk]] for r in thin(val)]))
        it = [r["step"] for r in train]
        series = {n: (it, [r.get(k) for r in train]) for k, n in keys[:3] if all(k in r for r in train)}
        if val:
            series["R_c held-out"] = ([r["step"] for r in val], [r["reward_combined"] for r in val])
        plot.line(sec, f"ppo-reward-{slug(label)}.png", f"{label}: reward per iteration", series,
                  title=f"{label}: reward", xlabel="iteration", ylabel="sigma-space reward")
        vkl = [r for r in val if isinstance(r.get("kl"), (int, float))]
        plot.line(sec, f"ppo-kl-{slug(label)}.png", f"{label}: KL to the reference per iteration",
                  {"KL": (it, [r["kl"] for r in train]), "KL held-out": ([r["step"] for r in vkl], [r["kl"] for r in vkl])},
                  title=f"{label}: KL(pi || pi_0)", xlabel="iteration", ylabel="KL per sequence")
    return sec if sec.tables else None


def rm_section(found: Found, plot: Plotter) -> Optional[Section]:
    from llamactl.chat_data import RATINGS
    from llamactl.stages.reward_eval import BUCKET_NAMES

    evals = found.results.get("rm_eval", [])
    if not evals:
        return None
    cols = ["reward model", "kind", *BUCKET_NAMES, "avg", "pairs", "unsafe detector P / R"]
    rows, bars = [], {}
    for label, _, d in evals:
        b = d["buckets"]
        acc = [(b.get(r) or {}).get("accuracy") for r in RATINGS]
        s = d.get("safety")
        rows.append([label, d.get("kind") or "-", *[pct(a) for a in acc], pct(d["accuracy"]), num(d.get("pairs")),
                     f"{pct(s.get('precision'))} / {pct(s.get('recall'))}" if s else "-"])
        bars[label] = [100 * a if a is not None else 0.0 for a in acc] + [100 * d["accuracy"]]
    sec = Section("Reward models: accuracy per rating bucket (paper Table 8)",
                  [Table("accuracy of r_chosen > r_rejected on held-out pairs, by the annotator's rating", cols, rows)])
    plot.bars(sec, "rm-buckets.png", "RM accuracy per rating bucket", [*BUCKET_NAMES, "avg"], bars,
              title="reward model accuracy per rating", ylabel="accuracy (%)")
    return sec


def rs_section(found: Found, plot: Plotter) -> Optional[Section]:
    res = found.results.get("rs", [])
    if not res:
        return None
    sec = Section("Rejection sampling: max and median reward among N samples (paper Figure 7)")
    for label, _, d in res:
        its = d["iterations"]
        temps = sorted({t for i in its for t in (i.get("temperatures") or {})}, key=float)
        cols = ["iteration", "K", "max @1", "max @K", "median @K", "gain max@K - median@K", "pool", "pool mean R"] + [
            f"R @ T {t}" for t in temps]
        rows = []
        series = {}
        for i in its:
            n = i.get("n") or list(range(1, len(i["max"]) + 1))
            rows.append([num(i.get("iteration")), num(i.get("k", len(i["max"]))), num(i["max"][0]), num(i["max"][-1]),
                         num(i["median"][-1]), num(i["max"][-1] - i["median"][-1]), num(i.get("pool_size")),
                         num(i.get("pool_mean_reward")), *[num((i.get("temperatures") or {}).get(t)) for t in temps]])
            series[f"it {i.get('iteration')} max"] = (n, i["max"])
            series[f"it {i.get('iteration')} median"] = (n, i["median"])
        sec.tables.append(Table(f"{label} (mean over prompts of the max / median R_c among the first N samples)", cols, rows))
        plot.line(sec, f"rs-best-of-n-{slug(label)}.png", f"{label}: max and median reward among N samples", series,
                  title=f"{label}: reward among N samples", xlabel="N samples", ylabel="R_c")
        if temps:
            tser = {f"it {i.get('iteration')}": ([float(t) for t in temps if t in (i.get("temperatures") or {})],
                                                 [i["temperatures"][t] for t in temps if t in (i.get("temperatures") or {})])
                    for i in its}
            plot.line(sec, f"rs-temperature-{slug(label)}.png", f"{label}: reward per temperature (Figure 8)", tser,
                      title=f"{label}: reward per temperature", xlabel="temperature", ylabel="R_c")
    return sec


def gatt_section(found: Found, plot: Plotter) -> Optional[Section]:
    res = found.results.get("gatt_eval", [])
    if not res:
        return None
    sec = Section("Ghost Attention: constraint adherence per turn")
    for label, _, d in res:
        models = d["models"]
        turns = list(d["turns"])
        cols = ["turn", *models]
        rows = [[str(t), *[pct(_at(m.get("adherence"), k)) for m in models.values()]] for k, t in enumerate(turns)]
        if any("mean_turn_5_plus" in m for m in models.values()):
            rows.append(["5+", *[pct(m.get("mean_turn_5_plus")) for m in models.values()]])
        sec.tables.append(Table(f"{label}: share of answers keeping the constraint ({num(d.get('dialogues'))} "
                                f"dialogues, {num(d.get('constraints'))} constraints)", cols, rows))
        series = {name: ([t for k, t in enumerate(turns) if _at(m.get("adherence"), k) is not None],
                         [a for a in (m.get("adherence") or []) if a is not None]) for name, m in models.items()}
        plot.line(sec, f"gatt-adherence-{slug(label)}.png", f"{label}: adherence per turn", series,
                  title=f"{label}: adherence per turn", xlabel="turn", ylabel="adherence")
    return sec


def _at(xs, k):
    return xs[k] if isinstance(xs, list) and k < len(xs) else None


def misc_sections(found: Found) -> list[Section]:
    out = []
    demo = found.results.get("demo", [])
    if demo:
        label, _, d = demo[0]
        rows = [[str(s.get("name", "?")), str(s.get("status", "?")), num(s.get("seconds"), 1), f"`{s.get('command', '')}`"]
                for s in d["stages"] if isinstance(s, dict)]
        total = sum(s.get("seconds") or 0 for s in d["stages"] if isinstance(s, dict))
        out.append(Section("Demo stages", [Table(f"{label}: {len(rows)} stages, {total:.0f} s in all",
                                                 ["stage", "status", "seconds", "command"], rows)]))
    losses = found.results.get("eval_loss", [])
    if losses:
        out.append(Section("Held-out loss (`llamactl eval loss`)", [Table(
            "eval loss results", ["result", "loss", "perplexity", "tokens", "step"],
            [[lab, num(d["loss"]), num(d.get("perplexity")), num(d.get("tokens")), num(d.get("step"))]
             for lab, _, d in losses])]))
    return out


# ---- the report --------------------------------------------------------------------------------------
@dataclass
class Report:
    run_dir: Path
    path: Path
    sections: list[Section]
    plots_available: bool


def build(run_dir, out=None, extra: Sequence[Path] = ()) -> Report:
    """Find what run_dir holds, draw the plots (under out's folder / plots) and return the sections."""
    root = Path(run_dir)
    if not root.is_dir():
        raise LlamactlError(f"run directory not found: {root} (RUN_DIR)")
    out = Path(out) if out is not None else root / "report.md"
    if out.is_dir():
        raise LlamactlError(f"{out} is a directory (--out names a file)")
    found = find(root, extra)
    if not found:
        raise LlamactlError(f"nothing to report in {root}: no metrics.jsonl, rs.json or result JSON (eval tasks, "
                            f"rm eval, gatt eval, rlhf compare) up to {MAX_DEPTH} levels down (RUN_DIR; --with adds files)")
    plot = Plotter(out.parent / "plots")
    sections = [stage_table(found, root), compare_section(found, root), loss_section(found, plot), rm_section(found, plot),
                rs_section(found, plot), ppo_section(found, plot), gatt_section(found, plot), *misc_sections(found)]
    return Report(root, out, [s for s in sections if s is not None], plot.available)


def _md_cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def markdown(report: Report) -> str:
    lines = [f"# llamactl report: {report.run_dir}", ""]
    if not report.plots_available:
        lines += [f"> No plots in this report: {plots.MISSING}, then run `llamactl report` again.", ""]
    for sec in report.sections:
        lines += [f"## {sec.title}", ""]
        for t in sec.tables:
            lines += [f"**{_md_cell(t.title)}**", "", "| " + " | ".join(map(_md_cell, t.columns)) + " |",
                      "|" + "|".join("---" for _ in t.columns) + "|"]
            lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in t.rows]
            lines.append("")
        for name, caption in sec.plots:
            lines += [f"![{caption}](plots/{name})", ""]
        lines += [f"- {n}" for n in sec.notes] + ([""] if sec.notes else [])
    return "\n".join(lines).rstrip() + "\n"


def write(report: Report) -> Path:
    """report.md under a temporary name, then renamed: a reader never sees half a report."""
    path = report.path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(markdown(report), encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def run_report(run_dir, out=None, extra: Sequence[Path] = ()) -> Report:
    report = build(run_dir, out, extra)
    write(report)
    return report


def rich_tables(report: Report) -> Iterable:
    """The report's tables as rich tables, for the terminal."""
    from rich.markup import escape  # paths and commands may hold [brackets]

    from llamactl.ui import table

    def one(title, cols, rows):
        return table(escape(title), [escape(c) for c in cols], [[escape(str(c)) for c in r] for r in rows])

    for sec in report.sections:
        for t in sec.tables:
            if t.split is None or t.split >= len(t.columns):
                yield one(f"{sec.title}: {t.title}", t.columns, t.rows)
                continue
            # the scores turned: one row per family, one column per stage (narrow enough for a terminal)
            yield one(f"{sec.title}: {t.title}", [t.columns[0], *[r[0] for r in t.rows]],
                      [[c, *[r[i] for r in t.rows]] for i, c in enumerate(t.columns[1:t.split], 1)])
            yield one(f"{sec.title}: win rates over the previous stage", t.columns[:1] + t.columns[t.split:],
                      [r[:1] + r[t.split:] for r in t.rows])
