"""`llamactl rlhf rs`: rejection-sampling fine-tuning (paper section 3.2.3, Figures 7 and 8).

One iteration: K answers per prompt from the current policy at each temperature given (Llama 2-Chat
template, answers cleaned as `eval tasks` cleans them), each scored by R_c (llamactl.rewards: both reward
models, the 0.15 safety switch); the best answer per prompt enters the pool, which keeps the best answer
of every prompt across this and all earlier iterations (llamactl.rs_pool); then the policy is fine-tuned
on the whole pool by the sft stage itself (stages/sft.py resolve + run), into RUN/sft.

Outputs: RUN/samples.json (every sample and its rewards, written once, atomically, before the pool or
SFT is touched: a rerun reuses it instead of sampling again), RUN/sft_data.jsonl (the pool as SFT
dialogues at this iteration; fixed once written, so `--resume` continues the same SFT), RUN/rs.json
(per iteration of the pool: Figure 7's max / median reward among N samples, N = 1..K, the mean reward
per temperature, the pool's size and mean reward), RUN/rs_best_of_n.png, RUN/rs_temperature.png,
RUN/sft/ (its latest checkpoint is the result).

Defaults: the paper gives no K (Figure 7 draws N up to 100) and finds the best temperature moves with
the model (T in [1.2, 1.3] for RLHF models, Figure 8): K 10 at T 1.0, SFT with the sft stage's paper
defaults (lr 2e-5 cosine, 2 epochs, 64 sequences per batch). Samples that are empty or hold the chat
format's tags are unusable: reward 0 in the figures, never in the pool.

Parallel: every rank of a tp / pp group samples and scores the same prompts (the models in the run's
layout, nothing consolidated); data-parallel replicas split the prompts and gather the results.
"""
from __future__ import annotations

import gc
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from llamactl.config import ModelConfig, ParallelConfig, apply_overrides, load_sections, section_config
from llamactl.errors import LlamactlError

SECTIONS = ("rs", "sft", "parallel")
SAMPLES_FILE, SFT_DATA_FILE, RS_FILE = "samples.json", "sft_data.jsonl", "rs.json"
PLOT_BEST, PLOT_TEMP = "rs_best_of_n.png", "rs_temperature.png"


@dataclass
class RSConfig:
    """Settings of one rejection-sampling iteration (the [rs] section); SFT settings are the [sft] section."""

    policy: str = ""                   # current policy (chat checkpoint or run dir)
    rm_helpful: str = ""
    rm_safety: str = ""
    prompts: str = ""                  # prompt JSONL ({"prompt"|"messages", "safety"?, ...})
    out: str = "runs/rs"
    pool: Optional[str] = None         # default RUN/pool
    k: int = 10                        # samples per prompt at each temperature
    temperature: str = "1.0"           # one or several (comma list): K samples at each
    top_p: float = 1.0
    max_new_tokens: int = 48
    seed: int = 0
    iteration: Optional[int] = None    # default: the next after the pool's
    gen_batch: int = 64                # sequences decoded / scored together
    device: str = "auto"


@dataclass
class Plan:
    cfg: RSConfig
    model: ModelConfig                 # the policy's
    parallel: ParallelConfig
    temperatures: list[float]
    sft_flags: dict = field(default_factory=dict)
    config_file: Optional[Path] = None
    parallel_section: dict = field(default_factory=dict)
    parallel_flags: dict = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.out)

    @property
    def pool_dir(self) -> Path:
        return Path(self.cfg.pool) if self.cfg.pool else self.run_dir / "pool"


