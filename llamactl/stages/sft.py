"""`llamactl sft`: supervised fine-tuning of a pretrained checkpoint on dialogues (paper section 3.1).

The stage adds only its data, its model inputs and its summary; the loop, the loss (next-token
cross-entropy, counted only where the target is an answer token) and the checkpoint writer are the
trainer's. Samples are Llama 2-Chat dialogues (`sft_data.encode_sft`: loss on every assistant turn, EOS
included, never on a system / user / format token), concatenated in a seeded order per epoch and packed
into rows of seq_len tokens (`sft_data.SFTBatches`). With `cross_attention=False` every token attends
only to earlier tokens of its own sample and RoPE positions restart at each sample, so a packed row
computes exactly what each sample would alone; the default (True) is the paper's plain concatenation.

Paper defaults: AdamW, lr 2e-5 cosine, weight decay 0.1, 64 sequences per batch, 4096 tokens (capped by
the model's context), 2 epochs, the number of steps computed from the packed data size. The model
config and tokenizer come from the --init checkpoint; the result is a chat checkpoint (stage "sft").
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamactl.config import ModelConfig, ParallelConfig, load_sections, section_config
from llamactl.errors import LlamactlError

PAPER_SEQ_LEN = 4096
MICRO_TOKENS = 8192          # default micro-batch: as many rows as fit in this many tokens (at least one)
SECTIONS = ("sft", "parallel")


@dataclass
class SFTConfig:
    """Resolved settings of one SFT run (written to the run dir as config.toml); defaults are the paper's."""

    init: str = ""                     # pretrained checkpoint (or run dir: its latest checkpoint)
    data: str = ""                     # SFT JSONL
    val: str | None = None             # held-out SFT JSONL (validation loss on answer tokens)
    out: str = "runs/sft"
    epochs: int = 2
    steps: int | None = None           # default: epochs over the packed rows, rounded up
    seq_len: int | None = None         # default: min(4096, the model's max_seq_len)
    batch_size: int = 64               # packed rows (sequences) per optimizer step, all dp ranks
    micro_batch: int | None = None     # rows per forward/backward
    lr: float = 2e-5
    min_lr_ratio: float = 0.1
    warmup: int = 0
    schedule: str = "cosine"
    weight_decay: float = 0.1
    clip: float = 1.0
    cross_attention: bool = True       # False: packed samples never attend to each other
    overflow: str = "truncate"         # a sample longer than a row: truncate | refuse
    save_every: int | None = None
    keep: int = 3
    seed: int = 0
    eval_every: int = 0
    log_every: int = 10                # plain log line every N steps when stdout is not a terminal
    recompute: bool = False
    compile: bool = False
    peak_flops: float | None = None
    save_dtype: str = "bfloat16"
    device: str = "auto"


@dataclass
class DataStats:
    """What the packed data looks like: the figures a user checks before spending compute."""

    samples: int
    tokens: int
    answer_tokens: int
    truncated: int
    rows_per_epoch: list[int] = field(default_factory=list)


@dataclass
class Plan:
    cfg: SFTConfig
    model: ModelConfig
    parallel: ParallelConfig
    accum: int
    dp: int
    tokenizer: Path
    samples: list            # encoded (tokens, mask) per training sample
    val_samples: list | None
    stats: DataStats

    @property
    def step_sequences(self) -> int:
        return self.cfg.micro_batch * self.accum * self.dp

    @property
    def step_tokens(self) -> int:
        return self.step_sequences * self.cfg.seq_len


# ---- data -------------------------------------------------------------------------------------------
def encode_file(path: Path, tok, flag: str) -> list[tuple[list[int], list[int]]]:
    """Every dialogue of an SFT JSONL file as (tokens, loss mask), validated whole first (file:line errors)."""
    from llamactl.chat_data import load_records
    from llamactl.sft_data import encode_example

    if not Path(path).is_file():
        raise LlamactlError(f"SFT data file not found ({path}, {flag})")
    return [encode_example(tok, ex) for ex in load_records(Path(path), "sft", flag)]


def data_stats(samples, seq_len: int, seed: int, epochs: int, pad_id: int, overflow: str) -> DataStats:
    """Token counts and the packed rows of each epoch (the packing depends on the epoch's seeded order)."""
    from llamactl.sft_data import SFTBatches

    width = seq_len + 1
    src = SFTBatches(samples, seq_len, pad_id=pad_id, micro_batch=1, seed=seed, overflow=overflow)
    rows = []
    for e in range(epochs):
        src.load_state_dict({"seed": seed, "epoch": e, "position": 0})
        rows.append(len(src.rows()))
    return DataStats(samples=len(samples), tokens=sum(min(len(t), width) for t, _ in samples),
                     answer_tokens=sum(sum(m[:width]) for _, m in samples),
                     truncated=sum(len(t) > width for t, _ in samples), rows_per_epoch=rows)


