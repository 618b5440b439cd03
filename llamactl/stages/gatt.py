"""`llamactl gatt`: Ghost Attention (paper 3.3) -- build the GAtt SFT set with the current model, then train
it through the sft stage (`stages.sft` resolve / run: the same loop, packing and checkpoints).

Data (`gatt_data`): instructions sampled and combined, half concise; dialogues whose user turns come from
--prompts, the instruction joined to every user turn while the current model (--model) answers turn by
turn, each answer kept when it keeps the constraint or repaired to keep it; training samples keep the
instruction only as the system message of the first turn, with loss on their last answer only
(`"loss": "last_turn"` in the SFT JSONL). The run dir holds the data (gatt.train.jsonl), its figures and
build settings (gatt.json), and the SFT run (metrics.jsonl, config.toml, step-*, latest).

The data is sampled once, in the launching process, before any rank starts; a later call with the same
settings (--resume, or each rank under --nproc) reuses it, and other settings refuse to overwrite data a
checkpointed run trained on. Packed samples do not attend to each other by default (--no-cross-attention
of sft): every sample then starts at RoPE position 0 with its instruction, as a dialogue does at inference.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from llamactl.config import ModelConfig, ParallelConfig, load_sections, section_config
from llamactl.errors import LlamactlError

SECTIONS = ("gatt", "sft", "parallel")
DATA_FILE = "gatt.train.jsonl"
STATS_FILE = "gatt.json"


@dataclass
class GattConfig:
    """How the GAtt data is built (the [gatt] section); training settings are the [sft] section's."""

    model: str = ""                    # current chat model: samples the answers, and SFT starts from it
    prompts: str = ""                  # prompt JSONL: the user turns
    out: str = "runs/gatt"
    dialogues: int = 128
    turns: int = 20                    # user turns planned per dialogue (fewer when the context is full)
    per_dialogue: int = 4              # training samples per dialogue, ending at random turns (0: every turn)
    samples: int = 1                   # answers sampled per turn; the first keeping the constraint is kept
    max_new_tokens: int = 24
    temperature: float = 0.7
    top_p: float = 0.9
    kinds: list = field(default_factory=lambda: ["hobby", "language", "figure", "case", "start", "end",
                                                 "length", "mention"])
    constraints: list = field(default_factory=list)   # the user's own specs, added to the pool
    constraints_file: Optional[str] = None
    max_parts: int = 2                 # instructions combine 1..max_parts families
    concise: float = 0.5               # share of instructions written in their concise form
    ghost: bool = True                 # False: the ablation, instruction left in every user turn
    seed: int = 0
    gen_batch_size: int = 64           # dialogues generated together
    replay: Optional[str] = None       # an SFT JSONL mixed into the GAtt set, so the tasks it teaches are kept
    replay_ratio: float = 1.0          # replayed records per GAtt sample (a seeded draw without repeats)


# the settings the data depends on (a change rebuilds it)
DATA_KEYS = ("dialogues", "turns", "per_dialogue", "samples", "max_new_tokens", "temperature", "top_p", "kinds",
             "constraints", "max_parts", "concise", "ghost", "seed", "replay_ratio")


@dataclass
class GattPlan:
    cfg: GattConfig
    model: ModelConfig
    parallel: ParallelConfig
    checkpoint: Path
    sft: Any = None                    # stages.sft.Plan (None on a dry run before the data exists)
    data: Optional[dict] = None        # gatt.json: the data's figures


# ---- answering with a model ---------------------------------------------------------------------------
def model_answerer(model, tok, *, max_new_tokens: int, temperature: float, top_p: float, seed: int,
                   batch_size: int):
    """gatt_data.AnswerFn over a loaded model: chat template, KV-cache generation, one seeded generator per
    answer (numbered across calls, so results do not depend on batching)."""
    from llamactl.generation import generate, sequence_seed
    from llamactl.tokenizer import encode_dialog

    count = [0]

    def answer(dialogs: list[list[dict]], k: int) -> list[list[str]]:
        prompts = [encode_dialog(tok, d) for d in dialogs]
        flat = [p for p in prompts for _ in range(k)]
        seeds = [sequence_seed(seed, count[0] + j) for j in range(len(flat))]
        count[0] += len(flat)
        got = generate(model, flat, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       seeds=seeds, eos_id=tok.eos_id, batch_size=batch_size)
        texts = [tok.decode(s.tokens[:-1] if s.finish_reason == "stop" else s.tokens) for s in got]
        return [texts[i * k:(i + 1) * k] for i in range(len(dialogs))]

    return answer


