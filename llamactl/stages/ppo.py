"""`llamactl rlhf ppo`: PPO with the paper's reward (section 3.2.3).

Five models: the policy (trains, from --policy), the reference pi_0 (a frozen copy of the initial
policy), the value model (trains, a per-token scalar head initialised from the helpfulness RM), and the
two reward models (frozen, `rewards.RewardModels`). All five live in the training layout (tp / pp / dp):
rollouts are sampled by the training policy itself (`generation.generate` under its ParallelContext,
tensor-parallel KV cache), never by a consolidated copy. One iteration:

    prompts  -> rollouts (policy, temperature --temperature)            time_generate
             -> log pi (training model, recomputed), log pi_0, V        time_score
                R_c (RewardModels), WHITEN(LOGIT(R_c)) at the last token - beta * KL per token,
                GAE (gamma 1, lambda 0.95), advantages whitened over valid tokens
             -> minibatches: one Trainer.step of the policy (clipped surrogate) and one of the
                value model (clipped value loss) per minibatch            time_train

Everything per token lives in llamactl/ppo.py (pure functions), one iteration in stages/ppo_iteration.py.
Responses that hit --max-new-tokens
without EOS are scored as they are (--truncated score) or get a fixed low reward (--truncated penalize).
Held-out prompts (--val-prompts) are answered greedily every --eval-every iterations; the run stops
early when their mean R_c has not improved for --patience evaluations; every new best is saved and kept
as RUN/best (a complete policy checkpoint, hard-linked; RUN/best.json names its iteration). The run dir
holds policy/ and value/ (checkpoints, latest = the last iteration) and one shared state (runstate.py),
so both models, both optimizers, RNG and the prompt position resume together, exactly.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from llamactl.config import ModelConfig, ParallelConfig, apply_overrides, load_sections, section_config
from llamactl.errors import LlamactlError
# one iteration's pieces live in ppo_iteration.py; re-exported here for the tests and bench/ppo_throughput.py
from llamactl.stages.ppo_iteration import (Models, PPOBatch, PromptOrder, decode_copy, drop_packed_weights,  # noqa: F401
                                           evaluate, iteration, make_batches, policy_loss_fn, response_texts,
                                           rollout, score_rollouts, sync_sampler, value_loss_fn)

SECTIONS = ("ppo", "parallel")
PAPER_BATCH = 512
PAPER_MINIBATCH = 64
PAPER_LR = 1e-6
# beta of the KL penalty per size (paper 3.2.3: 0.01 for 7b / 13b, 0.005 for 34b / 70b); tiny / small as 7b
BETA = {"tiny": 0.01, "small": 0.01, "7b": 0.01, "13b": 0.01, "34b": 0.005, "70b": 0.005}
SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "kv_heads", "ffn_dim")
TRUNCATED = ("score", "penalize")


@dataclass
class PPOConfig:
    """Resolved settings of one PPO run (written to the run dir as config.toml). Defaults are the paper's."""

    size: Optional[str] = None        # preset the policy must have; sets beta (default: the policy's shape)
    policy: str = ""                  # initial policy (RS / SFT checkpoint); also the reference pi_0
    rm_helpful: str = ""              # helpfulness RM; also the value model's initialisation
    rm_safety: str = ""
    prompts: str = ""
    val_prompts: str = ""
    out: str = "runs/ppo"
    iterations: int = 100
    batch_size: int = PAPER_BATCH     # prompts per iteration (all dp ranks)
    minibatch: int = PAPER_MINIBATCH  # rollouts per optimizer step (one step per minibatch)
    micro_batch: int = 8              # rows per forward / backward
    ppo_epochs: int = 1               # passes over an iteration's rollouts
    lr: float = PAPER_LR              # constant
    value_lr: Optional[float] = None  # value model's lr (default: lr)
    freeze_policy: int = 0            # first iterations train only the value model (its baseline settles first)
    weight_decay: float = 0.1
    clip: float = 1.0                 # gradient-norm clip
    beta: Optional[float] = None      # KL coefficient (default per size)
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    rollout_batch: int = 0            # rows decoded together (0: the rank's whole batch)
    truncated: str = "score"          # score | penalize
    truncated_reward: float = -3.0    # whitened reward of a truncated response under penalize
    eval_every: int = 0
    val_limit: int = 0                # held-out prompts used (0: all)
    patience: int = 3                 # evaluations without improvement before stopping (0: never)
    save_every: int = 10              # iterations
    keep: int = 3
    seed: int = 0
    save_dtype: str = "bfloat16"
    device: str = "auto"