def packed_inputs(cross_attention: bool):
    """inputs(batch) for the trainer: token ids, and without cross-attention the per-sample RoPE positions
    and the block-diagonal causal mask built from the batch's document ids (padding forms its own block)."""
    import torch

    def plain(batch):
        return batch.tokens, {}

    def separate(batch):
        docs = batch.doc_ids
        b, t = docs.shape
        idx = torch.arange(t, device=docs.device).expand(b, t)
        start = torch.ones_like(docs, dtype=torch.bool)
        start[:, 1:] = docs[:, 1:] != docs[:, :-1]
        first = torch.cummax(torch.where(start, idx, torch.zeros_like(idx)), dim=1).values
        causal = torch.ones(t, t, dtype=torch.bool, device=docs.device).tril()
        mask = (docs[:, :, None] == docs[:, None, :]) & causal
        return batch.tokens, {"positions": idx - first, "attn_mask": mask[:, None]}

    return plain if cross_attention else separate


# ---- resolve ----------------------------------------------------------------------------------------
def _check_given(cfg: SFTConfig) -> None:
    from llamactl.stages.pretrain import _check
    from llamactl.trainer import SAVE_DTYPES

    for name, low in (("epochs", 1), ("steps", 1), ("seq_len", 1), ("batch_size", 1), ("micro_batch", 1),
                      ("warmup", 0), ("save_every", 0), ("keep", 1), ("eval_every", 0), ("seed", 0), ("log_every", 1)):
        _check(getattr(cfg, name), name, "--" + name.replace("_", "-"), low=low)
    for name in ("lr", "min_lr_ratio", "weight_decay", "clip"):
        _check(getattr(cfg, name), name, "--" + name.replace("_", "-"), low=0.0, kind=float)
    if cfg.lr <= 0:
        raise LlamactlError(f"learning rate must be > 0, got {cfg.lr} (--lr)")
    if cfg.peak_flops is not None and not cfg.peak_flops > 0:
        raise LlamactlError(f"peak FLOP/s must be > 0, got {cfg.peak_flops} (--peak-flops)")
    if cfg.schedule not in ("cosine", "constant"):
        raise LlamactlError(f"unknown schedule {cfg.schedule!r}; cosine or constant (--schedule)")
    if cfg.overflow not in ("truncate", "refuse"):
        raise LlamactlError(f"unknown overflow policy {cfg.overflow!r}; truncate or refuse (--overflow)")
    if cfg.save_dtype not in SAVE_DTYPES:
        raise LlamactlError(f"unknown save dtype {cfg.save_dtype!r}; one of {', '.join(SAVE_DTYPES)} (--save-dtype)")
    if not isinstance(cfg.cross_attention, bool):
        raise LlamactlError(f"cross_attention must be true or false, got {cfg.cross_attention!r} (--no-cross-attention)")


