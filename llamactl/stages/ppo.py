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

Everything per token lives in llamactl/ppo.py (pure functions). Responses that hit --max-new-tokens
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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from llamactl.config import ModelConfig, ParallelConfig, apply_overrides, load_toml
from llamactl.errors import LlamactlError

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

    file = load_toml(config_file) if config_file else {}
    unknown = set(file) - set(SECTIONS)
    if unknown:
        raise LlamactlError(f"unknown sections {sorted(unknown)} (--config {config_file}); use [ppo], [parallel]")
    c = apply_overrides(PPOConfig(), file.get("ppo", {}), f"[ppo] in {config_file}")
    c = apply_overrides(c, {k: v for k, v in flags.items() if v is not None}, "flags")
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


# ---- batches ----------------------------------------------------------------------------------------
class PPOBatch:
    """A micro-batch of rollouts for Trainer.step: right-padded tokens (B, T) with lengths, and per-token
    (B, T-1) tensors aligned with token_logprobs: mask (response tokens), old log-probs, advantages,
    old values, returns."""

    def __init__(self, tokens, lengths, mask, old_logprobs, advantages, old_values, returns):
        self.tokens, self.lengths, self.mask = tokens, lengths, mask
        self.old_logprobs, self.advantages = old_logprobs, advantages
        self.old_values, self.returns = old_values, returns

    @property
    def num_valid(self) -> int:
        return int(self.mask.sum())

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def model_inputs(self) -> dict:
        return {}  # right padding: the plain causal path (model.padding_layout)

    def to(self, device) -> "PPOBatch":
        return PPOBatch(*(x.to(device) for x in (self.tokens, self.lengths, self.mask, self.old_logprobs,
                                                  self.advantages, self.old_values, self.returns)))


def make_batches(roll: dict, rows: list[int], micro: int) -> list[PPOBatch]:
    """Micro-batches of `micro` rows of the rollout tensors, each cut to its longest row."""
    out = []
    for k in range(0, len(rows), micro):
        idx = torch.tensor(rows[k:k + micro], dtype=torch.long)
        lengths = roll["lengths"][idx]
        t = int(lengths.max())
        out.append(PPOBatch(roll["tokens"][idx, :t], lengths, roll["mask"][idx, :t - 1], roll["logprobs"][idx, :t - 1],
                            roll["advantages"][idx, :t - 1], roll["values"][idx, :t - 1], roll["returns"][idx, :t - 1]))
    return out


ENTROPY_BLOCK = 1024  # tokens per block of the entropy metric (logits of one block at a time)


def policy_loss_fn(model, ctx, cliprange: float):
    """loss_fn for the policy's Trainer: the clipped surrogate from the final hidden states (the fused,
    vocab-parallel head: no full logits), plus entropy (a metric) of the current policy on response tokens."""
    from llamactl import ppo
    from llamactl.scoring import hidden_logprobs

    def loss_fn(hidden, batch: PPOBatch):
        tokens = batch.tokens
        logp = hidden_logprobs(hidden[:, :-1], model.output, tokens[:, 1:], batch.mask, ctx)
        loss, extras = ppo.policy_loss(logp, batch.old_logprobs, batch.advantages, batch.mask, cliprange)
        with torch.no_grad():
            h = hidden[:, :-1][batch.mask]
            ent = torch.zeros((), dtype=torch.float32, device=h.device)
            group = ctx.tp_group if ctx.tp > 1 else None
            for s in range(0, h.shape[0], ENTROPY_BLOCK):
                ent = ent + ppo.entropy_from_logits(model.output(h[s:s + ENTROPY_BLOCK]), group).sum()
        return loss, {**extras, "entropy": ent}

    loss_fn.needs_hidden = True
    return loss_fn


def value_loss_fn(cliprange_value: float):
    from llamactl import ppo

    def loss_fn(values, batch: PPOBatch):
        return ppo.value_loss(values[:, :-1].float(), batch.old_values, batch.returns, batch.mask, cliprange_value)

    return loss_fn


