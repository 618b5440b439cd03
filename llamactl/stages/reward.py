"""`llamactl rm train`: helpfulness and safety reward models (paper section 3.2.2).

A reward model is a chat checkpoint with the LM head replaced by the scalar `score` head (Hugging Face's
LlamaForSequenceClassification, num_labels 1). Its score of (prompt, response) is the head's value at the
last token of the Llama 2-Chat encoding of the dialogue: the prompt as the user turn(s), the response as
the assistant answer, EOS included -- exactly the tokens SFT trained on (`sft_data.encode_sft`).

Loss per pair: -log sigma(r_chosen - r_rejected - m(rating)), the margin from the paper's Table 27
(`MARGINS`); metrics: accuracy (r_chosen > r_rejected) and the mean score gap. Several preference files
mix with proportions (`--mix a.jsonl:0.9,b.jsonl:0.1`, the safety RM's recipe): an epoch holds as many
pairs as all files together, each file's share drawn from it in a seeded order (a file smaller than its
share is cycled, reshuffled each pass). Paper defaults: one epoch, lr 1e-5 (5e-6 at 70b), cosine to 10 %,
warmup 3 % of the steps (at least 5), 512 pairs per batch (capped by the data).

The stage adds only its data, loss and metrics: trainer.fit runs the loop and writes the checkpoints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from llamactl.chat_data import RATINGS, PreferencePair
from llamactl.config import ParallelConfig, apply_overrides, load_toml
from llamactl.errors import LlamactlError

# Table 27: margin per rating (significantly better, better, slightly better, negligibly better / unsure)
MARGINS: dict[str, tuple[float, float, float, float]] = {
    "none": (0.0, 0.0, 0.0, 0.0),
    "small": (1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0),
    "large": (3.0, 2.0, 1.0, 0.0),
}
KINDS = ("helpfulness", "safety")
# Section 3.2.2 introduces the margin for both models ("we further modify it separately for better
# helpfulness and safety reward models") and reports it helps helpfulness most on separable pairs; the
# small set is the one that does so without hurting similar pairs (appendix A.3.3), so both default to it.
DEFAULT_MARGIN = {"helpfulness": "small", "safety": "small"}
PAPER_BATCH_PAIRS = 512


def margin(rating: Optional[str], margins: str) -> float:
    """m(rating) of a margin set; an unrated pair (rating None) gets no margin."""
    if margins not in MARGINS:
        raise LlamactlError(f"unknown margin set {margins!r}; one of {', '.join(MARGINS)} (--margin)")
    return 0.0 if rating is None else MARGINS[margins][RATINGS.index(rating)]


def bucket(rating: Optional[str]) -> int:
    """Index of a rating in RATINGS (-1: unrated)."""
    return -1 if rating is None else RATINGS.index(rating)


# ---- encoding -------------------------------------------------------------------------------------
def encode_response(tok, prompt: Sequence[dict], response: str) -> list[int]:
    """Tokens a reward model scores: the chat encoding of the prompt dialogue answered by `response`."""
    from llamactl.sft_data import encode_sft

    return encode_sft(tok, list(prompt) + [{"role": "assistant", "content": response}])[0]


@dataclass
class EncodedPair:
    chosen: list[int]
    rejected: list[int]
    margin: float
    bucket: int
    where: str = ""


def encode_pairs(tok, pairs: Sequence[PreferencePair], margins: str, max_len: int, flag: str = "--data") -> list[EncodedPair]:
    """Encode every pair; one longer than the model's context is refused (its score token would be cut)."""
    out = []
    for p in pairs:
        c, r = encode_response(tok, p.prompt, p.chosen), encode_response(tok, p.prompt, p.rejected)
        n = max(len(c), len(r))
        if n > max_len:
            raise LlamactlError(f"pair has {n} tokens, more than the model's context of {max_len} ({p.where}, {flag})")
        out.append(EncodedPair(c, r, margin(p.rating, margins), bucket(p.rating), p.where))
    return out


