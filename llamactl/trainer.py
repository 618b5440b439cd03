"""The one training step and the one training loop every stage uses (pretrain, sft, reward, rejection
sampling, ppo, gatt).

`Trainer(model, ctx, cfg, loss_fn)` owns one model's optimizer step: `.step(micro_batches) -> StepOutput`
runs forward + backward of the global batch (the 1F1B pipeline schedule, which at pp 1 is plain gradient
accumulation), the data-parallel gradient sum, the global gradient norm, the clipped AdamW update, the
learning-rate schedule and the step / token counters. `state_dict()` / `load_state_dict()` hold what an
exact resume needs of it; `save(dir)` writes a checkpoint. A stage with its own loop (PPO: policy and
value) drives `.step` itself; `fit` is the loop around one Trainer: progress bar, metrics.jsonl, in-loop
validation, callbacks, checkpoints every N steps and on SIGINT / SIGTERM, exact resume.

The loss has one signature at every layout: `loss_fn(output, batch)` returns the summed loss over the
batch's valid units (or (summed loss, {metric: summed value})); with `needs_hidden = True` the model returns
its final hidden states and the loss applies the head (the fused LM head loss). The step divides by the
valid units of the whole global batch, so accumulation, data parallelism and pipelining all give the
gradient of one big batch. Model inputs beyond the token ids come from `inputs(batch)` (see
parallel/pipeline.py: keyword inputs on every pipeline stage).

fp32 on CPU; bf16 autocast over fp32 master weights on GPU.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from llamactl.errors import LlamactlError
from llamactl.optim import clipped_step, lr_at, make_adamw, param_groups
from llamactl.parallel.data import GradNorm, GradReducer, count_valid
from llamactl.parallel.pipeline import StepOutput, batch_inputs, forward_only, lm_output_loss, pipeline_step
from llamactl.parallel.sequence import use_sequence_parallel
from llamactl.rundir import list_checkpoints, recover, remove_checkpoint, step_dir, truncate_metrics

SAVE_DTYPES = ("bfloat16", "float32", "float16")


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
    sequence_parallel: bool | None = False  # Megatron-SP in the tp group; None: on for NCCL, off on gloo
    compile: bool = False           # torch.compile the model for the training step
    peak_flops: float | None = None  # FLOP/s for MFU; None: measured with a quick matmul
    log_every: int = 10             # plain log line every N steps when stdout is not a terminal (ui.TrainProgress)
    eval_every: int = 0             # validation every N steps (0: never; needs eval batches)
    zero: bool = False              # ZeRO-1: AdamW state sharded over data parallel
    save_dtype: str = "bfloat16"    # stored weights; fp32 masters stay in train_state for exact resume
    bucket_mb: float = 25.0         # data-parallel gradient all-reduce bucket size
    overlap_grad_reduce: bool = True  # dp buckets launched from backward hooks as they fill (parallel/data.py)

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
        if self.clip < 0:
            raise LlamactlError(f"clip must be >= 0 (0: off), got {self.clip} (--clip)")
        if self.save_every < 0:
            raise LlamactlError(f"save_every must be >= 0, got {self.save_every} (--save-every)")
        if self.log_every < 1:
            raise LlamactlError(f"log_every must be >= 1, got {self.log_every} (--log-every)")
        if self.eval_every < 0:
            raise LlamactlError(f"eval_every must be >= 0 (0: off), got {self.eval_every} (--eval-every)")
        if self.save_dtype not in SAVE_DTYPES:
            raise LlamactlError(f"unknown save dtype {self.save_dtype!r}; one of {', '.join(SAVE_DTYPES)} (--save-dtype)")


def lm_loss(model: nn.Module, ctx) -> Callable:
    """The language-model loss_fn of `model`: summed next-token cross-entropy over unmasked targets
    (vocab-parallel: any tp), the lm head fused into it on the last stage so full logits never exist."""
    return lm_output_loss(ctx, head=getattr(model, "output", None))


class NonFiniteError(LlamactlError):
    """A step produced a non-finite loss or gradient norm; the weights were not updated."""


# ---- the step -----------------------------------------------------------------------------------------
class Trainer:
    """One model's optimizer step at any layout (tp / pp / dp, ZeRO-1 with cfg.zero).

    loss_fn(output, batch) -> summed loss (see module doc; default: LM cross-entropy with the fused head).
    inputs(batch) -> (token ids, {keyword: tensor}) for the model's forward (default: batch.tokens and
    batch.model_inputs() if the batch has it).
    """

    def __init__(self, model: nn.Module, ctx, cfg: TrainConfig, loss_fn: Callable | None = None, *,
                 inputs: Callable = batch_inputs):
        cfg.validate()
        self.model, self.ctx, self.cfg = model, ctx, cfg
        self.device = next(model.parameters()).device
        on_gpu = self.device.type == "cuda"
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_gpu else contextlib.nullcontext
        self.loss_fn = loss_fn if loss_fn is not None else lm_loss(model, ctx)
        self.inputs = inputs
        model.train()
        model.recompute = cfg.recompute
        model.sequence_parallel = use_sequence_parallel(cfg.sequence_parallel, ctx, self.device)
        self._fwd = torch.compile(model) if cfg.compile else model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_adamw(param_groups(model, cfg.weight_decay), cfg, ctx)
        self._reduce = GradReducer(self.params, ctx, cfg.bucket_mb, overlap=cfg.overlap_grad_reduce,
                                   optimizer=self.optimizer)  # ZeRO-1: reduce-scatter into the optimizer's shard
        self._norm = GradNorm(model, ctx)
        self.global_step = 0            # optimizer steps done
        self.tokens = 0                 # training tokens seen (all dp ranks)

    def step(self, micro_batches: Sequence) -> StepOutput:
        """One optimizer step on the global batch whose this-rank micro-batches are given; the same result on
        every rank. Raises NonFiniteError (weights untouched) on a non-finite loss or gradient norm."""
        n = self.global_step + 1
        lr = lr_at(self.global_step, self.cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        micro = [b.to(self.device) for b in micro_batches]
        denom = count_valid(micro, self.ctx, self.device)
        if denom == 0:
            raise LlamactlError(f"global batch of step {n} has no tokens that carry loss (data / masks)")
        self._reduce.begin(len(micro))  # hooks launch each bucket after its last micro-batch's backward
        out = pipeline_step(self._fwd, micro, self.ctx, self.loss_fn, denom, inputs=self.inputs,
                            autocast=self.autocast)
        grads = self._reduce()  # waits for the buckets in flight; the model's params, or the ZeRO-1 shard's
        if not math.isfinite(out.loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(f"loss is {out.loss} at step {n}")
        norm = self._norm(grads, dp_sharded=self._reduce.sharded)
        gnorm = float(norm)  # the step's one host sync: metrics, and no update from a broken gradient
        if not math.isfinite(gnorm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(f"gradient norm is {gnorm} at step {n}")
        clipped_step(self.optimizer, grads, norm, self.cfg.clip)
        self.optimizer.zero_grad(set_to_none=True)
        out.tokens = sum(b.num_tokens for b in micro) * self.ctx.dp
        out.grad_norm, out.lr = gnorm, lr
        self.global_step, self.tokens = n, self.tokens + out.tokens
        return out

    @torch.no_grad()
    def evaluate(self, micro_batches: Sequence) -> StepOutput:
        """Mean loss (and metrics) of held-out micro-batches over their valid units, summed over dp; forwards
        only, through the pipeline at pp > 1. The model is back in training mode afterwards."""
        micro = [b.to(self.device) for b in micro_batches]
        denom = count_valid(micro, self.ctx, self.device)
        if denom == 0:
            raise LlamactlError("validation batches hold no tokens that carry loss (held-out data)")
        was = self.model.training
        self.model.eval()
        try:
            out = forward_only(self.model, micro, self.ctx, self.loss_fn, inputs=self.inputs, autocast=self.autocast)
        finally:
            self.model.train(was)
        return StepOutput(out.loss / denom, {k: v / denom for k, v in out.extras.items()}, tokens=denom)

    # ---- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's part of an exact resume: optimizer state (this dp shard under ZeRO-1), counters."""
        return {"optimizer": self.optimizer.state_dict(), "step": self.global_step, "tokens": self.tokens,
                "schedule": {"lr": lr_at(max(self.global_step - 1, 0), self.cfg)}}

    def load_state_dict(self, state: dict) -> None:
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:  # e.g. ZeRO-1 state of another layout, or plain AdamW state under --zero
            raise LlamactlError(f"optimizer state does not fit this run: {e} (--zero/--tp/--pp/--nproc)") from None
        self.global_step, self.tokens = int(state["step"]), int(state["tokens"])

    def save(self, out_dir: Path, *, train_state: dict | None = None, tokenizer=None, stage: str = "",
             extra: dict | None = None) -> Path:
        """Checkpoint of the model (weights in cfg.save_dtype) with this trainer's state, plus `train_state`
        (the loop's part: data position, RNG) merged in. Collective over all ranks."""
        from llamactl import checkpoint

        state = {**self.state_dict(), **(train_state or {})}
        return checkpoint.save(out_dir, self.model, self.ctx, tokenizer=tokenizer, stage=stage,
                               step=self.global_step, tokens=self.tokens, train_state=state, extra=extra,
                               dtype=getattr(torch, self.cfg.save_dtype))

    def load(self, ckpt: Path) -> dict:
        """Weights (exact fp32 masters too), optimizer and counters from a checkpoint this run saved; returns
        its whole train state (the loop reads its own keys: data, rng)."""
        from llamactl import checkpoint

        meta = checkpoint.load(ckpt, self.model, self.ctx)
        state = checkpoint.load_train_state(ckpt, self.ctx, model=self.model, meta=meta)
        if state is None:
            raise LlamactlError(f"checkpoint has no train_state, cannot resume exactly ({ckpt})")
        self.load_state_dict(state)
        return state


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


