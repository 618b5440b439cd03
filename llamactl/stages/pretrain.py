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
    eval_tokens: int = 65536           # held-out tokens scored at the end (0: skip)
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


def resolve(flags: dict[str, Any], config_file: Path | None = None, parallel: ParallelConfig | None = None) -> Plan:
    """preset defaults <- config file ([pretrain], [model], [parallel]) <- flags (None = not given)."""
    from llamactl.data import read_index
    from llamactl.tokenizer import Tokenizer

    file = load_toml(config_file) if config_file else {}
    unknown = set(file) - {"pretrain", "model", "parallel"}
    if unknown:
        raise LlamactlError(f"unknown sections {sorted(unknown)} (--config {config_file}); use [pretrain], [model], [parallel]")
    cfg = apply_overrides(PretrainConfig(), file.get("pretrain", {}), f"[pretrain] in {config_file}")
    cfg = apply_overrides(cfg, {k: v for k, v in flags.items() if v is not None}, "flags")
    par = apply_overrides(parallel or ParallelConfig(), file.get("parallel", {}), f"[parallel] in {config_file}")
    if flags.get("steps") is not None and flags.get("tokens") is not None:
        raise LlamactlError("give either --steps or --tokens, not both")
    if flags.get("tokens") is not None:
        cfg.steps = None  # --tokens overrides steps from a config file
    elif flags.get("steps") is not None or cfg.tokens is not None and cfg.steps is not None:
        cfg.tokens = None  # steps decide; tokens is recomputed from them
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
    cfg.seq_len = cfg.seq_len or min(seq, model.max_seq_len)
    if cfg.seq_len > model.max_seq_len:
        model = dataclasses.replace(model, max_seq_len=cfg.seq_len)
    cfg.batch_tokens = cfg.batch_tokens or btok
    cfg.micro_batch = cfg.micro_batch or max(1, min(micro, cfg.batch_tokens // cfg.seq_len))
    from llamactl.parallel.context import check_layout

    check_layout(par.tp, par.pp)  # --tp / --pp (or [parallel]) of 0 or less: a LayoutError naming the flag
    dp = max(1, par.nproc // (par.tp * par.pp))
    per_micro = cfg.micro_batch * cfg.seq_len * dp
    accum = max(1, round(cfg.batch_tokens / per_micro))
    cfg.batch_tokens = accum * per_micro
    if cfg.steps is None:
        cfg.steps = math.ceil(cfg.tokens / cfg.batch_tokens) if cfg.tokens else steps
    cfg.tokens = cfg.steps * cfg.batch_tokens
    cfg.lr = cfg.lr or PRETRAIN_PEAK_LR[cfg.size]
    if cfg.warmup is None:
        cfg.warmup = min(PAPER_WARMUP, max(1, cfg.steps // 10))
    if cfg.save_every is None:
        cfg.save_every = max(1, min(1000, cfg.steps // 4))
    return Plan(cfg, model, par, accum, dp)


def describe(plan: Plan) -> None:
    """Print the resolved config and the plan (what --dry-run shows)."""
    from llamactl.config import dump_toml
    from llamactl.trainer import model_flops_per_token
    from llamactl.ui import console, table

    c, m = plan.cfg, plan.model
    console.print(dump_toml({"pretrain": c, "model": m, "parallel": plan.parallel}), markup=False)
    fpt = model_flops_per_token(m, c.seq_len)
    rows = [["parameters", f"{m.num_params():,}"],
            ["layout", f"tp {plan.parallel.tp} x pp {plan.parallel.pp} x dp {plan.dp}"],
            ["sequences / micro-batch", c.micro_batch], ["accumulation steps", plan.accum],
            ["tokens / step", f"{plan.step_tokens:,}"], ["steps", f"{c.steps:,}"], ["warmup", f"{c.warmup:,}"],
            ["total tokens", f"{c.tokens:,}"], ["training FLOPs", f"{fpt * c.tokens:.3e}"],
            ["checkpoint every", f"{c.save_every} steps (keep {c.keep})"]]
    console.print(table("pretraining plan", ["", "value"], rows))


def run(plan: Plan, *, resume: bool = False, show_progress: bool = True):
    """Build the model and data, train, then score held-out tokens."""
    import torch

    from llamactl.data import PretrainBatches, TokenData, WindowSampler
    from llamactl.model import build_model
    from llamactl.parallel.context import ParallelContext
    from llamactl.trainer import TrainConfig, fit, model_flops_per_token
    from llamactl.ui import console, table

    c = plan.cfg
    from llamactl.parallel.launch import init_distributed  # joins torchrun's process group (--nproc)

    ctx = init_distributed(plan.parallel.tp, plan.parallel.pp)
    device = c.device if c.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and ctx.world_size > 1:
        device = f"cuda:{torch.cuda.current_device()}"
    train = TokenData(Path(c.data), "train")
    sampler = WindowSampler(train, c.seq_len, seed=c.seed)
    batches = PretrainBatches(sampler, c.micro_batch, plan.accum, ctx.dp, ctx.dp_rank)
    model = build_model(plan.model, ctx, "lm", device=device, seed=None if resume else c.seed)
    tcfg = TrainConfig(steps=c.steps, lr=c.lr, min_lr_ratio=c.min_lr_ratio, warmup=c.warmup, schedule=c.schedule,
                       weight_decay=c.weight_decay, clip=c.clip, save_every=c.save_every, keep=c.keep, seed=c.seed,
                       recompute=c.recompute, compile=c.compile, peak_flops=c.peak_flops)
    hooks = None
    if ctx.world_size > 1:  # 1F1B pipeline step, bucketed dp gradient sum, global-norm clipping
        from llamactl.parallel.data import training_hooks
        from llamactl.parallel.pipeline import lm_output_loss
        from llamactl.trainer import Hooks

        amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if str(device).startswith("cuda") else None
        hooks = Hooks(**training_hooks(model, ctx, lm_output_loss(ctx, head=model.output), autocast=amp))
    result = fit(model, ctx, tcfg, batches, run_dir=Path(c.out), tokenizer=Path(c.tokenizer), stage="pretrain",
                 resume=resume, hooks=hooks, flops_per_token=model_flops_per_token(plan.model, c.seq_len),
                 config_sections={"pretrain": c, "model": plan.model, "parallel": plan.parallel},
                 extra_meta={"seq_len": c.seq_len, "data": str(c.data)}, show_progress=show_progress)
    rows = [["steps", result.step], ["tokens", f"{result.tokens:,}"],
            ["final train loss", f"{result.last_loss:.4f}" if result.last_loss is not None else "-"]]
    if c.eval_tokens and not result.stopped_by:
        from llamactl.stages.evaluate import evaluate_model

        val = TokenData(Path(c.data), "val")
        if val.num_tokens > c.seq_len:
            ev = evaluate_model(model, ctx, val, seq_len=c.seq_len, batch_size=c.micro_batch, max_tokens=c.eval_tokens)
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