def context_fits(tok, max_len: int, max_new_tokens: int):
    """gatt_data.FitsFn: the dialogue's prompt plus a full answer stays within the model's context."""
    from llamactl.tokenizer import encode_dialog

    return lambda dialog: len(encode_dialog(tok, dialog)) + max_new_tokens <= max_len


def instruction_pool(cfg, items, flag_prefix: str = ""):
    """The InstructionPool of a config (kinds, the user's constraints, figures from the prompt set)."""
    from llamactl.gatt_data import InstructionPool, figures_from_prompts, parse_spec, read_constraints_file

    user = [parse_spec(s, where="--constraint") for s in cfg.constraints]
    if cfg.constraints_file:
        user += read_constraints_file(Path(cfg.constraints_file))
    return InstructionPool(kinds=tuple(cfg.kinds), user=tuple(user), figures=figures_from_prompts(items),
                           max_parts=cfg.max_parts), user


def check_config(cfg) -> None:
    """Ranges of the flags shared by `gatt train` and `gatt eval` (one-line errors naming the flag)."""
    for name, low in (("dialogues", 1), ("turns", 1), ("samples", 1), ("max_new_tokens", 1), ("max_parts", 1),
                      ("batch_size", 1), ("gen_batch_size", 1), ("per_dialogue", 0), ("seed", 0)):
        v = getattr(cfg, name, None)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < low):
            raise LlamactlError(f"{name} must be an integer >= {low}, got {v!r} (--{name.replace('_', '-')})")
    if not 0.0 <= float(cfg.concise) <= 1.0:
        raise LlamactlError(f"--concise must be within [0, 1], got {cfg.concise} (--concise)")
    if float(cfg.temperature) < 0:
        raise LlamactlError(f"--temperature must be >= 0, got {cfg.temperature} (--temperature)")
    if not 0.0 < float(cfg.top_p) <= 1.0:
        raise LlamactlError(f"--top-p must be in (0, 1], got {cfg.top_p} (--top-p)")
    if not float(getattr(cfg, "replay_ratio", 0)) >= 0:
        raise LlamactlError(f"--replay-ratio must be >= 0, got {cfg.replay_ratio} (--replay-ratio)")
    if getattr(cfg, "replay", None) and not Path(cfg.replay).is_file():
        raise LlamactlError(f"replay file not found ({cfg.replay}, --replay)")
    if not cfg.prompts:
        raise LlamactlError("no prompts given (--prompts FILE.jsonl)")
    if not Path(cfg.prompts).is_file():
        raise LlamactlError(f"prompts file not found ({cfg.prompts}, --prompts)")


# ---- data ---------------------------------------------------------------------------------------------
def fingerprint(cfg: GattConfig, ckpt: Path) -> dict:
    from llamactl.data import sha256_file

    out = {k: getattr(cfg, k) for k in DATA_KEYS}
    out.update(model=str(ckpt), prompts_sha256=sha256_file(Path(cfg.prompts)))
    if cfg.constraints_file:
        out["constraints_file_sha256"] = sha256_file(Path(cfg.constraints_file))
    if cfg.replay:
        out["replay_sha256"] = sha256_file(Path(cfg.replay))
    return out


def replayed(cfg: GattConfig, n_gatt: int) -> list:
    """round(replay_ratio * n_gatt) records of the --replay SFT file (all of it when it holds fewer), drawn
    with a seeded generator: the paper fine-tunes on GAtt data within its whole mix, and a small model trained
    on GAtt dialogues alone forgets the tasks it answered before (measured in the demo: 0.756 -> 0.629 held-out
    score without, 0.773 with a 1:1 replay of the SFT set)."""
    from llamactl.chat_data import load_records

    if not cfg.replay or cfg.replay_ratio == 0:
        return []
    records = load_records(Path(cfg.replay), "sft", "--replay")
    want = min(len(records), round(cfg.replay_ratio * n_gatt))
    return random.Random(f"{cfg.seed}:replay").sample(records, want)