def parse_temperatures(text: str, flag: str = "--temperature", *, greedy: bool = False) -> list[float]:
    """'0.8,1.0,1.2' -> [0.8, 1.0, 1.2]: K samples at each (Figure 8); each > 0, no repeats. With `greedy`, 0 is
    also allowed (the greedy answer as one more candidate), next to at least one temperature > 0."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        vals = []
    low = 0 if greedy else 1e-300
    if not vals or any(not math.isfinite(v) or v < low for v in vals) or not any(v > 0 for v in vals):
        hint = "numbers >= 0 with one > 0, e.g. 1.0 or 0,0.8,1.2" if greedy else "numbers > 0, e.g. 1.0 or 0.8,1.0,1.2"
        raise LlamactlError(f"bad temperatures {text!r}: give {hint} ({flag})")
    if len(set(vals)) != len(vals):
        raise LlamactlError(f"temperature given twice in {text!r} ({flag})")
    return vals


# ---- resolve / describe -------------------------------------------------------------------------------
def resolve(flags: dict[str, Any], config_file: Path | None = None, parallel: dict[str, Any] | None = None,
            sft_flags: dict[str, Any] | None = None) -> Plan:
    """RSConfig defaults <- [rs] of the config file <- flags; the SFT settings [sft] <- SFT flags, checked
    now (the SFT itself is resolved after sampling, when the pool's data exists)."""
    from llamactl import checkpoint
    from llamactl.rewards import check_reward_checkpoint
    from llamactl.stages.runner import resolve_parallel
    from llamactl.stages.sft import SFTConfig, _check_given

    file = load_sections(config_file, SECTIONS)
    c = section_config(RSConfig(), "rs", file, flags, config_file)
    sft = {**file.get("sft", {}), **{k: v for k, v in (sft_flags or {}).items() if v is not None}}
    for owned in ("init", "data", "out"):
        if owned in sft:
            raise LlamactlError(f"[sft] {owned} is set by rejection sampling (the policy, the pool, RUN/sft) "
                                f"(--config {config_file})")
    _check_given(apply_overrides(SFTConfig(), sft, f"[sft] in {config_file}" if config_file else "flags"))
    psec = file.get("parallel", {})
    par = resolve_parallel(psec, parallel or {}, config_file)
    temps = parse_temperatures(c.temperature, greedy=True)
    for name, low in (("k", 1), ("max_new_tokens", 1), ("gen_batch", 1), ("seed", 0)):
        if getattr(c, name) < low:
            raise LlamactlError(f"{name.replace('_', '-')} must be >= {low}, got {getattr(c, name)} "
                                f"(--{name.replace('_', '-')})")
    if c.iteration is not None and c.iteration < 1:
        raise LlamactlError(f"iteration must be >= 1, got {c.iteration} (--iteration)")
    if not 0.0 < c.top_p <= 1.0:
        raise LlamactlError(f"--top-p must be in (0, 1], got {c.top_p} (--top-p)")
    for name, flag in (("policy", "--policy"), ("rm_helpful", "--rm-helpful"), ("rm_safety", "--rm-safety"),
                       ("prompts", "--prompts")):
        if not getattr(c, name):
            raise LlamactlError(f"missing {flag}")
    if not Path(c.prompts).is_file():
        raise LlamactlError(f"prompt file not found: {c.prompts} (--prompts)")
    if not Path(c.policy).exists():
        raise LlamactlError(f"checkpoint directory not found: {c.policy} (--policy)")
    pol = checkpoint.resolve(c.policy, "--policy")
    model, head = checkpoint.load_config(pol)
    if head != "lm":
        raise LlamactlError(f"--policy needs a language-model (chat) checkpoint, {pol} has a {head} head (--policy)")
    c.policy = str(pol)
    c.rm_helpful = str(check_reward_checkpoint(c.rm_helpful, "helpfulness"))
    c.rm_safety = str(check_reward_checkpoint(c.rm_safety, "safety"))
    if Path(c.out).exists() and not Path(c.out).is_dir():
        raise LlamactlError(f"{c.out} is not a directory (--out)")
    return Plan(c, model, par, temps, sft, config_file, psec, dict(parallel or {}))


def describe(plan: Plan) -> None:
    from llamactl.config import dump_toml
    from llamactl.rs_pool import Pool
    from llamactl.ui import console, table

    c = plan.cfg
    console.print(dump_toml({"rs": c, "parallel": plan.parallel}), markup=False)
    if plan.sft_flags:
        console.print(dump_toml({"sft": plan.sft_flags}), markup=False)
    pool = Pool.load(plan.pool_dir)
    n = _count_prompts(Path(c.prompts))
    rows = [["policy", c.policy], ["reward models", f"{c.rm_helpful} (helpfulness), {c.rm_safety} (safety)"],
            ["prompts", f"{n:,} ({c.prompts})"], ["samples", f"{c.k} per prompt x {len(plan.temperatures)} "
                                                              f"temperature(s) {', '.join(map(str, plan.temperatures))} = {n * c.k * len(plan.temperatures):,}"],
            ["pool", f"{plan.pool_dir} ({len(pool.entries):,} prompts, iterations {[it['iteration'] for it in pool.iterations]})"],
            ["iteration", c.iteration or pool.next_iteration()],
            ["layout", f"tp {plan.parallel.tp} x pp {plan.parallel.pp} x dp {plan.parallel.dp}"],
            ["then", f"SFT of the policy on the pool -> {plan.run_dir / 'sft'}"]]
    console.print(table("rejection sampling plan", ["", "value"], rows, justify_numbers=False))


def _count_prompts(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


# ---- sampling and scoring -----------------------------------------------------------------------------
def settings(plan: Plan, prompts_sha: str, iteration: int) -> dict:
    """What a RUN/samples.json was made with: a rerun reuses it only when these match."""
    c = plan.cfg
    return {"iteration": iteration, "policy": c.policy, "rm_helpful": c.rm_helpful, "rm_safety": c.rm_safety,
            "prompts": str(c.prompts), "prompts_sha256": prompts_sha, "k": c.k, "temperatures": plan.temperatures,
            "top_p": c.top_p, "max_new_tokens": c.max_new_tokens, "seed": c.seed}


def _barrier(ctx) -> None:
    if ctx.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def _device(name: str, ctx) -> str:
    import torch

    device = name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and ctx.world_size > 1:
        device = f"cuda:{torch.cuda.current_device()}"
    return device


def sample_answers(model, tok, items, temperatures, *, k: int, top_p: float, max_new_tokens: int, seed: int,
                   iteration: int, first_index: int = 0, stride: int = 1, batch_size: int = 64, ctx=None,
                   bar=None) -> list[list[list[str]]]:
    """out[i][t][j]: answer j of prompt i at temperature t. Every answer has its own generator seeded from
    (seed, iteration, the prompt's global index first_index + i * stride, t, j), so answers do not depend on
    batching or on how data-parallel ranks split the prompts."""
    from llamactl.generation import encode_prompt, generate, sequence_seed
    from llamactl.stages.answers import clean_answer

    prompts = [encode_prompt(tok, {"dialog": it.messages}, raw=False, system=None, where=f" ({it.where})")
               for it in items]
    out: list[list[list[str]]] = [[[] for _ in temperatures] for _ in items]
    for t, temp in enumerate(temperatures):
        if temp == 0:  # the greedy answer: decoded once, the same for all K
            got = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=0.0, eos_id=tok.eos_id,
                           batch_size=batch_size, ctx=ctx)
            for i, s in enumerate(got):
                text = tok.decode(s.tokens[:-1] if s.finish_reason == "stop" else s.tokens)
                out[i][t].extend([clean_answer(text, raw=False)] * k)
            continue
        flat = [p for p in prompts for _ in range(k)]
        seeds = [sequence_seed(seed, ((iteration * len(temperatures) + t) << 32) + (first_index + (n // k) * stride) * k + n % k)
                 for n in range(len(flat))]
        task = bar.add_task(f"samples @ T {temp:g}", total=len(flat)) if bar is not None else None
        got = generate(model, flat, max_new_tokens=max_new_tokens, temperature=temp, top_p=top_p, seeds=seeds,
                       eos_id=tok.eos_id, batch_size=batch_size, ctx=ctx,
                       progress=(lambda n: bar.advance(task, n)) if bar is not None else None)
        for n, s in enumerate(got):
            text = tok.decode(s.tokens[:-1] if s.finish_reason == "stop" else s.tokens)
            out[n // k][t].append(clean_answer(text, raw=False))
    return out


def score_answers(rms, items, answers, *, batch_size: int, bar=None) -> list[list[list[dict]]]:
    """The rewards of every answer ({"response", "reward", "reward_helpful", "reward_safety", "usable"});
    an unusable answer (empty, or holding chat tags) is not scored and gets reward 0."""
    from llamactl.tasks.annotator import usable

    flat = [(i, t, j, a) for i, per in enumerate(answers) for t, row in enumerate(per) for j, a in enumerate(row)]
    ok = [f for f in flat if usable(f[3])]
    scored = {}
    task = bar.add_task("scoring (2 reward models)", total=len(ok)) if bar is not None else None
    chunk = 16 * batch_size  # scored a chunk at a time, for the progress bar; the values do not depend on it
    for c in range(0, len(ok), chunk):
        part = ok[c:c + chunk]
        r = rms.score([items[i].messages for i, _, _, _ in part], [a for *_, a in part],
                      [bool(items[i].safety) for i, _, _, _ in part], batch_size=batch_size)
        for n, (i, t, j, _) in enumerate(part):
            scored[(i, t, j)] = (float(r.combined[n]), float(r.helpful[n]), float(r.safety[n]))
        if bar is not None:
            bar.advance(task, len(part))
    out = [[[None] * len(row) for row in per] for per in answers]
    for i, t, j, a in flat:
        rc, rh, rs = scored.get((i, t, j), (0.0, 0.0, 0.0))
        out[i][t][j] = {"response": a, "reward": rc, "reward_helpful": rh, "reward_safety": rs,
                        "usable": (i, t, j) in scored}
    return out


def _gather_dp(mine: list, ctx) -> list:
    """(global index, value) pairs of every dp replica, in index order."""
    if ctx.dp == 1:
        return [v for _, v in sorted(mine, key=lambda x: x[0])]
    import torch.distributed as dist

    parts = [None] * ctx.dp
    dist.all_gather_object(parts, mine, group=ctx.dp_group)
    return [v for _, v in sorted((x for p in parts for x in p), key=lambda x: x[0])]


def sample_and_score(plan: Plan, ctx, items, iteration: int, show_progress: bool = True) -> list[dict]:
    """Sample K answers per prompt and temperature with the policy, score them with both reward models.
    Returns one record per prompt (global order): {"key", "messages", "safety", "fields", "samples": [per
    temperature: [per sample: {...}]]}."""
    from llamactl.generation import load_for_generation
    from llamactl.rewards import RewardModels
    from llamactl.rs_pool import prompt_key
    from llamactl.ui import progress

    c = plan.cfg
    device = _device(c.device, ctx)
    mine_idx = list(range(len(items)))[ctx.dp_rank::ctx.dp]
    mine = [items[i] for i in mine_idx]
    model, tok = load_for_generation(c.policy, device, ctx)
    with progress(disable=not (show_progress and ctx.is_main)) as bar:
        answers = sample_answers(model, tok, mine, plan.temperatures, k=c.k, top_p=c.top_p,
                                 max_new_tokens=c.max_new_tokens, seed=c.seed, iteration=iteration,
                                 first_index=ctx.dp_rank, stride=ctx.dp, batch_size=c.gen_batch, ctx=ctx, bar=bar)
        del model
        gc.collect()
        rms = RewardModels.load(Path(c.rm_helpful), Path(c.rm_safety), ctx=ctx, device=device)
        scores = score_answers(rms, mine, answers, batch_size=c.gen_batch, bar=bar)
        del rms
        gc.collect()
    recs = [(i, {"key": prompt_key(it.messages), "messages": it.messages, "safety": bool(it.safety),
                 "fields": it.fields, "samples": sc}) for i, it, sc in zip(mine_idx, mine, scores)]
    return _gather_dp(recs, ctx)


# ---- figures --------------------------------------------------------------------------------------------
def iteration_stats(records: list[dict], temperatures: list[float], k: int) -> dict:
    """rs.json's entry of one iteration (layout16): Figure 7's curves at the first temperature > 0 (all
    temperatures' curves under "curves"), the mean reward per temperature (Figure 8)."""
    from llamactl.rs_pool import best_of_n

    curves, means = {}, {}
    for t, temp in enumerate(temperatures):
        table = [[s["reward"] for s in r["samples"][t]] for r in records]
        mx, md = best_of_n(table)
        curves[f"{temp:g}"] = {"max": mx, "median": md}
        means[f"{temp:g}"] = sum(map(sum, table)) / (len(table) * k)
    first = curves[f"{next(t for t in temperatures if t > 0):g}"]  # greedy (T 0) is one answer, not a curve
    n_samples = len(records) * k * len(temperatures)
    unusable = sum(not s["usable"] for r in records for per in r["samples"] for s in per)
    return {"k": k, "n": list(range(1, k + 1)), "max": first["max"], "median": first["median"],
            "temperatures": means, "curves": curves, "prompts": len(records), "samples": n_samples,
            "unusable": unusable}


def _n_rows(k: int) -> list[int]:
    """N shown in the table: 1, 2, 4, ... and K."""
    ns, n = [], 1
    while n < k:
        ns.append(n)
        n *= 2
    return ns + [k]


def report(plan: Plan, history: list[dict], stats: dict) -> None:
    """Tables (Figure 7 per N, Figure 8 per temperature) and the two PNGs."""
    from llamactl import plots
    from llamactl.ui import console, table

    c, it = plan.cfg, stats["iteration"]
    rows = [[n, f"{stats['max'][n - 1]:.4f}", f"{stats['median'][n - 1]:.4f}",
             f"{stats['max'][n - 1] - stats['median'][n - 1]:+.4f}"] for n in _n_rows(c.k)]
    console.print(table(f"iteration {it}: reward R_c among N samples at T {next(t for t in plan.temperatures if t > 0):g} (Figure 7; "
                        f"mean over {stats['prompts']} prompts)", ["N", "max", "median", "max - median"], rows))
    trows = [[t, f"{m:.4f}", f"{stats['curves'][t]['max'][-1]:.4f}"] for t, m in stats["temperatures"].items()]
    console.print(table(f"iteration {it}: reward per temperature (Figure 8)", ["T", "mean reward", f"max of {c.k}"], trows))
    console.print(f"pool: {stats['pool_size']} prompts, mean reward {stats['pool_mean_reward']:.4f} "
                  f"({stats['added']} added, {stats['replaced']} improved, {stats['kept']} kept); "
                  f"{stats['unusable']} of {stats['samples']} samples unusable (empty or chat tags)")
    series = {}
    for h in history:
        series[f"max, iteration {h['iteration']}"] = (h["n"], h["max"])
        series[f"median, iteration {h['iteration']}"] = (h["n"], h["median"])
    ok = plots.line_plot(plan.run_dir / PLOT_BEST, series, title="Max and median reward among N samples",
                         xlabel="N samples", ylabel="reward R_c")
    if ok:
        plots.line_plot(plan.run_dir / PLOT_TEMP,
                        {f"T {t}": (stats["n"], cv["max"]) for t, cv in stats["curves"].items()},
                        title=f"Max reward among N samples per temperature (iteration {it})",
                        xlabel="N samples", ylabel="max reward R_c")
        console.print(f"plots: {plan.run_dir / PLOT_BEST}, {plan.run_dir / PLOT_TEMP}")
    else:
        console.print(plots.MISSING, markup=False, soft_wrap=True)


# ---- run --------------------------------------------------------------------------------------------------
def _load_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LlamactlError(f"cannot read {what}: {e} ({path})") from None


def prepare(plan: Plan, ctx, show_progress: bool = True) -> tuple[int, list[dict]]:
    """(iteration, records): the iteration's samples, from RUN/samples.json when a run with the same settings
    wrote it, else sampled and scored now and written there (atomically) by rank 0."""
    from llamactl.chat_data import load_records
    from llamactl.data import sha256_file
    from llamactl.rs_pool import Pool
    from llamactl.tasks.suite import write_text_atomic

    c = plan.cfg
    path = plan.run_dir / SAMPLES_FILE
    sha = sha256_file(Path(c.prompts))
    if path.is_file():
        saved = _load_json(path, "the samples of this run")
        it = int(saved["settings"]["iteration"])
        if c.iteration is not None and c.iteration != it:
            raise LlamactlError(f"{path} holds the samples of iteration {it}, not {c.iteration}: use another --out "
                                f"(--iteration)")
        want = settings(plan, sha, it)
        diff = [k for k in want if saved["settings"].get(k) != want[k]]
        if diff:
            raise LlamactlError(f"{plan.run_dir} holds samples made with other settings ({', '.join(diff)} differ); "
                                f"use another --out or the same settings (--out)")
        return it, saved["records"]
    it = c.iteration or Pool.load(plan.pool_dir).next_iteration()
    items = load_records(Path(c.prompts), "prompts", "--prompts")
    records = sample_and_score(plan, ctx, items, it, show_progress)
    if ctx.is_main:
        write_text_atomic(path, json.dumps({"settings": settings(plan, sha, it), "records": records},
                                           ensure_ascii=False) + "\n", "--out")
    _barrier(ctx)
    return it, records


def update_pool(plan: Plan, iteration: int, records: list[dict]) -> dict:
    """Merge the iteration's usable samples into the pool, record its figures, write the pool, RUN/rs.json
    and (once) RUN/sft_data.jsonl; returns the iteration's stats. Rank 0 only; idempotent."""
    from llamactl.rs_pool import Candidate, Pool, locked
    from llamactl.tasks.suite import write_text_atomic
    from llamactl.ui import err_console

    c = plan.cfg
    cands = [Candidate(r["key"], r["messages"], r["safety"], s["response"], s["reward"], s["reward_helpful"],
                       s["reward_safety"], temp, r["fields"])
             for r in records for temp, per in zip(plan.temperatures, r["samples"]) for s in per if s["usable"]]
    with locked(plan.pool_dir, notify=lambda m: err_console.print(m, markup=False)):  # read, merge, write: one run at a time
        pool = Pool.load(plan.pool_dir)
        counts = pool.merge(cands, iteration)
        done = [it for it in pool.iterations if int(it["iteration"]) == iteration and it["run"] == str(plan.run_dir)]
        if done:  # a rerun of this run: the merge changed nothing, its first figures stand
            stats = done[0]["stats"]
        else:
            stats = {"iteration": iteration, **iteration_stats(records, plan.temperatures, c.k), **counts,
                     "pool_size": len(pool.entries), "pool_mean_reward": pool.mean_reward if pool.entries else 0.0}
            pool.record(iteration, str(plan.run_dir), stats)
        pool.save()
    history = [it["stats"] for it in pool.iterations]
    write_text_atomic(plan.run_dir / RS_FILE, json.dumps({"iterations": history, "pool": str(plan.pool_dir)},
                                                         indent=1) + "\n", "--out")
    data = plan.run_dir / SFT_DATA_FILE
    if not data.is_file():
        if not pool.entries:
            raise LlamactlError(f"no usable sample to fine-tune on: every answer was empty or held chat tags "
                                f"({plan.run_dir / SAMPLES_FILE})")
        write_text_atomic(data, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pool.sft_rows()), "--out")
    report(plan, history, stats)
    return stats


def run(plan: Plan, ctx, *, resume: bool = False, show_progress: bool = True):
    """Sample and score (or reuse this run's samples), update the pool, then SFT the policy on the pool."""
    from llamactl.stages import sft

    iteration, records = prepare(plan, ctx, show_progress)
    if ctx.is_main:
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        update_pool(plan, iteration, records)
    _barrier(ctx)
    if not (plan.run_dir / SFT_DATA_FILE).is_file():
        raise LlamactlError(f"the pool's SFT data was not written ({plan.run_dir / SFT_DATA_FILE})")
    flags = {**plan.sft_flags, "init": plan.cfg.policy, "data": str(plan.run_dir / SFT_DATA_FILE),
             "out": str(plan.run_dir / "sft")}
    if "device" not in flags and plan.cfg.device != "auto":
        flags["device"] = plan.cfg.device
    par = {**plan.parallel_section, **plan.parallel_flags}
    splan = sft.resolve(flags, None, par)
    # --resume continues the SFT when it has a checkpoint; before that there is nothing of it to resume
    # (the sampling is reused from RUN/samples.json either way)
    from llamactl.checkpoint import latest

    resume_sft = resume and latest(plan.run_dir / "sft") is not None
    return sft.run(splan, ctx, resume=resume_sft, show_progress=show_progress, stage="rs")