@dataclass
class Plan:
    cfg: PPOConfig
    model: ModelConfig                # the policy's
    value_model: ModelConfig          # the helpfulness RM's (the value model)
    parallel: ParallelConfig
    size: str                         # preset name or "custom"
    tokenizer: Path
    prompt_count: int
    val_count: int
    steps_per_iteration: int
    extra: dict = field(default_factory=dict)


def size_of(cfg: ModelConfig) -> str | None:
    """The preset whose shape (vocabulary aside) the model config has, or None."""
    from llamactl.config import PRESETS

    for name, p in PRESETS.items():
        if all(getattr(cfg, f) == getattr(p, f) for f in SHAPE_FIELDS):
            return name
    return None


def default_beta(size: str, cfg: ModelConfig) -> float:
    if size in BETA:
        return BETA[size]
    return 0.005 if cfg.num_params() > 20e9 else 0.01


def _check(c: PPOConfig) -> None:
    ints = {"iterations": 1, "freeze_policy": 0, "batch_size": 1, "minibatch": 1, "micro_batch": 1, "ppo_epochs": 1, "max_new_tokens": 1,
            "rollout_batch": 0, "eval_every": 0, "val_limit": 0, "patience": 0, "save_every": 0, "keep": 1, "seed": 0}
    for name, low in ints.items():
        v = getattr(c, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise LlamactlError(f"{name} must be an integer >= {low}, got {v!r} (--{name.replace('_', '-')})")
    for name in ("lr", "weight_decay", "clip", "cliprange", "cliprange_value", "gamma", "lam", "temperature", "top_p"):
        v = getattr(c, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise LlamactlError(f"{name} must be a number >= 0, got {v!r} (--{name.replace('_', '-')})")
    if c.lr <= 0:
        raise LlamactlError(f"learning rate must be > 0, got {c.lr} (--lr)")
    if c.value_lr is not None and (not math.isfinite(c.value_lr) or c.value_lr <= 0):
        raise LlamactlError(f"value learning rate must be > 0, got {c.value_lr} (--value-lr)")
    if not 0 < c.top_p <= 1:
        raise LlamactlError(f"top_p must be in (0, 1], got {c.top_p} (--top-p)")
    if c.lam > 1 or c.gamma > 1:
        raise LlamactlError(f"gamma and lambda must be in [0, 1], got {c.gamma}, {c.lam} (--gamma / --lam)")
    if c.beta is not None and (not math.isfinite(c.beta) or c.beta < 0):
        raise LlamactlError(f"beta must be >= 0, got {c.beta} (--beta)")
    if c.truncated not in TRUNCATED:
        raise LlamactlError(f"unknown --truncated {c.truncated!r}; score or penalize (--truncated)")
    if not math.isfinite(c.truncated_reward):
        raise LlamactlError(f"truncated_reward must be finite, got {c.truncated_reward} (--truncated-reward)")
    from llamactl.trainer import SAVE_DTYPES

    if c.save_dtype not in SAVE_DTYPES:
        raise LlamactlError(f"unknown save dtype {c.save_dtype!r}; one of {', '.join(SAVE_DTYPES)} (--save-dtype)")
    if c.minibatch > c.batch_size or c.batch_size % c.minibatch:
        raise LlamactlError(f"--batch-size {c.batch_size} must be a multiple of --minibatch {c.minibatch} (--minibatch)")
    if c.eval_every and not c.val_prompts:
        raise LlamactlError(f"--eval-every {c.eval_every} needs held-out prompts (--val-prompts FILE.jsonl)")


def _count(path: Path, flag: str) -> int:
    from llamactl.chat_data import read_prompts

    return sum(1 for _ in read_prompts(path, flag))


def resolve(flags: dict[str, Any], config_file: Path | None = None, parallel: dict[str, Any] | None = None) -> Plan:
    """paper defaults <- config file ([ppo], [parallel]) <- flags (None = not given); every check that needs
    no weights happens here, before any process starts."""
    from llamactl import checkpoint
    from llamactl.config import PRESETS
    from llamactl.stages.runner import resolve_parallel

    file = load_sections(config_file, SECTIONS)
    c = section_config(PPOConfig(), "ppo", file, flags, config_file)
    par = resolve_parallel(file.get("parallel", {}), parallel or {}, config_file)
    _check(c)
    if c.size is not None and c.size not in PRESETS:
        raise LlamactlError(f"unknown size {c.size!r}; choose one of {', '.join(PRESETS)} (--size)")
    for name, flag in (("policy", "--policy"), ("rm_helpful", "--rm-helpful"), ("rm_safety", "--rm-safety")):
        v = getattr(c, name)
        if not v:
            raise LlamactlError(f"no {name.replace('_', ' ')} checkpoint given ({flag} CKPT)")
        if not Path(v).exists():
            raise LlamactlError(f"checkpoint directory not found: {v} ({flag})")
        setattr(c, name, str(checkpoint.resolve(v, flag)))
    if not c.prompts:
        raise LlamactlError("no prompts given (--prompts FILE.jsonl)")
    for v, flag in ((c.prompts, "--prompts"), (c.val_prompts, "--val-prompts")):
        if v and not Path(v).is_file():
            raise LlamactlError(f"prompts file not found: {v} ({flag})")
    model, head = checkpoint.load_config(Path(c.policy))
    if head != "lm":
        raise LlamactlError(f"--policy needs a language-model checkpoint, {c.policy} has a {head} head (--policy)")
    found = size_of(model)
    if c.size is not None and found != c.size:
        p = PRESETS[c.size]
        diff = next(f for f in SHAPE_FIELDS if getattr(model, f) != getattr(p, f))
        raise LlamactlError(f"--size {c.size} needs a {c.size} policy, but {c.policy} has {diff}="
                            f"{getattr(model, diff)} ({c.size}: {getattr(p, diff)}) (--policy / --size)")
    size = c.size or found or "custom"
    if c.beta is None:
        c.beta = default_beta(size, model)
    value_model, vhead = checkpoint.load_config(Path(c.rm_helpful))
    if vhead != "reward":
        raise LlamactlError(f"--rm-helpful needs a reward checkpoint, {c.rm_helpful} has a {vhead} head (--rm-helpful)")
    dp = par.dp
    if c.batch_size % dp or c.minibatch % dp:
        raise LlamactlError(f"--batch-size {c.batch_size} and --minibatch {c.minibatch} must be multiples of the "
                            f"{dp} data-parallel ranks (--nproc / --tp / --pp)")
    tok = checkpoint.tokenizer_path(Path(c.policy))
    n = _count(Path(c.prompts), "--prompts")
    nv = _count(Path(c.val_prompts), "--val-prompts") if c.val_prompts else 0
    steps = c.ppo_epochs * (c.batch_size // c.minibatch)
    return Plan(c, model, value_model, par, size, tok, n, nv, steps)


# ---- dry run ------------------------------------------------------------------------------------------
def _print_config(c: PPOConfig, par: ParallelConfig, model: ModelConfig | None) -> None:
    from llamactl.config import dump_toml
    from llamactl.ui import console

    sections: dict[str, Any] = {"ppo": c}
    if model is not None:
        sections["model"] = model
    sections["parallel"] = par
    console.print(dump_toml(sections), markup=False)


def _print_plan(size: str, model: ModelConfig, c: PPOConfig, par: ParallelConfig, gpus: int | None,
                search: bool = False) -> None:
    """The planner's memory per GPU for the five models and the time of one iteration at this layout (with
    `search` and no --tp / --pp: the smallest layout that fits on --gpus, default 8, or 64 for 34b / 70b)."""
    from llamactl.plan import make_plan, print_plan
    from llamactl.ui import console, table

    given = not search or par.tp > 1 or par.pp > 1
    if search:
        n = gpus or max(par.world, par.tp * par.pp, 8 if model.num_params() < 20e9 else 64)
    else:
        n = gpus or max(par.world, par.tp * par.pp)
    seq = min(4096, model.max_seq_len)
    p = make_plan(size, "ppo", gpus=n, seq_len=seq, tp=par.tp if given else None, pp=par.pp if given else None,
                  cfg=model, rows=c.batch_size)
    print_plan(p)
    ch = p.chosen
    rows = [["prompts / iteration", c.batch_size], ["minibatch (one optimizer step each)", c.minibatch],
            ["optimizer steps / iteration (policy and value)", c.ppo_epochs * (c.batch_size // c.minibatch)],
            ["lr (constant)", f"{c.lr:g}"], ["beta (KL)", f"{c.beta:g}"], ["clip (ratio / value)", f"{c.cliprange} / {c.cliprange_value}"],
            ["GAE gamma / lambda", f"{c.gamma} / {c.lam}"]]
    if ch is not None:
        rows.append(["layout", f"tp {ch.tp} x pp {ch.pp} x dp {ch.dp}"])
        rows.append(["memory per GPU (5 models)", f"{ch.memory.total / 2**30:.1f} GiB"])
    if p.step_time is not None:
        rows.append(["iteration time (FLOPs at the planner's MFU)", f"{p.step_time:.1f} s"])
    console.print(table(f"PPO plan ({size}, {n} GPUs)", ["", "value"], rows))


def dry_run_without_checkpoints(flags: dict[str, Any], par: ParallelConfig, gpus: int | None = None) -> None:
    """`rlhf ppo --size 70b --dry-run` before any checkpoint exists: the preset's shape, the paper's settings
    and the plan; nothing is allocated (the planner builds its models on the meta device)."""
    from llamactl.config import preset

    c = apply_overrides(PPOConfig(), {k: v for k, v in flags.items() if v is not None}, "flags")
    size = c.size or "tiny"
    model = preset(size)
    if c.beta is None:
        c.beta = default_beta(size, model)
    _check(c)
    from llamactl.plan import layout_error

    err = layout_error(model, par.tp, par.pp)
    if err:
        raise LlamactlError(err)
    _print_config(c, par, model)
    _print_plan(size, model, c, par, gpus, search=True)


def describe(plan: Plan, gpus: int | None = None) -> None:
    from llamactl.ui import console, table

    c, par = plan.cfg, plan.parallel
    _print_config(c, par, plan.model)
    rows = [["policy / reference", f"{c.policy} ({plan.size}, {plan.model.num_params():,} parameters)"],
            ["value model (from)", c.rm_helpful], ["reward models", f"{c.rm_helpful}, {c.rm_safety}"],
            ["prompts", f"{plan.prompt_count:,} ({c.prompts})"],
            ["held-out prompts", f"{plan.val_count:,} ({c.val_prompts})" if c.val_prompts else "-"],
            ["iterations", c.iterations], ["truncated responses", c.truncated]]
    console.print(table("PPO run", ["", "value"], rows))
    _print_plan(plan.size, plan.model, c, par, gpus)



# ---- run --------------------------------------------------------------------------------------------
def encode_prompts(tok, items, limit: int, max_new: int, flag: str) -> list[list[int]]:
    from llamactl.generation import encode_prompt

    out = []
    for it in items:
        ids = encode_prompt(tok, {"dialog": it.messages}, raw=False, system=None, where=f" ({it.where}, {flag})")
        if len(ids) + max_new > limit:
            raise LlamactlError(f"prompt of {len(ids)} tokens + --max-new-tokens {max_new} exceeds the policy's "
                                f"context of {limit} ({it.where}, {flag})")
        out.append(ids)
    return out


def _train_config(c: PPOConfig, plan: Plan, lr: float | None = None):
    from llamactl.trainer import TrainConfig

    return TrainConfig(steps=c.iterations * plan.steps_per_iteration, lr=lr or c.lr, warmup=0, schedule="constant",
                       weight_decay=c.weight_decay, clip=c.clip, keep=c.keep, seed=c.seed, zero=plan.parallel.zero,
                       sequence_parallel=plan.parallel.sequence_parallel,
                       overlap_grad_reduce=plan.parallel.overlap_grad_reduce, save_dtype=c.save_dtype)


def make_trainers(m: "Models", plan: Plan) -> dict:
    """The policy's and the value model's Trainer (AdamW as the paper, constant lr; --value-lr for the value)."""
    from llamactl.trainer import Trainer

    c = plan.cfg
    return {"policy": Trainer(m.policy, m.ctx, _train_config(c, plan), policy_loss_fn(m.policy, m.ctx, c.cliprange)),
            "value": Trainer(m.value, m.ctx, _train_config(c, plan, c.value_lr), value_loss_fn(c.cliprange_value))}


def load_models(plan: Plan, ctx, device: str, reward_models=None) -> Models:
    """Policy (trainable, decode layout on CPU), reference (frozen), value (from the helpfulness RM), RMs."""
    from llamactl.checkpoint import load_model
    from llamactl.tokenizer import Tokenizer

    c = plan.cfg
    policy, _ = load_model(c.policy, ctx, device=device, head="lm", flag="--policy")
    reference, _ = load_model(c.policy, ctx, device=device, head="lm", flag="--policy")
    reference.eval().requires_grad_(False)
    value, _ = load_model(c.rm_helpful, ctx, device=device, head="value", flag="--rm-helpful")
    if reward_models is None:
        from llamactl.rewards import RewardModels

        reward_models = RewardModels.load(Path(c.rm_helpful), Path(c.rm_safety), ctx=ctx, device=device)
    return Models(policy, reference, value, reward_models, Tokenizer.load(plan.tokenizer), ctx, decode_copy(policy))


BEST_DIR = "best"          # RUN/best: the policy checkpoint of the best held-out R_c (early stopping's result)
BEST_FILE = "best.json"


def keep_best(out: Path, state_dir: Path, info: dict) -> None:
    """Make RUN/best a complete copy of the policy checkpoint saved with `state_dir` (hard links where the
    filesystem allows: checkpoint files are never rewritten in place, so a link stays valid when the run
    later rotates that step away), replacing the previous best atomically; RUN/best.json says which."""
    import os
    import shutil

    from llamactl.rundir import remove_checkpoint

    src = Path(out) / "policy" / Path(state_dir).name
    tmp = Path(out) / f".{BEST_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)

    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, tmp, copy_function=link)
    remove_checkpoint(Path(out) / BEST_DIR)
    tmp.rename(Path(out) / BEST_DIR)
    (Path(out) / BEST_FILE).write_text(json.dumps({**info, "checkpoint": str(src)}) + "\n")


def _write_row(path: Path, row: dict, tb) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    if tb is not None:
        prefix = "ppo" if row.get("split", "train") == "train" else "ppo/val"
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                tb.add_scalar(f"{prefix}/{k}", v, row["step"])


@dataclass
class PPOResult:
    iteration: int
    stopped_by: str | None
    checkpoint: Path | None
    rows: list

    @property
    def exit_code(self) -> int:
        from llamactl.trainer import STOP_EXIT_CODES

        return STOP_EXIT_CODES.get(self.stopped_by or "", 0)


def run(plan: Plan, ctx, *, resume: bool = False, show_progress: bool = True, reward_models=None) -> PPOResult:
    """This rank's PPO run: load the five models, iterate, save (policy/, value/, shared state) every
    --save-every iterations, at the end, at early stopping and on SIGINT / SIGTERM."""
    from llamactl.chat_data import read_prompts
    from llamactl.config import dump_toml
    from llamactl.rundir import truncate_metrics
    from llamactl.runstate import load_run_state, save_run_state, state_steps
    from llamactl.trainer import SignalFlag, Trainer, rng_state, seed_everything, set_rng_state, stop_reason, _tensorboard
    from llamactl.ui import console, err_console

    c = plan.cfg
    out = Path(c.out)
    device = c.device if c.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and ctx.world_size > 1:
        device = f"cuda:{torch.cuda.current_device()}"
    if not resume and state_steps(out):
        raise LlamactlError(f"run dir already holds a PPO run ({out}); pass --resume to continue or choose another --out")
    m = load_models(plan, ctx, device, reward_models)
    items = list(read_prompts(Path(c.prompts), "--prompts"))
    prompts = encode_prompts(m.tok, items, plan.model.max_seq_len, c.max_new_tokens, "--prompts")
    val_items = list(read_prompts(Path(c.val_prompts), "--val-prompts")) if c.val_prompts else []
    if c.val_limit:
        val_items = val_items[:c.val_limit]
    val_prompts = encode_prompts(m.tok, val_items, plan.model.max_seq_len, c.max_new_tokens, "--val-prompts")
    trainers = make_trainers(m, plan)
    order = PromptOrder(len(prompts), c.seed)
    start, best, bad = 0, -math.inf, 0
    metrics = out / "metrics.jsonl"
    if resume:
        state = load_run_state(out, trainers, ctx)
        if state is None:
            raise LlamactlError(f"nothing to resume: no complete PPO state in {out} (--resume, --out)")
        order.load_state_dict(state["prompts"])
        set_rng_state(state["rng"])
        start, best, bad = int(state["iteration"]), float(state["best"]), int(state["bad"])
        if ctx.is_main:
            truncate_metrics(metrics, start)
            err_console.print(f"resuming from iteration {start} ({out})")
    else:
        seed_everything(c.seed)
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            metrics.write_text("")
    if ctx.is_main:
        (out / "config.toml").write_text(dump_toml({"ppo": c, "model": plan.model, "parallel": plan.parallel}))
    tb = _tensorboard(out) if ctx.is_main else None
    extra = {"policy_init": c.policy, "rm_helpful": c.rm_helpful, "rm_safety": c.rm_safety, "size": plan.size}

    def save(it: int) -> Path:
        shared = {"iteration": it, "prompts": order.state_dict(), "rng": rng_state(), "best": best, "bad": bad}
        return save_run_state(out, trainers, shared, ctx, keep=c.keep, tokenizer=plan.tokenizer, stage="ppo",
                              extra=extra)

    def log(row: dict) -> None:
        if ctx.is_main:
            _write_row(metrics, row, tb)

    rows: list[dict] = []
    if c.eval_every and start == 0 and val_prompts:
        row = {"step": 0, "split": "val", **evaluate(m, val_items, val_prompts, c)}
        log(row)
        rows.append(row)
        best = row["reward_combined"]
    stopped, last = None, None
    it = start
    with SignalFlag() as flag:
        while it < c.iterations:
            mine = order.take(c.batch_size)[ctx.dp_rank * (c.batch_size // ctx.dp):(ctx.dp_rank + 1) * (c.batch_size // ctx.dp)]
            row = iteration(m, trainers, items, prompts, mine, it, c)
            it += 1
            log(row)
            rows.append(row)
            if show_progress and ctx.is_main:
                console.print(f"ppo {it}/{c.iterations}: R_c {row['reward_combined']:.4f} kl {row['kl']:.4f} "
                              f"loss {row['loss']:.4f} value {row['value_loss']:.4f} len {row['response_len']:.1f} "
                              f"gen {row['time_generate']:.1f}s score {row['time_score']:.1f}s train {row['time_train']:.1f}s",
                              markup=False)
            early = improved = False
            if c.eval_every and val_prompts and (it % c.eval_every == 0 or it == c.iterations):
                vrow = {"step": it, "split": "val", **evaluate(m, val_items, val_prompts, c)}
                log(vrow)
                rows.append(vrow)
                if vrow["reward_combined"] > best:
                    best, bad, improved = vrow["reward_combined"], 0, True
                elif it > c.freeze_policy:  # an unchanged (frozen) policy is not a failure to improve
                    bad += 1
                    early = bool(c.patience) and bad >= c.patience
            if improved or (c.save_every and it % c.save_every == 0 and it < c.iterations):
                last = save(it)
            if improved and ctx.is_main:
                keep_best(out, last, {"iteration": it, "reward_combined": best})
            stopped = stop_reason(it, c.iterations, flag, early, "early_stopping")
            if stopped == "early_stopping":
                if ctx.is_main:
                    console.print(f"early stopping after iteration {it}: held-out R_c has not improved on "
                                  f"{best:.4f} for {bad} evaluations (--patience {c.patience}); "
                                  + (f"the best policy is {out / BEST_DIR} ({BEST_FILE})" if (out / BEST_DIR).is_dir()
                                     else "no iteration beat the initial policy"))
            if stopped:
                break
        if not state_steps(out) or state_steps(out)[-1] != trainers["policy"].global_step:
            last = save(it)
    if tb is not None:
        tb.close()
    if stopped in ("SIGINT", "SIGTERM") and ctx.is_main:
        console.print(f"stopped by {stopped} after iteration {it}; state saved (continue with --resume)")
    result_stop = None if stopped == "early_stopping" else stopped
    return PPOResult(it, result_stop, last, rows)