def build_data(cfg: GattConfig, ckpt: Path, model_cfg: ModelConfig, device: str, show: bool = True) -> dict:
    """Sample the dialogues with the model, write gatt.train.jsonl then gatt.json (its presence marks the
    data whole); returns the figures."""
    from llamactl.chat_data import load_records, write_jsonl
    from llamactl.gatt_data import family, plan_dialogues, roll, training_examples
    from llamactl.generation import load_for_generation
    from llamactl.tasks.suite import write_text_atomic
    from llamactl.ui import console

    items = load_records(Path(cfg.prompts), "prompts", "--prompts")
    pool, _ = instruction_pool(cfg, items)
    dialogues = plan_dialogues(pool, [it.prompt for it in items], dialogues=cfg.dialogues, turns=cfg.turns,
                               concise=cfg.concise, seed=cfg.seed)
    model, tok = load_for_generation(ckpt, device)
    answer = model_answerer(model, tok, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            top_p=cfg.top_p, seed=cfg.seed, batch_size=cfg.gen_batch_size)

    def progress(turn: int, live: int) -> None:
        if show:
            console.print(f"gatt data: turn {turn}: {live} dialogues answered", markup=False)

    roll(dialogues, answer, context_fits(tok, model_cfg.max_seq_len, cfg.max_new_tokens), every_turn=True,
         until=not cfg.ghost, samples=cfg.samples, repair=True, on_turn=progress)
    rng = random.Random(f"{cfg.seed}:samples")
    examples = [e for d in dialogues for e in training_examples(d, rng, cfg.per_dialogue, ghost=cfg.ghost)]
    if not examples:
        raise LlamactlError(f"no GAtt training sample: every dialogue stopped at its first turn ({cfg.prompts}, --prompts)")
    replay = replayed(cfg, len(examples))
    rows = examples + [r.to_json() if hasattr(r, "to_json") else r for r in replay]
    random.Random(f"{cfg.seed}:mix").shuffle(rows)
    out = Path(cfg.out)
    (out / STATS_FILE).unlink(missing_ok=True)
    write_jsonl(out / DATA_FILE, rows, kind="sft")
    answers = [k for d in dialogues for k in d.kept]
    fams: dict[str, int] = {}
    for d in dialogues:
        fams[family(d.constraint)] = fams.get(family(d.constraint), 0) + 1
    stats = {"fingerprint": fingerprint(cfg, ckpt), "dialogues": len(dialogues), "samples": len(examples),
             "replayed": len(replay),
             "answers": len(answers), "kept_as_sampled": sum(answers), "repaired": len(answers) - sum(answers),
             "turns": [len(d.answers) for d in dialogues],
             "stopped": {r: sum(d.stopped == r for d in dialogues) for r in ("turns", "context", "empty")},
             "concise": sum(d.instruction == d.constraint.short for d in dialogues), "families": fams,
             "instructions": len({d.instruction for d in dialogues})}
    write_text_atomic(out / STATS_FILE, json.dumps(stats, indent=1) + "\n")
    return stats


def data_rows(stats: dict) -> list[list]:
    turns = stats["turns"]
    n = max(1, stats["answers"])
    return [["dialogues", stats["dialogues"]], ["training samples", stats["samples"]],
            ["replayed SFT records (--replay)", stats.get("replayed", 0)],
            ["answers kept as sampled", f"{stats['kept_as_sampled']} ({100 * stats['kept_as_sampled'] / n:.1f} %)"],
            ["answers repaired", f"{stats['repaired']} ({100 * stats['repaired'] / n:.1f} %)"],
            ["turns per dialogue (mean / max)", f"{sum(turns) / max(1, len(turns)):.1f} / {max(turns, default=0)}"],
            ["stopped: context full / empty answer", f"{stats['stopped']['context']} / {stats['stopped']['empty']}"],
            ["concise instructions", stats["concise"]],
            ["families", ", ".join(f"{k} {v}" for k, v in sorted(stats["families"].items()))]]