class PromptOrder:
    """Prompt indices in a seeded order per epoch; every iteration takes the next batch_size of them."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.position = n, seed, 0, 0
        self._order: np.ndarray | None = None

    def order(self) -> np.ndarray:
        if self._order is None:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        return self._order

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            if self.position >= self.n:
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
            out.append(int(self.order()[self.position]))
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "n": self.n, "seed": self.seed}

    def load_state_dict(self, s: dict) -> None:
        if int(s["n"]) != self.n or int(s["seed"]) != self.seed:
            raise LlamactlError(f"resume with {self.n} prompts and --seed {self.seed}, but the run had {int(s['n'])} "
                                f"prompts and seed {int(s['seed'])} (--prompts / --seed)")
        self.epoch, self.position, self._order = int(s["epoch"]), int(s["position"]), None


# ---- one iteration's pieces -------------------------------------------------------------------------
@dataclass
class Models:
    policy: Any
    reference: Any
    value: Any
    rewards: Any          # rewards.RewardModels (or anything with its score())
    tok: Any
    ctx: Any
    sampler: Any = None   # CPU: the policy's weights in decode layout (see decode_copy); else the policy


def decode_copy(policy):
    """On CPU, a second instance of this rank's policy shard whose weights are kept in `decode_layout`
    (column-major, fused q|k|v and w1|w3, huge pages): what `llamactl generate` samples with.

    The training tensors themselves must stay contiguous: torch's fused CPU AdamW (the trainer's) pairs
    parameter, gradient and moment elements by memory order, so it mis-updates a column-major or fused
    view parameter whose gradient is row-major. The copy has the same layout (tp / pp shard) and is
    refreshed in place from the training weights before every rollout (`sync_sampler`): no gather, no
    consolidation. On GPU decode_layout changes nothing, so the training model samples itself."""
    from llamactl.generation import decode_layout
    from llamactl.model import Transformer

    p0 = next(policy.parameters())
    if p0.device.type != "cpu":
        return policy
    with torch.device("meta"):
        copy = Transformer(policy.cfg, policy.ctx, policy.head, dtype=p0.dtype)
    copy.to_empty(device=p0.device)
    with torch.no_grad():
        for a, b in zip(copy.parameters(), policy.parameters()):
            a.copy_(b)
    copy.requires_grad_(False)
    decode_layout(copy)
    return copy.eval()


@torch.no_grad()
def sync_sampler(m: "Models") -> None:
    """Copy the training policy's current weights into the decode copy (in place: fused views stay fused)."""
    if m.sampler is m.policy:
        return
    for a, b in zip(m.sampler.parameters(), m.policy.parameters()):
        a.copy_(b)
    drop_packed_weights(m.sampler)


def _dp_sum(values: list[float], ctx) -> list[float]:
    """Sum floats over data-parallel ranks (identity at dp 1)."""
    if ctx.dp == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=ctx.dp_group)
    return t.tolist()


def drop_packed_weights(model) -> None:
    """Forget the oneDNN-packed copies inference keeps of the decode-layout weights (model.packed_weight).

    A packed copy is re-made when its source tensor's version moves, but the fused q|k|v and w1|w3
    matrices of `fuse_projections` are written through the parameters (views set with `.data =`), whose
    in-place writes (`sync_sampler`) do not move the fused matrix's version counter: after a training
    step its packed copy would be stale. Dropping them after every sync re-packs from the current
    weights (once per iteration)."""
    for mod in model.modules():
        mod.__dict__.pop("_llamactl_packed", None)


def rollout(m: Models, prompts: list[list[int]], seeds: list[int], c: PPOConfig, *, temperature: float):
    """Sample every prompt from the training policy in its training layout; (Samples, generated tokens)."""
    from llamactl.generation import generate

    sync_sampler(m)
    amp = torch.bfloat16 if next(m.policy.parameters()).device.type == "cuda" else None
    samples = generate(m.sampler, prompts, max_new_tokens=c.max_new_tokens, temperature=temperature, top_p=c.top_p,
                       seeds=seeds, eos_id=m.tok.eos_id, ctx=m.ctx, batch_size=c.rollout_batch or None,
                       autocast_dtype=amp)
    return samples, sum(len(s.tokens) for s in samples)


def response_texts(tok, samples) -> list[str]:
    return [tok.decode(s.tokens[:-1] if s.finish_reason == "stop" else s.tokens) for s in samples]


