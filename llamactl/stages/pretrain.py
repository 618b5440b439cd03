"""`llamactl pretrain`: a model from scratch on prepared token shards, with the paper's recipe.

Defaults per size (paper section 2.2): AdamW (0.9, 0.95, 1e-5), wd 0.1, cosine to 10 %, warmup 2000
(scaled down to 10 % of a shorter run), peak lr 3e-4 (7b/13b) / 1.5e-4 (34b/70b), 4M-token batches,
4k context. tiny / small get CPU-sized batches and contexts.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamactl.config import PRESETS, PRETRAIN_PEAK_LR, ParallelConfig, apply_overrides, load_toml, preset
from llamactl.errors import LlamactlError

# (seq_len, batch_tokens, micro_batch, default steps) per size
SIZE_DEFAULTS = {
    "tiny": (256, 8192, 16, 600),
    "small": (512, 65536, 8, 2000),
    "7b": (4096, 4 * 1024 * 1024, 1, 500_000),
    "13b": (4096, 4 * 1024 * 1024, 1, 500_000),
    "34b": (4096, 4 * 1024 * 1024, 1, 500_000),
    "70b": (4096, 4 * 1024 * 1024, 1, 500_000),
}
PAPER_WARMUP = 2000


@dataclass
class PretrainConfig:
    """Resolved settings of one pretraining run (written to the run dir as config.toml)."""

    size: str = "tiny"
    data: str = ""
    out: str = "runs/pretrain"
    tokenizer: str | None = None       # default: the tokenizer recorded with the data
    steps: int | None = None
    tokens: int | None = None          # alternative to steps: total training tokens
    seq_len: int | None = None
    batch_tokens: int | None = None    # global batch in tokens
    micro_batch: int | None = None     # sequences per forward/backward
    lr: float | None = None
    warmup: int | None = None
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"
    weight_decay: float = 0.1
    clip: float = 1.0
    save_every: int | None = None
    keep: int = 3
    seed: int = 0
    recompute: bool = False
    compile: bool = False
    peak_flops: float | None = None
    eval_tokens: int = 65536           # held-out tokens scored at the end and by --eval-every (0: skip)
    eval_every: int = 0                # validation on the val split every N steps (0: only at the end)
    log_every: int = 10                # plain log line every N steps when stdout is not a terminal
    save_dtype: str = "bfloat16"       # stored weights; exact fp32 masters stay in train_state
    device: str = "auto"


@dataclass
class Plan:
    cfg: PretrainConfig
    model: Any
    parallel: ParallelConfig
    accum: int
    dp: int

    @property
    def step_tokens(self) -> int:
        return self.cfg.micro_batch * self.accum * self.dp * self.cfg.seq_len

    @property
    def step_sequences(self) -> int:
        return self.cfg.micro_batch * self.accum * self.dp


def _check(value, name: str, flag: str, *, low: float = 1, kind=int) -> None:
    """A value the user gave is used or refused, never replaced by a default."""
    if value is None:
        return
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise LlamactlError(f"{name} must be a whole number, got {value!r} ({flag})")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise LlamactlError(f"{name} must be a number, got {value!r} ({flag})")
    if not value >= low:
        raise LlamactlError(f"{name} must be >= {low}, got {value} ({flag})")


def _check_given(cfg: PretrainConfig) -> None:
    for name, low in (("steps", 1), ("tokens", 1), ("seq_len", 1), ("batch_tokens", 1), ("micro_batch", 1),
                      ("warmup", 0), ("save_every", 0), ("keep", 1), ("eval_tokens", 0), ("eval_every", 0), ("log_every", 1),
                      ("seed", 0)):
        _check(getattr(cfg, name), name, "--" + name.replace("_", "-"), low=low)
    for name, low in (("lr", 0.0), ("min_lr_ratio", 0.0), ("weight_decay", 0.0), ("clip", 0.0)):
        _check(getattr(cfg, name), name, "--" + name.replace("_", "-"), low=low, kind=float)
    if cfg.lr is not None and cfg.lr <= 0:
        raise LlamactlError(f"learning rate must be > 0, got {cfg.lr} (--lr)")
    if cfg.peak_flops is not None and not cfg.peak_flops > 0:
        raise LlamactlError(f"peak FLOP/s must be > 0, got {cfg.peak_flops} (--peak-flops)")
    from llamactl.trainer import SAVE_DTYPES

    if cfg.save_dtype not in SAVE_DTYPES:
        raise LlamactlError(f"unknown save dtype {cfg.save_dtype!r}; one of {', '.join(SAVE_DTYPES)} (--save-dtype)")


def resolve(flags: dict[str, Any], config_file: Path | None = None,
            parallel: dict[str, Any] | None = None) -> Plan:
    """preset defaults <- config file ([pretrain], [model], [parallel]) <- flags (None = not given).

    `parallel` holds the launcher flags (tp, pp, nproc, nnodes, zero; None = not given): they win over the
    file's [parallel] section like every other flag."""
    from llamactl.data import read_index
    from llamactl.stages.runner import resolve_parallel
    from llamactl.tokenizer import Tokenizer

    file = load_toml(config_file) if config_file else {}
    unknown = set(file) - {"pretrain", "model", "parallel"}
    if unknown:
        raise LlamactlError(f"unknown sections {sorted(unknown)} (--config {config_file}); use [pretrain], [model], [parallel]")
    given = {k: v for k, v in flags.items() if v is not None}
    cfg = apply_overrides(PretrainConfig(), file.get("pretrain", {}), f"[pretrain] in {config_file}")
    cfg = apply_overrides(cfg, given, "flags")
    par = resolve_parallel(file.get("parallel", {}), parallel or {}, config_file)
    if "steps" in given and "tokens" in given:
        raise LlamactlError("give either --steps or --tokens, not both")
    if "tokens" in given:
        cfg.steps = None  # --tokens overrides steps from a config file
    elif "steps" in given or cfg.tokens is not None and cfg.steps is not None:
        cfg.tokens = None  # steps decide; tokens is recomputed from them
    _check_given(cfg)
    if cfg.size not in PRESETS:
        raise LlamactlError(f"unknown size {cfg.size!r}; choose one of {', '.join(PRESETS)} (--size)")
    if not cfg.data:
        raise LlamactlError("no training data given (--data DIR from `llamactl data prepare`)")
    index = read_index(Path(cfg.data))
    tok_path = Path(cfg.tokenizer) if cfg.tokenizer else Path(cfg.data) / index.get("tokenizer", "tokenizer.model")
    if tok_path.is_dir():
        tok_path = tok_path / "tokenizer.model"
    if not tok_path.is_file():
        raise LlamactlError(f"tokenizer not found ({tok_path}, --tokenizer)")
    vocab = Tokenizer.load(tok_path).vocab_size
    seq, btok, micro, steps = SIZE_DEFAULTS[cfg.size]
    model_over = dict(file.get("model", {}))
    if cfg.size in ("tiny", "small"):
        model_over.setdefault("vocab_size", vocab)
    model = preset(cfg.size, **model_over)
    if model.vocab_size != vocab:
        raise LlamactlError(f"tokenizer has {vocab} tokens but the {cfg.size} model has a vocabulary of "
                            f"{model.vocab_size} ({tok_path}, --tokenizer/--size)")
    from llamactl.data import check_tokenizer, sha256_file

    check_tokenizer(index, Path(cfg.data), vocab, sha256_file(tok_path))
    cfg.tokenizer = str(tok_path)
    if cfg.seq_len is None:
        cfg.seq_len = min(seq, model.max_seq_len)
    elif cfg.seq_len > model.max_seq_len:
        raise LlamactlError(f"--seq-len {cfg.seq_len} is longer than the {cfg.size} model's context of "
                            f"{model.max_seq_len} tokens (--seq-len; max_seq_len in [model] of --config raises it)")
    batch_given = cfg.batch_tokens is not None
    if cfg.batch_tokens is None:
        cfg.batch_tokens = btok
    if cfg.micro_batch is None:
        cfg.micro_batch = max(1, min(micro, cfg.batch_tokens // cfg.seq_len))
    dp = par.dp
    per_micro = cfg.micro_batch * cfg.seq_len * dp
    if batch_given and cfg.batch_tokens % per_micro:
        lo = max(1, cfg.batch_tokens // per_micro) * per_micro
        raise LlamactlError(f"--batch-tokens {cfg.batch_tokens:,} is not a multiple of micro-batch x seq-len x dp "
                            f"= {cfg.micro_batch} x {cfg.seq_len} x {dp} = {per_micro:,} tokens; use "
                            f"{lo:,} or {lo + per_micro:,} (--batch-tokens)")
    accum = max(1, round(cfg.batch_tokens / per_micro))
    cfg.batch_tokens = accum * per_micro
    if par.virtual_stages > 1 and accum % par.pp:  # the interleaved schedule runs micro-batches in groups of pp
        group = per_micro * par.pp
        raise LlamactlError(f"--virtual-stages {par.virtual_stages} needs the micro-batches per step to be a multiple "
                            f"of --pp {par.pp}, got {accum} (--batch-tokens {cfg.batch_tokens:,} / micro-batch x "
                            f"seq-len x dp {per_micro:,}); use a --batch-tokens multiple of {group:,} "
                            f"(--batch-tokens/--micro-batch)")
    if cfg.steps is None:
        cfg.steps = math.ceil(cfg.tokens / cfg.batch_tokens) if cfg.tokens else steps
    cfg.tokens = cfg.steps * cfg.batch_tokens
    if cfg.lr is None:
        cfg.lr = PRETRAIN_PEAK_LR[cfg.size]
    if cfg.warmup is None:
        cfg.warmup = min(PAPER_WARMUP, max(1, cfg.steps // 10))
    if cfg.save_every is None:
        cfg.save_every = max(1, min(1000, cfg.steps // 4))
    return Plan(cfg, model, par, accum, dp)


def describe(plan: Plan) -> None:
    """Print the resolved config, the run's figures and the planner's table of its layout (--dry-run)."""
    from llamactl.config import dump_toml
    from llamactl.flops import model_flops_per_token
    from llamactl.plan import print_run_plan
    from llamactl.ui import console, table

    c, m, par = plan.cfg, plan.model, plan.parallel
    console.print(dump_toml({"pretrain": c, "model": m, "parallel": par}), markup=False)
    fpt = model_flops_per_token(m, c.seq_len)
    rows = [["parameters", f"{m.num_params():,}"],
            ["layout", f"tp {par.tp} x pp {par.pp} x dp {plan.dp}" + (" (ZeRO-1)" if par.zero and plan.dp > 1 else "")],
            ["sequences / micro-batch", c.micro_batch], ["accumulation steps", plan.accum],
            ["tokens / step", f"{plan.step_tokens:,}"], ["steps", f"{c.steps:,}"], ["warmup", f"{c.warmup:,}"],
            ["total tokens", f"{c.tokens:,}"], ["training FLOPs", f"{fpt * c.tokens:.3e}"],
            ["checkpoint every", f"{c.save_every} steps (keep {c.keep})"]]
    console.print(table("pretraining plan", ["", "value"], rows))
    print_run_plan(c.size, m, "pretrain", tp=par.tp, pp=par.pp, gpus=par.world, seq_len=c.seq_len,
                   micro_batch=c.micro_batch, tokens=c.tokens, rows=plan.step_sequences, virtual_stages=par.virtual_stages)


def _val_batches(c: PretrainConfig, ctx, device: str):
    """eval_batches for fit: the first eval_tokens of the val split in windows of seq_len, dp ranks taking
    turns, micro_batch windows per forward; the same windows at every evaluation (None: no val data)."""
    import numpy as np

    from llamactl.data import Batch, TokenData, eval_windows

    val = TokenData(Path(c.data), "val")
    if val.num_tokens <= c.seq_len or not c.eval_tokens:
        return None
    mine = list(eval_windows(val, c.seq_len, c.eval_tokens))[ctx.dp_rank::ctx.dp]
    batches = [Batch.from_windows(np.stack(mine[i:i + c.micro_batch])) for i in range(0, len(mine), c.micro_batch)]
    return lambda: batches


def run(plan: Plan, ctx, *, resume: bool = False, show_progress: bool = True):
    """Build the model and data on this rank, train, then score held-out tokens."""
    import torch

    from llamactl.data import PretrainBatches, TokenData, WindowSampler
    from llamactl.flops import model_flops_per_token
    from llamactl.model import build_model
    from llamactl.trainer import TrainConfig, fit
    from llamactl.ui import console, table

    c = plan.cfg
    device = c.device if c.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and ctx.world_size > 1:
        device = f"cuda:{torch.cuda.current_device()}"
    train = TokenData(Path(c.data), "train")
    sampler = WindowSampler(train, c.seq_len, seed=c.seed)
    batches = PretrainBatches(sampler, c.micro_batch, plan.accum, ctx.dp, ctx.dp_rank)
    model = build_model(plan.model, ctx, "lm", device=device, seed=None if resume else c.seed)
    tcfg = TrainConfig(steps=c.steps, log_every=c.log_every, lr=c.lr, min_lr_ratio=c.min_lr_ratio, warmup=c.warmup, schedule=c.schedule,
                       weight_decay=c.weight_decay, clip=c.clip, save_every=c.save_every, keep=c.keep, seed=c.seed,
                       recompute=c.recompute, compile=c.compile, peak_flops=c.peak_flops, eval_every=c.eval_every,
                       zero=plan.parallel.zero, sequence_parallel=plan.parallel.sequence_parallel,
                       overlap_grad_reduce=plan.parallel.overlap_grad_reduce,
                       save_dtype=c.save_dtype)
    val = _val_batches(c, ctx, device) if c.eval_every else None
    if c.eval_every and val is None:
        raise LlamactlError(f"--eval-every {c.eval_every} needs held-out tokens: the val split of {c.data} has "
                            f"fewer than one window of {c.seq_len + 1}, or --eval-tokens is 0 (--eval-every)")
    result = fit(model, ctx, tcfg, batches, run_dir=Path(c.out), tokenizer=Path(c.tokenizer), stage="pretrain",
                 resume=resume, flops_per_token=model_flops_per_token(plan.model, c.seq_len),
                 config_sections={"pretrain": c, "model": plan.model, "parallel": plan.parallel},
                 extra_meta={"seq_len": c.seq_len, "data": str(c.data)}, eval_batches=val,
                 show_progress=show_progress)
    rows = [["steps", result.step], ["tokens", f"{result.tokens:,}"],
            ["final train loss", f"{result.last_loss:.4f}" if result.last_loss is not None else "-"]]
    if c.eval_tokens and not result.stopped_by:
        from llamactl.stages.evaluate import evaluate_model

        val_data = TokenData(Path(c.data), "val")
        if val_data.num_tokens > c.seq_len:
            ev = evaluate_model(model, ctx, val_data, seq_len=c.seq_len, batch_size=c.micro_batch,
                                max_tokens=c.eval_tokens)
            rows += [["eval loss", f"{ev.loss:.4f}"], ["eval perplexity", f"{ev.perplexity:.2f}"],
                     ["eval tokens", f"{ev.tokens:,}"]]
            if ctx.is_main:
                import json

                (Path(c.out) / "eval.json").write_text(json.dumps(dataclasses.asdict(ev)))
    if ctx.is_main:
        rows.append(["checkpoint", str(result.checkpoint)])
        console.print(table("pretraining done" if not result.stopped_by else f"stopped by {result.stopped_by}",
                            ["", "value"], rows))
    return result
