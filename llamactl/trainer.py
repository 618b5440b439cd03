"""The one training loop every stage uses (pretrain, sft, reward, rejection sampling, ppo, gatt).

A stage supplies a batch source (`next_step() -> list of micro-batches`, `state_dict`, `load_state_dict`)
and a loss (`loss_fn(model, batch) -> summed loss` over the batch's valid units, optionally with a dict
of summed extra metrics). The trainer normalises by the valid units of the whole global batch, so
accumulation, data parallelism and pipelining all give the gradient of one big batch.

Parallelism plugs in through `Hooks`: `step_fn` (forward + backward of one global batch; a pipeline
schedule replaces it), `reduce_grads` (data-parallel all-reduce), `grad_norm` (global norm over
tp/pp), `make_optimizer` (ZeRO-1), `count_valid` (global normaliser). Defaults are single-process.
The hooks only measure the gradient norm; the trainer applies the clip itself (`clipped_step`), inside
the fused AdamW kernel where it can.

Paper recipe: AdamW (0.9, 0.95, eps 1e-5), weight decay 0.1 on matrices only, cosine with warmup
to 10 % of peak, clip 1.0; fp32 on CPU, bf16 autocast over fp32 master weights on GPU.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from llamactl.errors import LlamactlError
from llamactl.rundir import CKPT_PREFIX, list_checkpoints, truncate_metrics



@dataclass
class TrainConfig:
    """Optimizer, schedule and loop settings shared by all stages."""

    steps: int = 100
    lr: float = 3e-4
    min_lr_ratio: float = 0.1       # cosine decays to this fraction of the peak
    warmup: int = 0
    schedule: str = "cosine"        # cosine | constant
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5
    clip: float = 1.0               # 0 disables clipping
    save_every: int = 0             # 0: save only at the end (and on SIGINT/SIGTERM)
    keep: int = 3                   # checkpoints kept in the run dir
    seed: int = 0
    recompute: bool = False         # activation recomputation per layer
    compile: bool = False           # torch.compile the model for the training step
    peak_flops: float | None = None  # FLOP/s for MFU; None: measured with a quick matmul
    log_every: int = 1

    def validate(self) -> None:
        if self.steps < 1:
            raise LlamactlError(f"steps must be >= 1, got {self.steps} (--steps/--tokens)")
        if self.lr <= 0:
            raise LlamactlError(f"learning rate must be > 0, got {self.lr} (--lr)")
        if self.warmup < 0:
            raise LlamactlError(f"warmup must be >= 0, got {self.warmup} (--warmup)")
        if self.schedule not in ("cosine", "constant"):
            raise LlamactlError(f"unknown schedule {self.schedule!r}; cosine or constant (--schedule)")
        if self.keep < 1:
            raise LlamactlError(f"keep must be >= 1, got {self.keep} (--keep)")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of update `step` (0-based): linear warmup, then cosine to min_lr_ratio * peak."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (2-D and up: linears, embeddings), never norms' gains or biases."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_adamw(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the fused kernel where torch has one for the device (CPU and CUDA both do); the fused
    one also takes the clip coefficient (see `clipped_step`)."""
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, foreach=True, **kw)


# ---- losses -----------------------------------------------------------------------------------------
def lm_loss(model: nn.Module, batch, ctx) -> torch.Tensor:
    """Summed next-token cross-entropy over unmasked targets (vocab-parallel: works at any tp), with the
    lm head fused into the loss so the full logits are never materialised."""
    from llamactl.parallel.head_loss import lm_head_cross_entropy

    hidden = model(batch.tokens, return_hidden=True)
    return lm_head_cross_entropy(hidden, model.output, batch.targets, ctx, reduction="sum")


# ---- hooks for parallelism --------------------------------------------------------------------------
@dataclass
class StepOutput:
    loss: float                     # mean over the global batch's valid units
    extras: dict[str, float] = field(default_factory=dict)


@dataclass
class Hooks:
    """Replaceable pieces of one optimizer step; None = the single-process default."""

    step_fn: Callable | None = None        # (model, micro_batches, denom) -> StepOutput; does backward
    count_valid: Callable | None = None    # (micro_batches) -> global number of valid units
    reduce_grads: Callable | None = None   # (model) -> None, after backward
    grad_norm: Callable | None = None      # (params) -> total gradient norm tensor (scales nothing)
    make_optimizer: Callable | None = None  # (param_groups, cfg) -> optimizer