# ---- signals ----------------------------------------------------------------------------------------
# Exit status of a run stopped by a signal after its checkpoint was saved: 128 + the signal's number, as a
# shell reports a process killed by it, so a scheduler tells it from a finished run (0).
STOP_EXIT_CODES = {"SIGINT": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}


class SignalFlag:
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

    @property
    def name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def fault_injection(step: int) -> None:
    """Test hook: LLAMACTL_FAULT_AT_STEP=N sends this process LLAMACTL_FAULT_SIGNAL (KILL|TERM) after step N."""
    at = os.environ.get("LLAMACTL_FAULT_AT_STEP")
    if at and int(at) == step:
        sig = getattr(signal, "SIG" + os.environ.get("LLAMACTL_FAULT_SIGNAL", "KILL").upper())
        os.kill(os.getpid(), sig)
        if sig == signal.SIGKILL:
            time.sleep(60)


def stop_reason(step: int, last: int, flag: SignalFlag, asked: bool, asked_name: str = "callback") -> str | None:
    """Why a loop stops after `step` of `last` (its checkpoint already written): a signal's name, `asked_name`
    when the loop itself asked (a callback, early stopping), or None to go on. Runs the fault-injection hook
    first, so every loop (fit, PPO) can be killed at a chosen step in tests."""
    fault_injection(step)
    if step >= last:
        return None
    if flag.name is not None:
        return flag.name
    return asked_name if asked else None