# ---- batches --------------------------------------------------------------------------------------
class RewardBatch:
    """Micro-batch of B pairs: rows 0..B-1 the chosen, B..2B-1 the rejected responses, right-padded."""

    def __init__(self, tokens, lengths, margins, buckets):
        self.tokens, self.lengths, self.margins, self.buckets = tokens, lengths, margins, buckets

    @classmethod
    def from_pairs(cls, pairs: Sequence[EncodedPair], pad_id: int = 0) -> "RewardBatch":
        import torch

        seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        t = max(len(s) for s in seqs)
        tokens = torch.full((len(seqs), t), pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            tokens[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        return cls(tokens, torch.tensor([len(s) for s in seqs], dtype=torch.long),
                   torch.tensor([p.margin for p in pairs], dtype=torch.float32),
                   torch.tensor([p.bucket for p in pairs], dtype=torch.long))

    @property
    def num_valid(self) -> int:
        """Pairs: the unit the trainer averages the loss over."""
        return int(self.margins.numel())

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def model_inputs(self) -> dict:
        return {}  # right padding runs the plain causal path (model.padding_layout)

    def to(self, device) -> "RewardBatch":
        return RewardBatch(self.tokens.to(device), self.lengths.to(device), self.margins.to(device),
                           self.buckets.to(device))


def pair_loss(r_chosen, r_rejected, margins):
    """-log sigma(r_c - r_r - m) per pair (softplus form: exact for large gaps)."""
    import torch.nn.functional as F

    return F.softplus(-(r_chosen - r_rejected - margins))


def reward_loss(output, batch: RewardBatch):
    """loss_fn(output, batch) for the trainer: summed pair loss, summed accuracy and score gap."""
    from llamactl.model import last_token

    scores = last_token(output.float(), batch.lengths)
    n = batch.num_valid
    rc, rr = scores[:n], scores[n:]
    gap = (rc - rr).detach()
    return pair_loss(rc, rr, batch.margins).sum(), {"accuracy": (gap > 0).sum(), "score_gap": gap.sum()}


def parse_mix(text: str, flag: str = "--mix") -> list[tuple[Path, float]]:
    """'a.jsonl:0.9,b.jsonl:0.1' -> [(a, 0.9), (b, 0.1)], proportions normalised to sum 1."""
    out = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        path, sep, w = part.rpartition(":")
        try:
            weight = float(w) if sep else float("nan")
        except ValueError:
            weight = float("nan")
        if not sep or not path or not math.isfinite(weight) or weight <= 0:
            raise LlamactlError(f"bad mix entry {part!r}: give FILE:PROPORTION with a proportion > 0 ({flag})")
        out.append((Path(path), weight))
    if not out:
        raise LlamactlError(f"empty mix {text!r}: give FILE:PROPORTION,... ({flag})")
    total = sum(w for _, w in out)
    return [(p, w / total) for p, w in out]


class PairBatches:
    """The trainer's batch source: per epoch a seeded mix of the files' pairs, in steps of
    micro_batch * accum * dp pairs; each dp rank takes its slice. State: (seed, epoch, position)."""

    def __init__(self, sources: Sequence[Sequence[EncodedPair]], weights: Sequence[float], *, micro_batch: int,
                 accum: int = 1, dp: int = 1, dp_rank: int = 0, seed: int = 0, pad_id: int = 0):
        self.sources, self.weights = [list(s) for s in sources], list(weights)
        self.micro_batch, self.accum, self.dp, self.dp_rank = micro_batch, accum, dp, dp_rank
        self.seed, self.pad_id = seed, pad_id
        self.epoch, self.position = 0, 0
        self._order: Optional[list[tuple[int, int]]] = None

    @property
    def epoch_pairs(self) -> int:
        return len(self.order())

    def order(self) -> list[tuple[int, int]]:
        """(source, index) of every pair of this epoch, in training order."""
        if self._order is None:
            self._order = epoch_order([len(s) for s in self.sources], self.weights, self.seed, self.epoch)
        return self._order

    def next_step(self) -> list[RewardBatch]:
        per_rank = self.micro_batch * self.accum
        picks = []
        for _ in range(per_rank * self.dp):
            if self.position >= len(self.order()):
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
            picks.append(self.order()[self.position])
            self.position += 1
        mine = [self.sources[s][i] for s, i in picks[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]]
        mb = self.micro_batch
        return [RewardBatch.from_pairs(mine[k:k + mb], self.pad_id) for k in range(0, per_rank, mb)]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, s: dict) -> None:
        if int(s["seed"]) != self.seed:
            raise LlamactlError(f"resume with --seed {self.seed} but the run used seed {int(s['seed'])} (--seed)")
        self.epoch, self.position, self._order = int(s["epoch"]), int(s["position"]), None


def epoch_order(sizes: Sequence[int], weights: Sequence[float], seed: int, epoch: int) -> list[tuple[int, int]]:
    """One epoch of a mix: sum(sizes) pairs, round(w_i * total) from source i (the rounding remainder to the
    largest share), each source read in a seeded order and cycled when its share is larger than it."""
    total = sum(sizes)
    counts = [int(round(w * total)) for w in weights]
    counts[int(np.argmax(weights))] += total - sum(counts)
    rng = np.random.default_rng([seed, epoch])
    picks: list[tuple[int, int]] = []
    for s, (n, k) in enumerate(zip(sizes, counts)):
        idx: list[int] = []
        while len(idx) < k:
            idx += rng.permutation(n).tolist()
        picks += [(s, i) for i in idx[:k]]
    perm = rng.permutation(len(picks))
    return [picks[i] for i in perm]


# ---- resolve / describe / run ---------------------------------------------------------------------
@dataclass
class RewardConfig:
    """Resolved settings of one reward-model run (written to the run dir as config.toml)."""

    kind: str = "helpfulness"
    init: str = ""
    data: str = ""                      # one preference file ...
    mix: str = ""                       # ... or FILE:PROPORTION,...
    out: str = "runs/rm"
    val: str = ""                       # held-out pairs: validation every --eval-every and at the end
    margin: Optional[str] = None        # none | small | large (default per kind: DEFAULT_MARGIN)
    epochs: float = 1.0
    steps: Optional[int] = None         # default: epochs over the data
    batch_pairs: int = PAPER_BATCH_PAIRS
    micro_batch: int = 8                # pairs per forward/backward (2x rows)
    lr: Optional[float] = None          # default 1e-5 (5e-6 for 70b)
    warmup: Optional[int] = None        # default 3 % of the steps, at least 5 (capped by the steps)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip: float = 1.0
    save_every: int = 0
    keep: int = 3
    seed: int = 0
    eval_every: int = 0
    log_every: int = 10                # plain log line every N steps when stdout is not a terminal
    save_dtype: str = "bfloat16"
    device: str = "auto"


@dataclass
class Plan:
    cfg: RewardConfig
    model: Any
    parallel: ParallelConfig
    accum: int
    dp: int
    sources: list            # [(path, weight)]
    epoch_pairs: int


def _sources(c: RewardConfig) -> list[tuple[Path, float]]:
    if bool(c.data) == bool(c.mix):
        raise LlamactlError("give the preference pairs with --data FILE or --mix FILE:P,FILE:P (one of them)")
    srcs = [(Path(c.data), 1.0)] if c.data else parse_mix(c.mix)
    flag = "--data" if c.data else "--mix"
    for p, _ in srcs:
        if not p.is_file():
            raise LlamactlError(f"preference file not found: {p} ({flag})")
    return srcs


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def resolve(flags: dict[str, Any], config_file: Path | None = None, parallel: dict[str, Any] | None = None) -> Plan:
    """RewardConfig defaults <- [reward] / [parallel] of the config file <- flags (None = not given)."""
    from llamactl.checkpoint import load_config
    from llamactl.checkpoint import resolve as resolve_ckpt
    from llamactl.stages.runner import resolve_parallel

    file = load_toml(config_file) if config_file else {}
    unknown = set(file) - {"reward", "parallel"}
    if unknown:
        raise LlamactlError(f"unknown sections {sorted(unknown)} (--config {config_file}); use [reward], [parallel]")
    c = apply_overrides(RewardConfig(), file.get("reward", {}), f"[reward] in {config_file}")
    c = apply_overrides(c, {k: v for k, v in flags.items() if v is not None}, "flags")
    par = resolve_parallel(file.get("parallel", {}), parallel or {}, config_file)
    if c.kind not in KINDS:
        raise LlamactlError(f"unknown reward model kind {c.kind!r}; helpfulness or safety (--kind)")
    c.margin = c.margin or DEFAULT_MARGIN[c.kind]
    margin(None, c.margin)
    for name, low in (("batch_pairs", 1), ("micro_batch", 1), ("save_every", 0), ("keep", 1), ("eval_every", 0),
                      ("seed", 0), ("log_every", 1)):
        if getattr(c, name) < low:
            raise LlamactlError(f"{name} must be >= {low}, got {getattr(c, name)} (--{name.replace('_', '-')})")
    if c.steps is not None and c.steps < 1:
        raise LlamactlError(f"steps must be >= 1, got {c.steps} (--steps)")
    if not c.epochs > 0:
        raise LlamactlError(f"epochs must be > 0, got {c.epochs} (--epochs)")
    if not c.init:
        raise LlamactlError("no initial checkpoint given (--init: a chat / SFT checkpoint)")
    if not Path(c.init).is_dir():
        raise LlamactlError(f"checkpoint directory not found: {c.init} (--init)")
    c.init = str(resolve_ckpt(c.init, "--init"))
    model, _ = load_config(Path(c.init))
    srcs = _sources(c)
    if c.val and not Path(c.val).is_file():
        raise LlamactlError(f"preference file not found: {c.val} (--val)")
    if c.eval_every and not c.val:
        raise LlamactlError("--eval-every needs held-out pairs (--val)")
    total = sum(_count_lines(p) for p, _ in srcs)
    if total == 0:
        raise LlamactlError(f"no preference pairs in {', '.join(str(p) for p, _ in srcs)} (--data/--mix)")
    dp = par.dp
    per_micro = c.micro_batch * dp
    want = min(c.batch_pairs, total)  # capped by the data
    accum = max(1, want // per_micro)
    c.batch_pairs = accum * per_micro
    if c.steps is None:
        c.steps = max(1, int(c.epochs * total) // c.batch_pairs)
    if c.lr is None:
        c.lr = 5e-6 if model.num_params() > 50e9 else 1e-5
    if c.lr <= 0:
        raise LlamactlError(f"learning rate must be > 0, got {c.lr} (--lr)")
    if c.warmup is None:
        c.warmup = min(max(5, math.ceil(0.03 * c.steps)), max(0, c.steps - 1))
    return Plan(c, model, par, accum, dp, srcs, total)


def describe(plan: Plan) -> None:
    from llamactl.config import dump_toml
    from llamactl.ui import console, table

    c, par = plan.cfg, plan.parallel
    console.print(dump_toml({"reward": c, "parallel": par}), markup=False)
    rows = [["kind", c.kind], ["margin", f"{c.margin} ({', '.join(f'{m:.3g}' for m in MARGINS[c.margin])})"],
            ["data", ", ".join(f"{p} ({100 * w:.0f} %)" for p, w in plan.sources)],
            ["pairs per epoch", f"{plan.epoch_pairs:,}"], ["layout", f"tp {par.tp} x pp {par.pp} x dp {plan.dp}"],
            ["pairs / step", f"{c.batch_pairs} ({c.micro_batch} per micro-batch x {plan.accum} x dp {plan.dp})"],
            ["steps", f"{c.steps:,}"], ["warmup", c.warmup], ["lr", f"{c.lr:g} cosine to {c.min_lr_ratio:g}"]]
    console.print(table("reward model plan", ["", "value"], rows))


def load_pairs(path: Path, flag: str) -> list[PreferencePair]:
    from llamactl.chat_data import load_records

    return load_records(path, "preferences", flag)


def run(plan: Plan, ctx, *, resume: bool = False, show_progress: bool = True):
    """Build the reward model from --init (fresh score head), train it with trainer.fit, score --val."""
    import torch

    from llamactl.checkpoint.read import load_model
    from llamactl.tokenizer import Tokenizer
    from llamactl.trainer import TrainConfig, fit
    from llamactl.ui import console, table

    c = plan.cfg
    device = c.device if c.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and ctx.world_size > 1:
        device = f"cuda:{torch.cuda.current_device()}"
    init = Path(c.init)
    tok_path = init / "tokenizer.model"
    if not tok_path.is_file():
        raise LlamactlError(f"checkpoint has no tokenizer.model ({init}, --init)")
    tok = Tokenizer.load(tok_path)
    flag = "--data" if c.data else "--mix"
    sources = [encode_pairs(tok, load_pairs(p, flag), c.margin, plan.model.max_seq_len, flag) for p, _ in plan.sources]
    batches = PairBatches(sources, [w for _, w in plan.sources], micro_batch=c.micro_batch, accum=plan.accum,
                          dp=ctx.dp, dp_rank=ctx.dp_rank, seed=c.seed)
    val = None
    if c.val:
        vpairs = encode_pairs(tok, load_pairs(Path(c.val), "--val"), c.margin, plan.model.max_seq_len, "--val")
        mine = vpairs[ctx.dp_rank::ctx.dp]
        vb = [RewardBatch.from_pairs(mine[i:i + c.micro_batch]) for i in range(0, len(mine), c.micro_batch)]
        val = lambda: vb  # noqa: E731
    model, _ = load_model(init, ctx, device=device, head="reward", flag="--init")
    tcfg = TrainConfig(steps=c.steps, log_every=c.log_every, lr=c.lr, min_lr_ratio=c.min_lr_ratio, warmup=c.warmup, schedule="cosine",
                       weight_decay=c.weight_decay, clip=c.clip, save_every=c.save_every, keep=c.keep, seed=c.seed,
                       eval_every=c.eval_every or (c.steps if val is not None else 0), zero=plan.parallel.zero,
                       sequence_parallel=plan.parallel.sequence_parallel,
                       overlap_grad_reduce=plan.parallel.overlap_grad_reduce, save_dtype=c.save_dtype)
    result = fit(model, ctx, tcfg, batches, run_dir=Path(c.out), loss_fn=reward_loss, tokenizer=tok_path,
                 stage="reward", resume=resume, eval_batches=val,
                 config_sections={"reward": c, "model": plan.model, "parallel": plan.parallel},
                 extra_meta={"rm_kind": c.kind, "margin": c.margin, "init": str(init)}, show_progress=show_progress)
    if ctx.is_main:
        import json

        rows = [["steps", result.step], ["pairs / step", c.batch_pairs],
                ["final train loss", f"{result.last_loss:.4f}" if result.last_loss is not None else "-"]]
        mpath = Path(c.out) / "metrics.jsonl"
        last_val = [r for r in (json.loads(x) for x in mpath.read_text().splitlines() if x) if r.get("split") == "val"]
        if last_val:
            rows += [["val loss", f"{last_val[-1]['loss']:.4f}"], ["val accuracy", f"{100 * last_val[-1]['accuracy']:.1f} %"]]
        rows.append(["checkpoint", str(result.checkpoint)])
        console.print(table(f"{c.kind} reward model" + (f" (stopped by {result.stopped_by})" if result.stopped_by else ""),
                            ["", "value"], rows))
    return result
