"""`llamactl pretrain` and `llamactl sft`: the two language-model training stages."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from llamactl.cli.app import SIZES, StageOptions, _peak_flops, app, stage_command


@app.command()
@stage_command("pretrain", "model", "parallel")
def pretrain(
    size: Optional[str] = typer.Option(None, "--size", help=f"Model preset: {SIZES} (default tiny)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Prepared data directory (llamactl data prepare)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (metrics, config, checkpoints)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps."),
    tokens: Optional[int] = typer.Option(None, "--tokens", help="Training tokens (alternative to --steps)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Context length of training windows (at most the model's max_seq_len)."),
    batch_tokens: Optional[int] = typer.Option(None, "--batch-tokens", help="Global batch size in tokens (accumulation fills it; a multiple of micro-batch x seq-len x dp)."),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="Sequences per forward/backward pass."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default: paper value per size)."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Warmup steps (default: min(2000, 10% of steps))."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="cosine (to 10% of peak) or constant."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N steps (0: only at the end)."),
    keep: Optional[int] = typer.Option(None, "--keep", help="Checkpoints kept in the run dir."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of weights and data order."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer (default: the one recorded with the data)."),
    recompute: Optional[bool] = typer.Option(None, "--recompute/--no-recompute", help="Activation recomputation per layer."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the training step."),
    peak_tflops: Optional[float] = typer.Option(None, "--peak-tflops", help="Peak TFLOP/s per device for MFU, e.g. 989 for an H100's bf16 (default: measured at the start)."),
    peak_flops: Optional[float] = typer.Option(None, "--peak-flops", help="The same in FLOP/s (an older spelling of --peak-tflops)."),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="When stdout is not a terminal (a cluster job's log, | tee): a plain log line every N steps instead of the progress bar (default 10)."),
    eval_tokens: Optional[int] = typer.Option(None, "--eval-tokens", help="Held-out tokens scored at the end and by --eval-every (0: skip)."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help='Validation loss on the val split every N steps, rows with "split": "val" in metrics.jsonl (0: off).'),
    save_dtype: Optional[str] = typer.Option(None, "--save-dtype", help="Stored weights: bfloat16 (default), float32 or float16; exact fp32 masters stay in train_state for --resume."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda."),
    *,
    opts: StageOptions,
):
    """Pretrain a model from scratch with the paper's recipe (AdamW, cosine to 10 %, warmup, clip 1).

    Exit status: 0 when the run finished; 130 (SIGINT) or 143 (SIGTERM) when a signal stopped it after saving a checkpoint (continue with --resume); 1 on an error.
    """
    from llamactl.plan import dry_run_plan
    from llamactl.stages import pretrain as stage
    from llamactl.stages.runner import run_stage

    if opts.dry_run and data is None and opts.config is None:
        from llamactl.stages.runner import resolve_parallel

        pflags = opts.launch.parallel_flags()
        pflags.setdefault("nproc", (pflags.get("tp") or 1) * (pflags.get("pp") or 1))  # a plan needs no processes
        par = resolve_parallel({}, pflags)
        dry_run_plan(size or "tiny", "pretrain", tp=par.tp, pp=par.pp, gpus=par.world, seq_len=seq_len,
                     micro_batch=micro_batch, tokens=tokens, zero=par.zero, virtual_stages=par.virtual_stages)
        return
    flags = dict(size=size, data=str(data) if data else None, out=str(out) if out else None, steps=steps,
                 tokens=tokens, seq_len=seq_len, batch_tokens=batch_tokens, micro_batch=micro_batch, lr=lr,
                 warmup=warmup, schedule=schedule, save_every=save_every, keep=keep, seed=seed,
                 tokenizer=str(tokenizer) if tokenizer else None, recompute=recompute, compile=compile,
                 peak_flops=_peak_flops(peak_flops, peak_tflops), eval_tokens=eval_tokens, eval_every=eval_every,
                 log_every=log_every, save_dtype=save_dtype,
                 device=device)
    run_stage(stage.resolve, stage.describe, stage.run, flags=flags, launch=opts.launch, config=opts.config,
              dry_run=opts.dry_run, resume=opts.resume)


@app.command()
@stage_command("sft", "parallel")
def sft(
    init: Optional[Path] = typer.Option(None, "--init", help="Pretrained checkpoint (or run dir: its latest); the model config and tokenizer come from it."),
    data: Optional[Path] = typer.Option(None, "--data", help='SFT JSONL: {"messages": \\[system?, user, assistant, ...]} or {"prompt", "response"} per line.'),
    val: Optional[Path] = typer.Option(None, "--val", help="Held-out SFT JSONL: validation loss on its answer tokens at the end and every --eval-every steps."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (metrics, config, checkpoints; default runs/sft)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Passes over the data; the steps follow from the packed rows (default 2, the paper's)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (overrides --epochs)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per packed row (default min(4096, the model's max_seq_len))."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Packed rows per optimizer step over all data-parallel ranks (default 64)."),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="Rows per forward/backward (default: up to 8192 tokens)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default 2e-5)."),
    min_lr_ratio: Optional[float] = typer.Option(None, "--min-lr-ratio", help="Cosine decays to this fraction of the peak (default 0.1)."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Warmup steps (default 0)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="cosine (default) or constant."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay on matrices (default 0.1)."),
    clip: Optional[float] = typer.Option(None, "--clip", help="Gradient-norm clip (default 1.0; 0: off)."),
    cross_attention: Optional[bool] = typer.Option(None, "--cross-attention/--no-cross-attention", help="--no-cross-attention: each packed sample attends only to its own earlier tokens and its RoPE positions restart at 0, so a packed row computes what every sample would alone (default: the paper's plain concatenation)."),
    overflow: Optional[str] = typer.Option(None, "--overflow", help="A dialogue longer than a row: truncate (default) or refuse."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N steps (0: only at the end; default a quarter of the run)."),
    keep: Optional[int] = typer.Option(None, "--keep", help="Checkpoints kept in the run dir (default 3)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the data order (default 0)."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help='Validation loss on --val every N steps, rows with "split": "val" in metrics.jsonl (0: only at the end).'),
    recompute: Optional[bool] = typer.Option(None, "--recompute/--no-recompute", help="Activation recomputation per layer."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the training step."),
    peak_tflops: Optional[float] = typer.Option(None, "--peak-tflops", help="Peak TFLOP/s per device for MFU, e.g. 989 for an H100's bf16 (default: measured at the start)."),
    peak_flops: Optional[float] = typer.Option(None, "--peak-flops", help="The same in FLOP/s (an older spelling of --peak-tflops)."),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="When stdout is not a terminal (a cluster job's log, | tee): a plain log line every N steps instead of the progress bar (default 10)."),
    save_dtype: Optional[str] = typer.Option(None, "--save-dtype", help="Stored weights: bfloat16 (default), float32 or float16; exact fp32 masters stay in train_state for --resume."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda."),
    *,
    opts: StageOptions,
):
    """Supervised fine-tuning (paper 3.1): Llama 2-Chat format, samples packed into rows, loss on answer tokens only.

    Every assistant turn of a dialogue carries loss (its EOS included); system, user and format tokens never do. Paper defaults: lr 2e-5 cosine, weight decay 0.1, 64 rows of 4096 tokens per step, 2 epochs. Writes a chat checkpoint (stage "sft") that `llamactl chat` and `llamactl eval tasks` load.

    Exit status: 0 when the run finished; 130 (SIGINT) or 143 (SIGTERM) when a signal stopped it after saving a checkpoint (continue with --resume); 1 on an error.
    """
    from llamactl.stages import sft as stage
    from llamactl.stages.runner import run_stage

    flags = dict(init=str(init) if init else None, data=str(data) if data else None, val=str(val) if val else None,
                 out=str(out) if out else None, epochs=epochs, steps=steps, seq_len=seq_len, batch_size=batch_size,
                 micro_batch=micro_batch, lr=lr, min_lr_ratio=min_lr_ratio, warmup=warmup, schedule=schedule,
                 weight_decay=weight_decay, clip=clip, cross_attention=cross_attention, overflow=overflow,
                 save_every=save_every, keep=keep, seed=seed, eval_every=eval_every, recompute=recompute,
                 compile=compile, peak_flops=_peak_flops(peak_flops, peak_tflops), log_every=log_every,
                 save_dtype=save_dtype, device=device)
    run_stage(stage.resolve, stage.describe, stage.run, flags=flags, launch=opts.launch, config=opts.config,
              dry_run=opts.dry_run, resume=opts.resume)