# ---- the loop ---------------------------------------------------------------------------------------
@dataclass
class FitResult:
    step: int
    tokens: int
    last_loss: float | None
    checkpoint: Path | None
    stopped_by: str | None = None   # "SIGTERM" / "SIGINT" when interrupted, "callback" when a callback asked
    trainer: Trainer | None = None  # the one that ran: model, optimizer, counters

    @property
    def exit_code(self) -> int:
        """0 for a finished run (or one a callback stopped), 128 + signal number for a signal's stop."""
        return STOP_EXIT_CODES.get(self.stopped_by or "", 0)


# callback(trainer, row) after every metrics row (training: "split": "train", validation: "split": "val");
# returning True stops the run after this step (checkpoint saved), e.g. PPO's early stopping.
Callback = Callable[[Trainer, dict], Any]


def fit(model: nn.Module, ctx, cfg: TrainConfig, batches, *, run_dir: Path, loss_fn: Callable | None = None,
        inputs: Callable = batch_inputs, tokenizer: Path | None = None, stage: str = "pretrain", resume: bool = False,
        flops_per_token: float | None = None, config_sections: dict | None = None, extra_meta: dict | None = None,
        eval_batches: Callable[[], Sequence] | None = None, callbacks: Sequence[Callback] = (),
        show_progress: bool = True) -> FitResult:
    """Train `model` for cfg.steps optimizer steps, writing metrics and checkpoints to run_dir.

    batches: `next_step() -> this rank's micro-batches of the next global batch`, `state_dict()`,
    `load_state_dict()`. eval_batches() -> held-out micro-batches scored every cfg.eval_every steps (and
    after the last step), rows with "split": "val". With resume, model / optimizer / schedule / RNG / data
    position come from the latest complete checkpoint and metrics.jsonl is cut back to that step, so the
    continued curve equals an uninterrupted run.
    """
    from llamactl import checkpoint

    cfg.validate()
    if cfg.eval_every and eval_batches is None:
        raise LlamactlError("eval_every is set but the stage has no held-out data to evaluate (--eval-every)")
    run_dir = Path(run_dir)
    trainer = Trainer(model, ctx, cfg, loss_fn, inputs=inputs)
    metrics_path = run_dir / "metrics.jsonl"

    if resume:
        ckpt = recover(run_dir) if ctx.is_main else checkpoint.latest(run_dir)  # main: drop killed writers' leftovers
        if ckpt is None:
            raise LlamactlError(f"nothing to resume: no complete checkpoint in {run_dir} (--resume, --out)")
        state = trainer.load(ckpt)
        batches.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        if ctx.is_main:
            truncate_metrics(metrics_path, trainer.global_step)
            from llamactl.ui import err_console

            err_console.print(f"resuming from {ckpt} (step {trainer.global_step}, {trainer.tokens:,} tokens)")
    else:
        if list_checkpoints(run_dir):
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

    from llamactl.flops import mfu as sane_mfu, run_peak_flops

    peak = cfg.peak_flops or (run_peak_flops(trainer.device, ctx) if flops_per_token else None)
    log = _MetricsLog(metrics_path, stage, ctx.is_main)

    def save() -> Path:
        path = trainer.save(step_dir(run_dir, trainer.global_step), tokenizer=tokenizer, stage=stage,
                            extra=extra_meta, train_state={"data": batches.state_dict(), "rng": rng_state()})
        if ctx.is_main:
            checkpoint.set_latest(run_dir, path)
            for old in list_checkpoints(run_dir)[:-cfg.keep]:
                remove_checkpoint(old)
        return path

    def report(row: dict) -> bool:
        log.write(row)
        return any(bool(cb(trainer, row)) for cb in callbacks)

    def validate() -> bool:
        ev = trainer.evaluate(eval_batches())
        return report({"step": trainer.global_step, "split": "val", "loss": ev.loss, "tokens": trainer.tokens,
                       "eval_tokens": ev.tokens, **ev.extras})

    from llamactl.ui import TrainProgress

    last_loss, last_ckpt, stopped = None, None, None
    with SignalFlag() as flag, TrainProgress(stage, cfg.steps, trainer.global_step, every=cfg.log_every, peak=peak,
                                             enabled=show_progress and ctx.is_main, measured=not cfg.peak_flops) as bar:
        while trainer.global_step < cfg.steps:
            t0 = time.perf_counter()
            try:
                out = trainer.step(batches.next_step())
            except NonFiniteError as e:
                raise LlamactlError(f"{e}; stopped without saving (last good checkpoint: "
                                    f"{checkpoint.latest(run_dir) or 'none'}); try a lower --lr or longer --warmup") from None
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            dt = time.perf_counter() - t0
            step, last_loss = trainer.global_step, out.loss
            tps = out.tokens / dt
            mfu = (tps * flops_per_token / (peak * ctx.world_size)) if (flops_per_token and peak) else None
            row = {"step": step, "split": "train", "loss": out.loss, "lr": out.lr, "grad_norm": out.grad_norm,
                   "tokens": trainer.tokens, "tokens_per_s": tps,
                   "mfu": sane_mfu(tps, flops_per_token, peak, ctx.world_size), **out.extras}
            asked = report(row)
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                asked = validate() or asked
            bar.step(step, loss=out.loss, lr=out.lr, grad_norm=out.grad_norm, tokens_per_s=tps, mfu=mfu)
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                last_ckpt = save()
            stopped = stop_reason(step, cfg.steps, flag, asked)
            if stopped:
                break
        if stopped or trainer.global_step >= cfg.steps:
            done = checkpoint.latest(run_dir)
            if done is None or done.name != step_dir(run_dir, trainer.global_step).name:
                last_ckpt = save()
    log.close()
    if stopped in STOP_EXIT_CODES and ctx.is_main:
        from llamactl.ui import console

        console.print(f"stopped by {stopped} after step {trainer.global_step}; checkpoint saved to {last_ckpt} "
                      f"(continue with --resume)")
    return FitResult(trainer.global_step, trainer.tokens, last_loss, last_ckpt or checkpoint.latest(run_dir), stopped,
                     trainer)


class _MetricsLog:
    """metrics.jsonl (one JSON object per row) and, when tensorboard is installed, its event files; only the
    main rank writes."""

    def __init__(self, path: Path, stage: str, main: bool):
        self.path, self.stage, self.main = path, stage, main
        self.tb = _tensorboard(path.parent) if main else None

    def write(self, row: dict) -> None:
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            prefix = self.stage if row.get("split", "train") == "train" else f"{self.stage}/{row['split']}"
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{prefix}/{k}", v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _tensorboard(run_dir: Path):
    """TensorBoard event files only when tensorboard is installed (an optional extra)."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter
    except Exception:
        return None
    return SummaryWriter(str(run_dir / "tb"))