def default_count_valid(micro_batches, ctx) -> int:
    n = torch.tensor(float(sum(b.num_valid for b in micro_batches)))
    if ctx.dp > 1:
        import torch.distributed as dist

        dist.all_reduce(n, group=ctx.dp_group)
    return int(n.item())


def make_default_step(loss_fn: Callable, ctx, autocast: Callable[[], Any]) -> Callable:
    """Forward + backward of each micro-batch, each scaled by 1/denom (denom = global valid units)."""

    def step_fn(model, micro_batches, denom: int) -> StepOutput:
        total = torch.zeros((), dtype=torch.float64)
        extras: dict[str, float] = {}
        for b in micro_batches:
            with autocast():
                out = loss_fn(model, b)
            loss_sum, more = out if isinstance(out, tuple) else (out, {})
            (loss_sum / denom).backward()
            total += loss_sum.detach().double().cpu()
            for k, v in more.items():
                extras[k] = extras.get(k, 0.0) + float(v)
        if ctx.dp > 1:
            import torch.distributed as dist

            dist.all_reduce(total, group=ctx.dp_group)
        return StepOutput(float(total) / denom, {k: v / denom for k, v in extras.items()})

    return step_fn


def default_reduce_grads(model: nn.Module, ctx) -> None:
    """Plain data-parallel mean of gradients (the parallel issue supplies a bucketed one)."""
    if ctx.dp == 1:
        return
    import torch.distributed as dist

    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=ctx.dp_group)


def default_grad_norm(params) -> torch.Tensor:
    """Total 2-norm of the gradients, as clip_grad_norm_ measures it (a tensor on their device)."""
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def clip_coef(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, max_norm / (norm + 1e-6)) exactly as clip_grad_norm_ computes it; kept a tensor on the norm's
    device, so clipping needs no host sync."""
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def takes_grad_scale(opt) -> bool:
    """torch's fused optimizers divide every gradient by `opt.grad_scale` inside their update kernel (the
    hook GradScaler unscales through); ZeroOptimizer forwards `defaults` and `grad_scale` to its inner one.
    foreach / for-loop AdamW assert that grad_scale is None."""
    return bool(getattr(opt, "defaults", {}).get("fused"))


def clipped_step(opt, params, norm: torch.Tensor, max_norm: float) -> None:
    """opt.step() on the gradients clipped to max_norm, given their total norm (max_norm 0: no clipping).

    A fused optimizer gets grad_scale = 1 / coef for this one step (set to None again afterwards, also
    when step raises, so it never reaches a later step): its kernel scales each gradient as it reads it
    (and writes it back scaled, as GradScaler expects), which saves clip_grad_norm_'s separate pass, one
    read of every fp32 gradient (~240 MB a step for `small`). Others get the in-place multiply
    clip_grad_norm_ does. Either way the result equals clip_grad_norm_ then step up to rounding
    (g / (1 / coef) against g * coef).
    """
    if not max_norm or max_norm <= 0:
        opt.step()
        return
    coef = clip_coef(norm, max_norm)
    if not takes_grad_scale(opt):
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, coef.to(grads[0].device))
        opt.step()
        return
    opt.grad_scale = torch.reciprocal(coef).float()
    try:
        opt.step()
    finally:
        opt.grad_scale = None


# ---- FLOPs ------------------------------------------------------------------------------------------
def model_flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (parameters in matmuls) + causal attention (6 x layers x dim x T)."""
    n = cfg.num_params() - cfg.vocab_size * cfg.dim  # the embedding is a lookup, not a matmul
    return 6.0 * n + 6.0 * cfg.n_layers * cfg.dim * seq_len


def measure_peak_flops(device: str | torch.device = "cpu", dtype=None, seconds: float = 0.5) -> float:
    """Best-of FLOP/s of a large square matmul (fp32 on CPU, bf16 on GPU): the MFU denominator."""
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    n = 8192 if device.type == "cuda" else 1536
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    best, start = float("inf"), time.perf_counter()
    torch.mm(a, b, out=c)
    while True:
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > seconds:
            break
    return 2.0 * n**3 / best