@torch.no_grad()
def score_rollouts(m: Models, roll, micro: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log pi, log pi_0, V) per token (B, T-1) of right-padded rollouts, micro rows at a time, by the
    training models (not the sampler's numbers)."""
    from llamactl.scoring import sequence_scores, token_logprobs

    lp, ref, val = [], [], []
    for s in range(0, roll.tokens.shape[0], micro):
        tk, ln = roll.tokens[s:s + micro], roll.lengths[s:s + micro]
        lp.append(token_logprobs(m.policy, tk, ln, m.ctx).cpu())
        ref.append(token_logprobs(m.reference, tk, ln, m.ctx).cpu())
        val.append(sequence_scores(m.value, tk, ln, m.ctx, per_token=True)[:, :-1].cpu())
    return torch.cat(lp), torch.cat(ref), torch.cat(val)


def evaluate(m: Models, items, prompts: list[list[int]], c: PPOConfig) -> dict:
    """Held-out prompts answered greedily: mean R_h, R_s, R_c (sigma space), mean per-sequence KL to pi_0 and
    response length; this rank's share of the prompts, summed over dp."""
    from llamactl import ppo
    from llamactl.generation import collate

    ctx = m.ctx
    mine = list(range(len(prompts)))[ctx.dp_rank::ctx.dp]
    sums = [0.0] * 6
    if mine:
        samples, _ = rollout(m, [prompts[i] for i in mine], [0] * len(mine), c, temperature=0.0)
        r = m.rewards.score([items[i].messages for i in mine], response_texts(m.tok, samples),
                            [bool(items[i].safety) for i in mine])
        roll = collate(samples, pad_id=0)
        lp, ref, _ = score_rollouts(m, roll, c.micro_batch)
        mask = roll.mask[:, 1:]
        kl = ppo.sequence_sums(ppo.kl_per_token(lp, ref, mask), mask)
        sums = [float(r.helpful.sum()), float(r.safety.sum()), float(r.combined.sum()), float(kl.sum()),
                float(sum(len(s.tokens) for s in samples)), float(len(mine))]
    h, s, comb, kl, ln, n = _dp_sum(sums, ctx)
    n = max(n, 1.0)
    return {"reward_helpful": h / n, "reward_safety": s / n, "reward_combined": comb / n, "kl": kl / n,
            "response_len": ln / n}


def iteration(m: Models, trainers: dict, items, prompts: list[list[int]], rows: list[int], it: int,
              c: PPOConfig) -> dict:
    """One PPO iteration on this rank's prompt rows (global batch positions `rows` of iteration `it`);
    returns the metrics row (means over the global batch)."""
    from llamactl import ppo
    from llamactl.generation import collate, sequence_seed
    from llamactl.rewards import ppo_reward

    ctx = m.ctx
    group = ctx.dp_group if ctx.dp > 1 else None
    idx = [r for r in rows]
    b0 = ctx.dp_rank * (c.batch_size // ctx.dp)
    seeds = [sequence_seed(c.seed, it * c.batch_size + b0 + k) for k in range(len(idx))]
    t0 = time.perf_counter()
    samples, gen_tokens = rollout(m, [prompts[i] for i in idx], seeds, c, temperature=c.temperature)
    t1 = time.perf_counter()
    rw = m.rewards.score([items[i].messages for i in idx], response_texts(m.tok, samples),
                         [bool(items[i].safety) for i in idx])
    truncated = torch.tensor([s.finish_reason != "stop" for s in samples])
    score = ppo_reward(rw.combined, group=group).float()
    if c.truncated == "penalize":
        score = torch.where(truncated, torch.full_like(score, c.truncated_reward), score)
    roll = collate(samples, pad_id=0)
    logp, ref, values = score_rollouts(m, roll, c.micro_batch)
    mask = roll.mask[:, 1:]
    kl = ppo.kl_per_token(logp, ref, mask)
    rewards = ppo.token_rewards(score, kl, mask, c.beta)
    adv, ret = ppo.gae(rewards, values, mask, c.gamma, c.lam)
    adv = ppo.masked_whiten(adv, mask, group=group)
    data = {"tokens": roll.tokens, "lengths": roll.lengths, "mask": mask, "logprobs": logp, "advantages": adv,
            "values": values, "returns": ret}
    # explained variance over the global batch: moments of R and R - V summed over dp
    mom = [float(mask.sum()), float((ret * mask).sum()), float((ret * ret * mask).sum()),
           float(((ret - values) * mask).sum()), float(((ret - values) ** 2 * mask).sum())]
    t2 = time.perf_counter()
    per_rank_mb = c.minibatch // ctx.dp
    frozen = it < c.freeze_policy
    sums: dict[str, float] = {}
    n_steps = 0
    train_tokens = 0
    for ep in range(c.ppo_epochs):
        perm = np.random.default_rng([c.seed, it, ep, ctx.dp_rank]).permutation(len(idx)).tolist()
        for k in range(0, len(perm), per_rank_mb):
            mb = make_batches(data, perm[k:k + per_rank_mb], c.micro_batch)
            if frozen:  # the policy's loss and metrics on this minibatch, no update
                po = trainers["policy"].evaluate(mb)
                po.grad_norm, po.lr, po.tokens = 0.0, 0.0, 0
            else:
                po = trainers["policy"].step(mb)
            vo = trainers["value"].step(mb)
            n_steps += 1
            train_tokens += po.tokens
            for key, v in (("loss", po.loss), ("grad_norm", po.grad_norm), ("value_loss", vo.loss),
                           ("value_grad_norm", vo.grad_norm), *po.extras.items(), *vo.extras.items()):
                sums[key] = sums.get(key, 0.0) + float(v)
            lr = po.lr
    t3 = time.perf_counter()
    seq_kl = ppo.sequence_sums(kl, mask)
    n_resp = float(len(idx))
    glob = _dp_sum([float(rw.helpful.sum()), float(rw.safety.sum()), float(rw.combined.sum()), float(score.sum()),
                    float(seq_kl.sum()), float(sum(len(s.tokens) for s in samples)), float(truncated.sum()), n_resp,
                    float(gen_tokens), *mom], ctx)
    h, s, comb, wh, klsum, ln, tr, n, gen_all, cnt, r1, r2, d1, d2 = glob
    var_r = r2 / cnt - (r1 / cnt) ** 2
    var_d = d2 / cnt - (d1 / cnt) ** 2
    row = {"step": it + 1, "split": "train", "loss": sums["loss"] / n_steps, "value_loss": sums["value_loss"] / n_steps,
           "lr": lr, "grad_norm": sums["grad_norm"] / n_steps, "value_grad_norm": sums["value_grad_norm"] / n_steps,
           "tokens": trainers["policy"].tokens, "tokens_per_s": train_tokens / max(t3 - t0, 1e-9),
           "reward_helpful": h / n, "reward_safety": s / n, "reward_combined": comb / n, "reward_whitened": wh / n,
           "kl": klsum / n, "entropy": sums["entropy"] / n_steps, "clip_frac": sums["clip_frac"] / n_steps,
           "approx_kl": sums["approx_kl"] / n_steps, "vf_clip_frac": sums["vf_clip_frac"] / n_steps,
           "explained_var": (1.0 - var_d / var_r) if var_r > 0 else float("nan"),
           "response_len": ln / n, "truncated_frac": tr / n, "rollout_tokens": int(gen_all),
           "rollout_tokens_per_s": gen_all / max(t1 - t0, 1e-9),
           "time_generate": t1 - t0, "time_score": t2 - t1, "time_train": t3 - t2, "policy_frozen": frozen}
    return row


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
                       save_dtype=c.save_dtype)


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
    from llamactl.trainer import SignalFlag, Trainer, fault_injection, rng_state, seed_everything, set_rng_state, _tensorboard
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
            fault_injection(it)
            if flag.name is not None and it < c.iterations:
                stopped = flag.name
                break
            if early and it < c.iterations:
                stopped = "early_stopping"
                if ctx.is_main:
                    console.print(f"early stopping after iteration {it}: held-out R_c has not improved on "
                                  f"{best:.4f} for {bad} evaluations (--patience {c.patience}); "
                                  + (f"the best policy is {out / BEST_DIR} ({BEST_FILE})" if (out / BEST_DIR).is_dir()
                                     else "no iteration beat the initial policy"))
                break
        if not state_steps(out) or state_steps(out)[-1] != trainers["policy"].global_step:
            last = save(it)
    if tb is not None:
        tb.close()
    if stopped in ("SIGINT", "SIGTERM") and ctx.is_main:
        console.print(f"stopped by {stopped} after iteration {it}; state saved (continue with --resume)")
    result_stop = None if stopped == "early_stopping" else stopped
    return PPOResult(it, result_stop, last, rows)