def _micro_default(per_rank: int, seq_len: int) -> int:
    """The largest divisor of the per-rank rows whose micro-batch stays within MICRO_TOKENS tokens."""
    cap = max(1, MICRO_TOKENS // seq_len)
    return max(d for d in range(1, per_rank + 1) if per_rank % d == 0 and d <= cap)


def resolve(flags: dict[str, Any], config_file: Path | None = None,
            parallel: dict[str, Any] | None = None) -> Plan:
    """paper defaults <- config file ([sft], [parallel]) <- flags (None = not given); the model config and
    tokenizer from --init; data encoded and packed here, so every error shows before any process starts."""
    from llamactl import checkpoint
    from llamactl.stages.runner import resolve_parallel
    from llamactl.tokenizer import Tokenizer

    file = load_sections(config_file, SECTIONS)
    cfg = section_config(SFTConfig(), "sft", file, flags, config_file)
    par = resolve_parallel(file.get("parallel", {}), parallel or {}, config_file)
    _check_given(cfg)
    if not cfg.init:
        raise LlamactlError("no pretrained checkpoint given (--init CKPT)")
    if not cfg.data:
        raise LlamactlError("no SFT data given (--data FILE.jsonl)")
    if cfg.eval_every and not cfg.val:
        raise LlamactlError(f"--eval-every {cfg.eval_every} needs held-out dialogues (--val FILE.jsonl)")
    if not Path(cfg.init).exists():
        raise LlamactlError(f"pretrained checkpoint not found ({cfg.init}, --init)")
    init = checkpoint.resolve(cfg.init, "--init")
    meta = checkpoint.read_meta(init)
    model, head = checkpoint.load_config(init, meta=meta)
    if head != "lm":
        raise LlamactlError(f"--init needs a language-model checkpoint, {init} has a {head} head (--init)")
    cfg.init = str(init)
    tok_path = checkpoint.tokenizer_path(init)
    tok = Tokenizer.load(tok_path)
    if tok.vocab_size > model.vocab_size:
        raise LlamactlError(f"the tokenizer of {init} has {tok.vocab_size} tokens, more than the model's vocabulary "
                            f"of {model.vocab_size} (--init)")
    if cfg.seq_len is None:
        cfg.seq_len = min(PAPER_SEQ_LEN, model.max_seq_len)
    elif cfg.seq_len > model.max_seq_len:
        raise LlamactlError(f"--seq-len {cfg.seq_len} is longer than the model's context of {model.max_seq_len} "
                            f"tokens ({init}, --seq-len)")
    dp = par.dp
    if cfg.batch_size % dp:
        raise LlamactlError(f"--batch-size {cfg.batch_size} is not a multiple of the {dp} data-parallel ranks "
                            f"(--batch-size, --nproc / --tp / --pp)")
    per_rank = cfg.batch_size // dp
    if cfg.micro_batch is None:
        cfg.micro_batch = _micro_default(per_rank, cfg.seq_len)
    if per_rank % cfg.micro_batch:
        raise LlamactlError(f"--batch-size {cfg.batch_size} is not a multiple of micro-batch x dp = "
                            f"{cfg.micro_batch} x {dp} (--batch-size / --micro-batch)")
    accum = per_rank // cfg.micro_batch
    samples = encode_file(Path(cfg.data), tok, "--data")
    val = encode_file(Path(cfg.val), tok, "--val") if cfg.val else None
    stats = data_stats(samples, cfg.seq_len, cfg.seed, cfg.epochs, tok.eos_id, cfg.overflow)
    if stats.answer_tokens == 0:
        raise LlamactlError(f"no answer tokens to train on within --seq-len {cfg.seq_len} ({cfg.data}, --data)")
    if val is not None:
        from llamactl.sft_data import pack

        pack(val, cfg.seq_len, pad_id=tok.eos_id, overflow=cfg.overflow)  # long samples refused up front too
    if cfg.steps is None:
        cfg.steps = max(1, math.ceil(sum(stats.rows_per_epoch) / cfg.batch_size))
    if cfg.save_every is None:
        cfg.save_every = max(1, min(1000, cfg.steps // 4))
    return Plan(cfg, model, par, accum, dp, tok_path, samples, val, stats)


# ---- dry run ----------------------------------------------------------------------------------------
def describe(plan: Plan) -> None:
    """Print the resolved config, the data's packing and the planner's table of the layout (--dry-run)."""
    from llamactl.config import dump_toml
    from llamactl.plan import print_run_plan
    from llamactl.ui import console, table

    c, m, par, s = plan.cfg, plan.model, plan.parallel, plan.stats
    console.print(dump_toml({"sft": c, "model": m, "parallel": par}), markup=False)
    rows = [["parameters", f"{m.num_params():,}"],
            ["layout", f"tp {par.tp} x pp {par.pp} x dp {plan.dp}" + (" (ZeRO-1)" if par.zero and plan.dp > 1 else "")],
            ["samples", f"{s.samples:,}" + (f" ({s.truncated:,} truncated to a row)" if s.truncated else "")],
            ["tokens / answer tokens", f"{s.tokens:,} / {s.answer_tokens:,} ({100 * s.answer_tokens / max(1, s.tokens):.1f} %)"],
            ["packed rows per epoch", ", ".join(f"{r:,}" for r in s.rows_per_epoch)],
            ["sequences / micro-batch", c.micro_batch], ["accumulation steps", plan.accum],
            ["sequences / step", plan.step_sequences], ["steps", f"{c.steps:,}"],
            ["packed samples attend to each other", "yes" if c.cross_attention else "no"],
            ["checkpoint every", f"{c.save_every} steps (keep {c.keep})"]]
    console.print(table("SFT plan", ["", "value"], rows))
    print_run_plan("init", m, "sft", tp=par.tp, pp=par.pp, gpus=par.world, seq_len=c.seq_len,
                   micro_batch=c.micro_batch, tokens=c.steps * plan.step_tokens, rows=plan.step_sequences,
                   virtual_stages=par.virtual_stages)


# ---- run --------------------------------------------------------------------------------------------
def val_batches(plan: Plan, ctx):
    """eval_batches for fit: the held-out dialogues packed once in file order, dp ranks taking turns by row,
    micro_batch rows per forward; the same rows at every evaluation (None without --val)."""
    from llamactl.sft_data import pack
    from llamactl.tokenizer import Tokenizer

    if plan.val_samples is None:
        return None
    c = plan.cfg
    rows = pack(plan.val_samples, c.seq_len, pad_id=Tokenizer.load(plan.tokenizer).eos_id, overflow=c.overflow)
    mine = list(range(len(rows)))[ctx.dp_rank::ctx.dp]
    batches = [rows.batch(mine[i:i + c.micro_batch]) for i in range(0, len(mine), c.micro_batch)]
    return lambda: batches


RESUME_MUST_MATCH = {"data_sha256": "--data", "seq_len": "--seq-len", "batch_size": "--batch-size",
                     "cross_attention": "--no-cross-attention"}


def _check_resume(run_dir: Path, extra: dict) -> None:
    """An exact resume continues the same packed data stream: refuse other data or packing than the run's."""
    from llamactl import checkpoint

    ckpt = checkpoint.latest(run_dir)
    if ckpt is None:
        return  # fit says there is nothing to resume
    saved = checkpoint.read_meta(ckpt).get("extra") or {}
    for key, flag in RESUME_MUST_MATCH.items():
        if key in saved and saved[key] != extra[key]:
            what = "the data file's contents differ from" if key == "data_sha256" else \
                f"{key} {extra[key]!r} differs from {saved[key]!r} of"
            raise LlamactlError(f"cannot resume exactly: {what} the run's ({ckpt}, {flag})")


def run(plan: Plan, ctx, *, resume: bool = False, show_progress: bool = True, stage: str = "sft"):
    """Build this rank's model from --init (or the run's latest checkpoint with resume), train, validate.
    stage: what the checkpoint records (rejection sampling and GAtt train through here as "rs" / "gatt")."""
    import torch

    from llamactl import checkpoint
    from llamactl.flops import model_flops_per_token
    from llamactl.model import build_model
    from llamactl.sft_data import SFTBatches
    from llamactl.tokenizer import Tokenizer
    from llamactl.trainer import TrainConfig, fit
    from llamactl.ui import console, table

    c = plan.cfg
    device = c.device if c.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and ctx.world_size > 1:
        device = f"cuda:{torch.cuda.current_device()}"
    model = build_model(plan.model, ctx, "lm", device=device)
    if not resume:
        checkpoint.load(c.init, model, ctx, flag="--init")
    pad = Tokenizer.load(plan.tokenizer).eos_id
    batches = SFTBatches(plan.samples, c.seq_len, pad_id=pad, micro_batch=c.micro_batch, accum=plan.accum,
                         dp=ctx.dp, dp_rank=ctx.dp_rank, seed=c.seed, overflow=c.overflow)
    tcfg = TrainConfig(steps=c.steps, log_every=c.log_every, lr=c.lr, min_lr_ratio=c.min_lr_ratio, warmup=c.warmup, schedule=c.schedule,
                       weight_decay=c.weight_decay, clip=c.clip, save_every=c.save_every, keep=c.keep, seed=c.seed,
                       recompute=c.recompute, compile=c.compile, peak_flops=c.peak_flops, eval_every=c.eval_every,
                       zero=plan.parallel.zero, sequence_parallel=plan.parallel.sequence_parallel,
                       overlap_grad_reduce=plan.parallel.overlap_grad_reduce,
                       save_dtype=c.save_dtype)
    val = val_batches(plan, ctx)
    inputs = packed_inputs(c.cross_attention)
    from llamactl.data import sha256_file

    extra = {"seq_len": c.seq_len, "batch_size": c.batch_size, "cross_attention": c.cross_attention,
             "data": str(c.data), "data_sha256": sha256_file(Path(c.data)), "init": c.init,
             "samples": plan.stats.samples, "answer_tokens": plan.stats.answer_tokens}
    if resume:
        _check_resume(Path(c.out), extra)
    result = fit(model, ctx, tcfg, batches, run_dir=Path(c.out), inputs=inputs, tokenizer=plan.tokenizer, stage=stage,
                 resume=resume, flops_per_token=model_flops_per_token(plan.model, c.seq_len),
                 config_sections={"sft": c, "model": plan.model, "parallel": plan.parallel},
                 extra_meta=extra,
                 eval_batches=val if c.eval_every else None, show_progress=show_progress)
    rows = [["steps", result.step], ["tokens", f"{result.tokens:,}"],
            ["final train loss (answer tokens)", f"{result.last_loss:.4f}" if result.last_loss is not None else "-"]]
    if val is not None and not result.stopped_by:
        ev = result.trainer.evaluate(val())
        rows += [["validation loss (answer tokens)", f"{ev.loss:.4f}"], ["validation answer tokens", f"{ev.tokens:,}"]]
        if ctx.is_main:
            (Path(c.out) / "eval.json").write_text(json.dumps({"loss": ev.loss, "tokens": ev.tokens,
                                                               "step": result.step}))
    if ctx.is_main:
        rows.append(["checkpoint", str(result.checkpoint)])
        console.print(table("SFT done" if not result.stopped_by else f"stopped by {result.stopped_by}",
                            ["", "value"], rows))
    return result