# ---- RNG state --------------------------------------------------------------------------------------
def rng_state() -> dict:
    py = random.getstate()
    npst = np.random.get_state()
    s = {"python": [py[0], list(py[1]), py[2]],
         "numpy": [npst[0], torch.from_numpy(npst[1].astype(np.int64)), int(npst[2]), int(npst[3]), float(npst[4])],
         "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    py = s["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- run dir ----------------------------------------------------------------------------------------
class _SignalFlag:
    """SIGINT / SIGTERM set a flag; the loop finishes the step, saves and stops."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _fault_injection(step: int) -> None:
    """Test hook: LLAMACTL_FAULT_AT_STEP=N sends this process LLAMACTL_FAULT_SIGNAL (KILL|TERM) after step N."""
    at = os.environ.get("LLAMACTL_FAULT_AT_STEP")
    if at and int(at) == step:
        sig = getattr(signal, "SIG" + os.environ.get("LLAMACTL_FAULT_SIGNAL", "KILL").upper())
        os.kill(os.getpid(), sig)
        if sig == signal.SIGKILL:
            time.sleep(60)


# ---- the loop ---------------------------------------------------------------------------------------
@dataclass
class FitResult:
    step: int
    tokens: int
    last_loss: float | None
    checkpoint: Path | None
    stopped_by: str | None = None   # "SIGTERM" / "SIGINT" when interrupted


def fit(model: nn.Module, ctx, cfg: TrainConfig, batches, *, run_dir: Path, loss_fn: Callable | None = None,
        hooks: Hooks | None = None, tokenizer: Path | None = None, stage: str = "pretrain", resume: bool = False,
        flops_per_token: float | None = None, config_sections: dict | None = None, extra_meta: dict | None = None,
        show_progress: bool = True) -> FitResult:
    """Train `model` for cfg.steps optimizer steps, writing metrics and checkpoints to run_dir.

    loss_fn(model, batch) returns the summed loss over the batch's valid units (default: LM cross-entropy).
    With resume, model/optimizer/scheduler/RNG/data position come from the latest complete checkpoint
    and metrics.jsonl is cut back to that step, so the continued curve equals an uninterrupted run.
    """
    from llamactl import checkpoint
    from llamactl.ui import console, err_console

    cfg.validate()
    hooks = hooks or Hooks()
    run_dir = Path(run_dir)
    device = next(model.parameters()).device
    on_gpu = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_gpu else contextlib.nullcontext
    loss_fn = loss_fn or (lambda m, b: lm_loss(m, b, ctx))
    model.train()
    model.recompute = cfg.recompute
    step_model = torch.compile(model) if cfg.compile else model
    step_fn = hooks.step_fn or make_default_step(loss_fn, ctx, autocast)
    count_valid = hooks.count_valid or (lambda mbs: default_count_valid(mbs, ctx))
    reduce_grads = hooks.reduce_grads or (lambda m: default_reduce_grads(m, ctx))
    grad_norm = hooks.grad_norm or default_grad_norm
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (hooks.make_optimizer or make_adamw)(param_groups(model, cfg.weight_decay), cfg)
    metrics_path = run_dir / "metrics.jsonl"

    step, tokens = 0, 0
    existing = list_checkpoints(run_dir)
    if resume:
        ckpt = checkpoint.latest(run_dir)
        if ckpt is None:
            raise LlamactlError(f"nothing to resume: no complete checkpoint in {run_dir} (--resume, --out)")
        checkpoint.load(ckpt, model, ctx)
        state = checkpoint.load_train_state(ckpt, ctx)
        if state is None:
            raise LlamactlError(f"checkpoint has no train_state, cannot resume exactly ({ckpt})")
        opt.load_state_dict(state["optimizer"])
        batches.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        step, tokens = int(state["step"]), int(state["tokens"])
        if ctx.is_main:
            truncate_metrics(metrics_path, step)
            err_console.print(f"resuming from {ckpt} (step {step}, {tokens:,} tokens)")
    else:
        if existing:
            raise LlamactlError(f"run dir already holds checkpoints ({run_dir}); pass --resume to continue "
                                f"or choose another --out")
        seed_everything(cfg.seed)
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            metrics_path.write_text("")
    if ctx.is_main and config_sections is not None:
        from llamactl.config import dump_toml

        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(dump_toml(config_sections))

    peak = cfg.peak_flops or (measure_peak_flops(device) if flops_per_token else None)
    tb = _tensorboard(run_dir) if ctx.is_main else None

    def save(at_step: int) -> Path:
        state = {"optimizer": opt.state_dict(), "data": batches.state_dict(), "rng": rng_state(),
                 "step": at_step, "tokens": tokens, "schedule": {"lr": lr_at(max(at_step - 1, 0), cfg)}}
        path = checkpoint.save(run_dir / f"{CKPT_PREFIX}{at_step:06d}", model, ctx, tokenizer=tokenizer, stage=stage,
                               step=at_step, tokens=tokens, train_state=state, extra=extra_meta)
        if ctx.is_main:
            checkpoint.set_latest(run_dir, path)
            for old in list_checkpoints(run_dir)[:-cfg.keep]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    from rich.progress import TextColumn
    from llamactl.ui import progress

    last_loss, last_ckpt, stopped = None, None, None
    with _SignalFlag() as flag, progress(TextColumn("{task.fields[stats]}"),
                                         disable=not (show_progress and ctx.is_main)) as bar:
        task = bar.add_task(stage, total=cfg.steps, completed=step, stats="")
        while step < cfg.steps:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            micro = [b.to(device) for b in batches.next_step()]
            denom = count_valid(micro)
            if denom == 0:
                raise LlamactlError(f"global batch of step {step + 1} has no tokens that carry loss (data / masks)")
            out = step_fn(step_model, micro, denom)
            if not math.isfinite(out.loss):
                raise LlamactlError(f"loss is {out.loss} at step {step + 1}; stopped without saving "
                                    f"(last good checkpoint: {checkpoint.latest(run_dir) or 'none'}); "
                                    f"try a lower --lr or longer --warmup")
            reduce_grads(model)
            norm = grad_norm(params)
            gnorm = float(norm)  # the step's one host sync: metrics, and no update from a broken gradient
            if not math.isfinite(gnorm):
                raise LlamactlError(f"gradient norm is {gnorm} at step {step + 1}; stopped without saving "
                                    f"(last good checkpoint: {checkpoint.latest(run_dir) or 'none'})")
            clipped_step(opt, params, norm, cfg.clip)
            opt.zero_grad(set_to_none=True)
            if on_gpu:
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            step_tokens = sum(b.num_tokens for b in micro) * ctx.dp
            step, tokens, last_loss = step + 1, tokens + step_tokens, out.loss
            tps = step_tokens / dt
            mfu = (tps * flops_per_token / (peak * ctx.world_size)) if (flops_per_token and peak) else None
            row = {"step": step, "loss": out.loss, "lr": lr, "grad_norm": gnorm, "tokens": tokens,
                   "tokens_per_s": tps, "mfu": mfu, **out.extras}
            if ctx.is_main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                if tb is not None:
                    for k, v in row.items():
                        if k != "step" and isinstance(v, (int, float)):
                            tb.add_scalar(f"{stage}/{k}", v, step)
            stats = f"loss {out.loss:.4f} lr {lr:.2e} gnorm {gnorm:.3f} {tps:,.0f} tok/s"
            if mfu is not None:
                stats += f" MFU {100 * mfu:.1f}%"
            bar.update(task, completed=step, stats=stats)
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                last_ckpt = save(step)
            _fault_injection(step)
            if flag.signum is not None and step < cfg.steps:
                stopped = signal.Signals(flag.signum).name
                break
        if stopped or step >= cfg.steps:
            done = checkpoint.latest(run_dir)
            if done is None or done.name != f"{CKPT_PREFIX}{step:06d}":
                last_ckpt = save(step)
    if tb is not None:
        tb.close()
    if stopped and ctx.is_main:
        console.print(f"stopped by {stopped} after step {step}; checkpoint saved to {last_ckpt} "
                      f"(continue with --resume)")
    return FitResult(step, tokens, last_loss, last_ckpt or checkpoint.latest(run_dir), stopped)


def _tensorboard(run_dir: Path):
    """TensorBoard event files only when tensorboard is installed (an optional extra)."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter
    except Exception:
        return None
    return SummaryWriter(str(run_dir / "tb"))