# ---- resolve / describe / run (stages.runner.run_stage) ------------------------------------------------
def resolve(flags: dict[str, Any], config_file: Path | None = None, parallel: dict[str, Any] | None = None) -> GattPlan:
    """defaults <- config file ([gatt], [sft], [parallel]) <- flags; builds (or reuses) the data, then the SFT
    plan on it. flags holds GattConfig keys, SFT keys, and `dry_run` / `resume` (how the data is treated)."""
    from llamactl import checkpoint
    from llamactl.stages import sft
    from llamactl.stages.runner import resolve_parallel

    flags = dict(flags)
    dry_run, resume = bool(flags.pop("dry_run", False)), bool(flags.pop("resume", False))
    file = load_sections(config_file, SECTIONS)
    names = {f.name for f in fields(GattConfig)}
    cfg = section_config(GattConfig(), "gatt", file, {k: v for k, v in flags.items() if k in names}, config_file)
    sft_flags = {**file.get("sft", {}), **{k: v for k, v in flags.items() if k not in names and v is not None}}
    check_config(cfg)
    if not cfg.model:
        raise LlamactlError("no chat model given (--model CKPT)")
    if not Path(cfg.model).exists():
        raise LlamactlError(f"checkpoint not found ({cfg.model}, --model)")
    ckpt = checkpoint.resolve(cfg.model, "--model")
    model_cfg, head = checkpoint.load_config(ckpt, meta=checkpoint.read_meta(ckpt))
    if head != "lm":
        raise LlamactlError(f"--model needs a language-model checkpoint, {ckpt} has a {head} head (--model)")
    cfg.model = str(ckpt)
    instruction_pool(cfg, [])  # the user's constraints and kinds are checked before any sampling
    par = resolve_parallel(file.get("parallel", {}), parallel or {}, config_file)
    out = Path(cfg.out)
    stats_path = out / STATS_FILE
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() and (out / DATA_FILE).is_file() else None
    if stats is not None and stats.get("fingerprint") != fingerprint(cfg, ckpt):
        if checkpoint.latest(out) is not None:
            raise LlamactlError(f"{out} holds a GAtt run trained on data built with other settings; "
                                f"use a new --out (--out)")
        stats = None
    if not resume and not dry_run and checkpoint.latest(out) is not None:
        raise LlamactlError(f"run dir already holds checkpoints ({out}); pass --resume to continue or use a new --out (--out)")
    plan = GattPlan(cfg, model_cfg, par, ckpt)
    if stats is None:
        if dry_run:
            return plan
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ and os.environ.get("WORLD_SIZE") != "1":
            raise LlamactlError(f"the GAtt data is missing in {out}: it is built by the launching process (--out)")
        out.mkdir(parents=True, exist_ok=True)
        stats = build_data(cfg, ckpt, model_cfg, str(sft_flags.get("device") or "auto"))
    sft_flags.update(init=str(ckpt), data=str(out / DATA_FILE), out=str(out))
    sft_flags.setdefault("cross_attention", False)
    plan.sft = sft.resolve(sft_flags, None, par_flags(par, parallel))
    plan.parallel, plan.data = plan.sft.parallel, stats
    return plan


def par_flags(par: ParallelConfig, given: dict | None) -> dict:
    """The resolved [parallel] settings as flags for sft.resolve (it resolves them again, identically)."""
    keep = {"tp", "pp", "nproc", "nnodes", "zero"}
    return {k: v for k, v in asdict(par).items() if k in keep and v is not None} | (given or {})


def describe(plan: GattPlan) -> None:
    """--dry-run: the GAtt settings, the data's figures when it exists, and the SFT plan on it."""
    from llamactl.config import dump_toml
    from llamactl.stages import sft
    from llamactl.ui import console, table

    console.print(dump_toml({"gatt": plan.cfg}), markup=False)
    if plan.data is None:
        c = plan.cfg
        console.print(f"GAtt data not built yet: {c.dialogues} dialogues of up to {c.turns} turns would be sampled "
                      f"with {plan.checkpoint} into {Path(c.out) / DATA_FILE}", markup=False)
        return
    console.print(table("GAtt data", ["", "value"], data_rows(plan.data)))
    sft.describe(plan.sft)


def run(plan: GattPlan, ctx, *, resume: bool = False, show_progress: bool = True):
    """Train the GAtt set through the sft stage."""
    from llamactl.stages import sft
    from llamactl.ui import console, table

    if ctx.is_main and not resume:
        console.print(table("GAtt data", ["", "value"], data_rows(plan.data)))
    return sft.run(plan.sft, ctx, resume=resume, show_progress=show_progress, stage="gatt")
