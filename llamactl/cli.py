"""The `llamactl` command line: parse, validate, call one stage function. No logic lives here.

Errors a user can cause are printed as one line, `error: <what> (<where>)`, with exit code 1;
`llamactl --debug ...` shows the traceback instead.
"""
from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from llamactl.errors import LlamactlError
from llamactl.parallel.context import LayoutError
from llamactl.stages.runner import LaunchOptions
from llamactl.ui import console, err_console, table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train Llama 2 / Llama 2-Chat models the way the paper did, from one CPU to a GPU cluster.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train, inspect and use SentencePiece tokenizers.")
app.add_typer(tokenizer_app, name="tokenizer")

_state = {"debug": False}

SIZES = "tiny, small, 7b, 13b, 34b, 70b"


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors.")):
    _state["debug"] = debug


# ---- plan -------------------------------------------------------------------------------------------
@app.command()
def plan(
    size: str = typer.Option("7b", "--size", help=f"Model preset: {SIZES}."),
    stage: str = typer.Option("pretrain", "--stage", help="pretrain, sft, rm or ppo (ppo: policy + value train, reference + 2 reward models frozen)."),
    gpus: int = typer.Option(8, "--gpus", help="Total GPUs."),
    gpu_mem: float = typer.Option(80.0, "--gpu-mem", help="Memory per GPU in GiB."),
    nodes: Optional[int] = typer.Option(None, "--nodes", help="Nodes the GPUs are spread over (default: 8 GPUs per node); tp stays within a node."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Sequence length (default 4096, the paper's)."),
    micro_batch: int = typer.Option(1, "--micro-batch", help="Sequences per micro-batch."),
    tokens: Optional[float] = typer.Option(None, "--tokens", help="Total training tokens, for time and GPU hours (e.g. 2e12)."),
    mfu: float = typer.Option(0.4, "--mfu", help="Assumed model FLOPs utilisation for the time estimate."),
    peak_tflops: float = typer.Option(312.0, "--peak-tflops", help="Peak TFLOP/s per GPU (A100 bf16: 312)."),
    tp: Optional[int] = typer.Option(None, "--tp", help="Evaluate this tensor-parallel size instead of searching."),
    pp: Optional[int] = typer.Option(None, "--pp", help="Evaluate this pipeline-parallel size instead of searching."),
    virtual_stages: int = typer.Option(1, "--virtual-stages", help="Interleaved 1F1B: model chunks per pipeline rank (bubble (p-1)/(V*m+p-1)); layouts whose stages do not split into V equal chunks use 1."),
):
    """Memory per GPU, a TP/PP/DP layout (sequence parallel, selective / full recomputation, ZeRO-1, interleaved
    1F1B), step time from FLOPs, checked on the meta device (instant)."""
    from llamactl.plan import make_plan, print_plan

    print_plan(make_plan(size, stage, gpus=gpus, gpu_mem=gpu_mem, nodes=nodes, seq_len=seq_len,
                         micro_batch=micro_batch, tokens=tokens, mfu=mfu, peak_tflops=peak_tflops, tp=tp, pp=pp,
                         virtual_stages=virtual_stages))


# ---- data / pretrain / eval (issue 3) ---------------------------------------------------------------
data_app = typer.Typer(no_args_is_help=True, help="Prepare training data: tokenized shards, SFT sets, preference pairs.")
app.add_typer(data_app, name="data")


@data_app.command("prepare")
def data_prepare(
    inputs: list[Path] = typer.Option(..., "--input", help="Text file (blank-line separated documents), JSONL ({\"text\": ...}) or folder; repeatable."),
    tokenizer: Path = typer.Option(..., "--tokenizer", help="tokenizer.model (or its folder) to tokenize with."),
    out: Path = typer.Option(..., "--out", help="Output directory for shards + index.json; built beside it and swapped in only on success, so existing prepared data is replaced only by a complete new set (a folder holding other files is refused)."),
    val_fraction: float = typer.Option(0.005, "--val-fraction", help="Fraction of documents held out for validation (chosen by hash)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Tokenizer processes (default: CPU count)."),
    shard_tokens: int = typer.Option(1 << 28, "--shard-tokens", help="Maximum tokens per shard file."),
):
    """Tokenize text into uint16/uint32 shards with a held-out validation split."""
    from llamactl.data import prepare

    idx = prepare(inputs, tokenizer, out, val_fraction=val_fraction, workers=workers, shard_tokens=shard_tokens)
    rows = [[s, f"{v['documents']:,}", f"{v['tokens']:,}", len(v["shards"])] for s, v in idx["splits"].items()]
    console.print(table(f"prepared {out} ({idx['dtype']}, vocab {idx['vocab_size']})",
                        ["split", "documents", "tokens", "shards"], rows))


# ---- options every training command shares (declared once) ------------------------------------------
@dataclass
class StageOptions:
    """What every training command takes besides its own flags: the config file, --dry-run, --resume and the
    launcher flags (stages.runner.LaunchOptions)."""

    config: Optional[Path]
    dry_run: bool
    resume: bool
    launch: LaunchOptions


def _option(name: str, annotation, default, *flags: str, help: str) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Option(default, *flags, help=help))


def _stage_parameters(sections: tuple[str, ...]) -> list[inspect.Parameter]:
    names = ", ".join(rf"\[{s}]" for s in sections)  # escaped: rich markup would swallow [name]
    return [
        _option("config", Optional[Path], None, "--config", help=f"TOML file with {names} sections (flags win over it)."),
        _option("dry_run", bool, False, "--dry-run", help="Print the resolved config and plan, then stop."),
        _option("resume", bool, False, "--resume", help="Continue exactly from the latest checkpoint in --out."),
        _option("tp", Optional[int], None, "--tp", help="Tensor-parallel degree (default 1)."),
        _option("pp", Optional[int], None, "--pp", help="Pipeline-parallel degree (default 1)."),
        _option("nproc", Optional[int], None, "--nproc", help="Processes (GPUs) on this node; > 1 re-launches through torchrun (default 1)."),
        _option("zero", Optional[bool], None, "--zero/--no-zero", help="ZeRO-1: shard the AdamW state over data parallel (default off)."),
        _option("sequence_parallel", Optional[bool], None, "--sequence-parallel/--no-sequence-parallel",
                help="Megatron sequence parallelism: norms and residuals split along the sequence in the tp group (default: on when --tp > 1)."),
        _option("virtual_stages", Optional[int], None, "--virtual-stages",
                help="Interleaved 1F1B: model chunks per pipeline rank; the bubble falls V-fold (default 1)."),
        _option("overlap_grad_reduce", Optional[bool], None, "--overlap-grad-reduce/--no-overlap-grad-reduce",
                help="Reduce data-parallel gradient buckets from backward hooks as they fill (default on)."),
        _option("nnodes", Optional[int], None, "--nnodes", help="Nodes (run the same command on each; passed to torchrun; default 1)."),
        _option("node_rank", int, 0, "--node-rank", help="This node's rank, 0..nnodes-1 (passed to torchrun)."),
        _option("master_addr", Optional[str], None, "--master-addr", help="Address of node 0 (passed to torchrun)."),
        _option("master_port", Optional[int], None, "--master-port", help="Port on node 0 (passed to torchrun)."),
    ]


def stage_command(*sections: str):
    """Decorator for a training command: adds the shared options (`_stage_parameters`) to its signature, and
    hands them to it as one `opts: StageOptions` argument. A new stage command declares only its own flags."""

    def wrap(fn):
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.name != "opts"]
        extra = _stage_parameters(sections)
        names = [p.name for p in extra]

        @functools.wraps(fn)
        def command(*args, **kwargs):
            v = {k: kwargs.pop(k) for k in names}
            launch = LaunchOptions(tp=v["tp"], pp=v["pp"], nproc=v["nproc"], nnodes=v["nnodes"], zero=v["zero"],
                                   sequence_parallel=v["sequence_parallel"], virtual_stages=v["virtual_stages"],
                                   overlap_grad_reduce=v["overlap_grad_reduce"], node_rank=v["node_rank"], master_addr=v["master_addr"], master_port=v["master_port"])
            return fn(*args, opts=StageOptions(v["config"], v["dry_run"], v["resume"], launch), **kwargs)

        command.__signature__ = sig.replace(parameters=own + extra)
        return command

    return wrap


def _peak_flops(flops: float | None, tflops: float | None) -> float | None:
    """--peak-tflops (TFLOP/s) or its older spelling --peak-flops (FLOP/s), as FLOP/s."""
    if tflops is None:
        return flops
    if flops is not None:
        raise LlamactlError("give the peak once: --peak-tflops or --peak-flops (--peak-tflops)")
    if not tflops > 0:
        raise LlamactlError(f"peak TFLOP/s must be > 0, got {tflops} (--peak-tflops)")
    return tflops * 1e12


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


def default_subcommand(name: str) -> type[TyperGroup]:
    """A command group where flags with no sub-command named run `name`: `llamactl eval --model M --data D`
    means `llamactl eval loss ...`, `llamactl gatt --model M ...` means `llamactl gatt train ...`."""

    class DefaultGroup(TyperGroup):
        def parse_args(self, ctx, args):
            if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
                args = [name, *args]
            return super().parse_args(ctx, args)

    DefaultGroup.__name__ = DefaultGroup.__qualname__ = f"DefaultTo_{name}"
    return DefaultGroup


_DefaultToLoss = default_subcommand("loss")

eval_app = typer.Typer(cls=_DefaultToLoss, no_args_is_help=True,
                       help="Evaluate a checkpoint: loss on held-out tokens (the default), or task-suite scores.")
app.add_typer(eval_app, name="eval")


@eval_app.command("loss")
def eval_cmd(
    model: Path = typer.Option(..., "--model", help="Checkpoint directory to score."),
    data: Path = typer.Option(..., "--data", help="Prepared data directory (llamactl data prepare)."),
    split: str = typer.Option("val", "--split", help="Split to score: val or train."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Window length (default: the training one)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Windows per forward pass."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Score at most this many tokens."),
):
    """Loss (nats/token) and perplexity of a checkpoint on held-out tokens."""
    from llamactl.stages.evaluate import run_eval

    for flag, value in (("--seq-len", seq_len), ("--batch-size", batch_size), ("--max-tokens", max_tokens)):
        if value is not None and value < 1:  # given values are used or refused, never replaced by a default
            raise LlamactlError(f"{flag} must be >= 1, got {value} ({flag})")
    r = run_eval(model, data, split=split, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens)
    console.print(table(f"eval of {model} on {data} ({r.split})", ["metric", "value"],
                        [["loss (nats/token)", f"{r.loss:.4f}"], ["perplexity", f"{r.perplexity:.3f}"],
                         ["tokens", f"{r.tokens:,}"], ["seq_len", r.seq_len]]))


# ---- tokenizer (issue 2) ----------------------------------------------------------------------------
@tokenizer_app.command("train")
def tokenizer_train(
    inputs: list[Path] = typer.Option(..., "--input", help="Text file (one sentence per line), JSONL ({\"text\": ...}) or folder (its .txt .text .md .rst .jsonl .ndjson files, the same ones `data prepare` reads); binary or non-UTF-8 files are refused; repeatable."),
    out: Path = typer.Option(..., "--out", help="Directory to write tokenizer.model into (an existing tokenizer there is kept unless --overwrite)."),
    vocab_size: int = typer.Option(32000, "--vocab-size", help="Vocabulary size incl. 3 special and 256 byte pieces (Llama 2: 32000)."),
    character_coverage: float = typer.Option(0.99995, "--character-coverage", help="Share of characters kept as pieces; the rarest fall back to bytes."),
    max_sentences: int = typer.Option(10_000_000, "--max-sentences", help="Lines used at most (a seeded random sample when there are more)."),
    seed: int = typer.Option(0, "--seed", help="Seed of that sample (same inputs + seed = same model)."),
    threads: int = typer.Option(16, "--threads", help="Trainer threads (recorded in the model file; keep it fixed for identical files)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a tokenizer.model already in --out (never one inside a checkpoint or prepared-data folder: those record their tokenizer by hash)."),
):
    """Train a SentencePiece BPE tokenizer with the Llama settings (split digits, byte fallback, no normalisation)."""
    from llamactl.tokenizer import Tokenizer, piece_counts, train

    r = train(inputs, out, vocab_size, character_coverage=character_coverage, max_sentences=max_sentences,
              seed=seed, num_threads=threads, show_progress=True, overwrite=overwrite)
    pc = piece_counts(Tokenizer.load(r.path))
    rows = [["vocab size", f"{r.vocab_size:,}"],
            ["pieces", f"{pc['merged']:,} merged + {pc['character']:,} chars + {pc['byte']} bytes + {pc['special']} special"],
            ["input", f"{r.input_bytes / 2**20:,.2f} MiB, {r.sentences:,} lines" + (f" ({r.skipped_long:,} too long, skipped)" if r.skipped_long else "")],
            ["bytes / token", f"{r.bytes_per_token:.2f} (first MiB of input)"],
            ["time", f"{r.seconds:.1f} s"]]
    console.print(table(f"wrote {r.path}", ["", "value"], rows))


@tokenizer_app.command("encode")
def tokenizer_encode(
    tokenizer: Path = typer.Option(..., "--tokenizer", help="tokenizer.model (or a checkpoint folder holding one)."),
    text: Optional[str] = typer.Option(None, "--text", help="Text to encode (default: read standard input)."),
    chat: Optional[Path] = typer.Option(None, "--chat", help="Dialog JSON ([{role, content}, ...], last from user): encode as the Llama 2-Chat prompt."),
    bos: bool = typer.Option(False, "--bos", help="Prepend BOS to --text."),
    eos: bool = typer.Option(False, "--eos", help="Append EOS to --text."),
):
    """Print the token ids of a text, or of a dialog in the Llama 2-Chat format, as a JSON list."""
    import json

    from llamactl.tokenizer import Tokenizer, encode_dialog, read_dialog

    if text is not None and chat is not None:
        raise LlamactlError("give --text or --chat, not both")
    tok = Tokenizer.load(tokenizer, where="--tokenizer")
    ids = encode_dialog(tok, read_dialog(chat)) if chat is not None else \
        tok.encode(sys.stdin.read() if text is None else text, bos=bos, eos=eos)
    typer.echo(json.dumps(ids))


@tokenizer_app.command("decode")
def tokenizer_decode(
    ids: list[str] = typer.Argument(..., help="Token ids: separate arguments, comma separated, or one JSON list."),
    tokenizer: Path = typer.Option(..., "--tokenizer", help="tokenizer.model (or a checkpoint folder holding one)."),
    pieces: bool = typer.Option(False, "--pieces", help="Print the pieces as a JSON list instead of the text."),
):
    """Print the text of token ids (or, with --pieces, each id's piece)."""
    import json

    from llamactl.tokenizer import Tokenizer, parse_ids

    tok = Tokenizer.load(tokenizer, where="--tokenizer")
    values = parse_ids(ids)
    text = tok.decode(values)
    typer.echo(json.dumps([tok.id_to_piece(i) for i in values], ensure_ascii=False) if pieces else text)


# ---- generation and chat (issue 4) -------------------------------------------------------------------
@app.command("generate")
def generate_cmd(
    model: Path = typer.Option(..., "--model", help="Checkpoint directory to sample from."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="One prompt text (instead of --prompts)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help='JSONL file: one {"prompt": ...} or {"dialog": [...]} per line.'),
    raw: bool = typer.Option(False, "--raw", help="Feed prompts as plain text (BOS + text), without the chat template."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt added to chat-formatted prompts."),
    num_samples: int = typer.Option(1, "--num-samples", help="Samples per prompt (K)."),
    temperature: float = typer.Option(0.6, "--temperature", help="Sampling temperature; 0 = greedy."),
    top_p: float = typer.Option(0.9, "--top-p", help="Nucleus sampling mass (Meta's rule: the token that crosses p is kept)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Most tokens generated per sample."),
    seed: int = typer.Option(0, "--seed", help="Seed; every sample has its own generator, so batching changes nothing."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output JSONL (default: stdout)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Sequences decoded together."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, or auto."),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel degree: each process holds 1/tp of every layer's weights."),
    pp: int = typer.Option(1, "--pp", help="Pipeline stages: each process group holds 1/pp of the layers (with its own KV cache)."),
    nproc: int = typer.Option(1, "--nproc", help="Processes to launch on this node (torchrun); must equal --tp x --pp."),
):
    """Sample continuations: JSONL with text, token ids, per-token log-probs and finish reason."""
    from llamactl.generation import run_generate

    ctx = _generation_ranks(tp, pp, nproc, "generate")
    run_generate(model, prompt=prompt, prompts_file=prompts, raw=raw, system=system, num_samples=num_samples,
                 temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, out=out,
                 batch_size=batch_size, device=device, ctx=ctx)


def _generation_ranks(tp: int, pp: int, nproc: int, what: str):
    """Relaunch under torchrun for --nproc > 1, then this rank's tp x pp context (generation has no dp: every
    process holds a different part of one model)."""
    from llamactl.parallel.context import check_layout
    from llamactl.parallel.launch import LaunchConfig, init_distributed, maybe_relaunch, under_launcher

    if not under_launcher():  # a launched rank checks its world in init_distributed (--nproc is not passed on)
        check_layout(tp, pp, nproc=nproc)
        if nproc != tp * pp:
            raise LlamactlError(f"{what} has no data parallelism: --nproc {nproc} must equal --tp {tp} x --pp {pp}")
    maybe_relaunch(tp, pp, LaunchConfig(nproc=nproc))
    return init_distributed(tp, pp)


@app.command("chat")
def chat_cmd(
    model: Path = typer.Option(..., "--model", help="Chat checkpoint directory."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="One-shot: answer this message, print, exit."),
    temperature: float = typer.Option(0.6, "--temperature", help="Sampling temperature; 0 = greedy."),
    top_p: float = typer.Option(0.9, "--top-p", help="Nucleus sampling mass."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Most tokens per answer."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampling generators."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, or auto."),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel degree: each process holds 1/tp of every layer's weights."),
    pp: int = typer.Option(1, "--pp", help="Pipeline stages: each process group holds 1/pp of the layers (with its own KV cache)."),
    nproc: int = typer.Option(1, "--nproc", help="Processes to launch on this node (torchrun); must equal --tp x --pp."),
):
    """Chat in the terminal (streams tokens; /system, /reset, /save FILE, /exit; Ctrl-C stops an answer)."""
    from llamactl.chat import ChatSettings, run_chat

    ctx = _generation_ranks(tp, pp, nproc, "chat")
    run_chat(model, ChatSettings(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                                 system=system), prompt=prompt, device=device, ctx=ctx)


# ---- checkpoints: info, convert, export (issue 2) -------------------------------------------------------
@app.command("info")
def info_cmd(ckpt: Path = typer.Argument(..., help="Checkpoint directory (or a plain Hugging Face Llama directory).")):
    """Show what a checkpoint holds (stage, step, tokens, head, shape, files) and verify every sha256."""
    from llamactl.checkpoint import info

    info(ckpt)


@app.command("convert")
def convert_cmd(
    src: Path = typer.Argument(..., help="Source directory: a Hugging Face Llama model or Meta's consolidated.XX.pth + params.json."),
    dst: Path = typer.Argument(..., help="Output llamactl checkpoint directory."),
    from_: str = typer.Option(..., "--from", help="Source format: hf or meta."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer.model to use (default: the one in SRC or, for Meta, next to it)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Store as float32, bfloat16 or float16 (default: as in SRC)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace DST if it exists (only once the new one is complete)."),
):
    """Import a Hugging Face or Meta Llama checkpoint as a llamactl checkpoint."""
    from llamactl.convert import convert

    convert(src, dst, from_, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite)


@app.command("export")
def export_cmd(
    ckpt: Path = typer.Argument(..., help="llamactl checkpoint directory."),
    dst: Path = typer.Argument(..., help="Output directory."),
    to: str = typer.Option(..., "--to", help="Target format: hf or meta."),
    mp: int = typer.Option(1, "--mp", help="Model-parallel shards for --to meta (consolidated.00.pth ...)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Store as float32, bfloat16 or float16 (default: as in CKPT)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace DST if it exists."),
):
    """Export a llamactl checkpoint to Hugging Face (safetensors) or Meta (consolidated.XX.pth) layout."""
    from llamactl.convert import export

    export(ckpt, dst, to, mp=mp, dtype=dtype, overwrite=overwrite)


# ---- bench (issue 5) -----------------------------------------------------------------------------------
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks of llamactl's building blocks.")
app.add_typer(bench_app, name="bench")


@bench_app.command("kernels")
def bench_kernels(
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda if available, else cpu)."),
    dtypes: str = typer.Option("float32,bfloat16", "--dtypes", help="Comma-separated dtypes: float32, bfloat16."),
    mb: int = typer.Option(64, "--mb", min=1, help="Size of each case's main input tensor in MiB."),
    reps: int = typer.Option(7, "--reps", min=1, help="Timed repetitions per implementation (median)."),
    no_malloc_tune: bool = typer.Option(False, "--no-malloc-tune",
                                        help="Keep glibc's default malloc (large outputs faulted in page by page)."),
):
    """Fused RMSNorm/RoPE/SwiGLU vs eager and torch.compile (GB/s against the measured copy bandwidth)."""
    from llamactl.kernels.bench import DTYPES, report
    from llamactl.ui import progress

    names = tuple(d.strip() for d in dtypes.split(",") if d.strip())
    bad = [d for d in names if d not in DTYPES]
    if bad or not names:
        raise LlamactlError(f"unknown dtype {', '.join(bad) or dtypes!r} (--dtypes: {', '.join(DTYPES)})")
    if device not in (None, "cpu", "cuda"):
        raise LlamactlError(f"unknown device {device!r} (--device: cpu or cuda)")
    try:
        report(console, device=device, dtypes=names, target_mb=mb, reps=reps, progress_factory=progress,
               malloc_tune=not no_malloc_tune)
    except RuntimeError as e:
        if "no fused backend" in str(e):
            raise LlamactlError(f"{e} (llamactl bench kernels)") from None
        raise


# ---- offline corpus (demo, tests) -------------------------------------------------------------------
@data_app.command("corpus")
def data_corpus(
    out: Path = typer.Option(..., "--out", help="Text file to write."),
    max_mb: Optional[float] = typer.Option(None, "--max-mb", help="Stop after this many MB of text (default: all, ~2.5 MB)."),
):
    """Write real English text every machine has offline: the docs inside Python's standard library."""
    from llamactl.corpus import write_stdlib_corpus

    path = write_stdlib_corpus(out, max_bytes=int(max_mb * 1e6) if max_mb else None)
    console.print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


# ---- the verifiable task suite and the simulated annotator (issue 14) ----------------------------------
@data_app.command("tasks")
def data_tasks(
    out: Path = typer.Option(..., "--out", help="Directory to write the suite into (made atomically)."),
    seed: int = typer.Option(0, "--seed", help="Seed; the same seed writes byte-identical files."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing non-empty --out."),
):
    """Write the verifiable task suite: pretraining text, SFT and prompt sets (train / held-out), scorers' fields."""
    from llamactl.tasks import write_suite

    m = write_suite(out, seed=seed, overwrite=overwrite)
    c = m["counts"]
    rows = [[f, "yes" if meta["safety"] else "", c["sft.train"][f], c["prompts.train"][f], c["prompts.heldout"][f]]
            for f, meta in m["families"].items()]
    console.print(table(f"wrote {out} (seed {m['seed']}; pretrain.txt {m['pretrain']['bytes'] / 1e6:.2f} MB, "
                        f"{m['pretrain']['documents']:,} documents)",
                        ["family", "safety", "sft train", "prompts train", "held-out"], rows))


@data_app.command("preferences")
def data_preferences(
    model: Path = typer.Option(..., "--model", help="Checkpoint to sample both answers from (the current policy)."),
    prompts: Path = typer.Option(..., "--prompts", help="Task prompts (a suite's prompts.train.jsonl: gold answers and scorer fields)."),
    out: Path = typer.Option(..., "--out", help="Preference pairs JSONL to write (atomically)."),
    model_b: Optional[Path] = typer.Option(None, "--model-b", help="Checkpoint for answer B (default: --model)."),
    temperatures: str = typer.Option("0.7,1.0", "--temperatures", help="Temperatures of answers A and B, e.g. 0.7,1.0 (one value: both)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass of both answers."),
    seed: int = typer.Option(0, "--seed", help="Seed; every answer has its own generator, so batching changes nothing."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", help="Most tokens per answer."),
    batch_size: int = typer.Option(32, "--batch-size", help="Answers decoded together."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N prompts of each family."),
    pairs_per_prompt: int = typer.Option(1, "--pairs-per-prompt", help="Independent answer pairs judged per prompt (more pairs that are not ties from a policy that mostly answers alike)."),
    raw: bool = typer.Option(False, "--raw", help='Prompt a base model as "Question: ... Answer:" instead of the chat template.'),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, or auto."),
):
    """Simulated annotator: two answers per prompt, judged against the gold, written as rated preference pairs.

    Ratings from the annotator's score gap: >= 0.6 significantly_better, >= 0.2 better, >= 0.05 slightly_better,
    >= 0.01 negligibly_better; smaller gaps are ties and are dropped.
    """
    from llamactl.stages.preferences import run_preferences, summary_rows

    s = run_preferences(model, prompts, out, model_b_dir=model_b, temperatures=temperatures, top_p=top_p, seed=seed,
                        max_new_tokens=max_new_tokens, batch_size=batch_size, limit=limit, raw=raw, device=device,
                        pairs_per_prompt=pairs_per_prompt)
    cols, rows = summary_rows(s)
    per = f" x {pairs_per_prompt}" if pairs_per_prompt > 1 else ""
    console.print(table(f"wrote {out}: {s['pairs']:,} pairs from {s['prompts']:,} prompts{per} ({s['ties']:,} ties, "
                        f"{s['skipped']:,} with an empty answer, dropped; T {s['temperatures'][0]:g} vs "
                        f"{s['temperatures'][1]:g}; answer B chosen in {s['b_chosen']:,})", cols, rows))


@eval_app.command("tasks")
def eval_tasks_cmd(
    model: Path = typer.Option(..., "--model", help="Checkpoint to evaluate."),
    suite: Path = typer.Option(..., "--suite", help="Task suite directory (llamactl data tasks)."),
    split: str = typer.Option("heldout", "--split", help="Prompt split: heldout or train."),
    samples: int = typer.Option(4, "--samples", help="Sampled answers per prompt, scored by their mean (0: greedy only)."),
    temperature: float = typer.Option(0.7, "--temperature", help="Temperature of the sampled answers (greedy is always temperature 0)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass of the sampled answers."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", help="Most tokens per answer."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N prompts of each family."),
    raw: bool = typer.Option(False, "--raw", help='Prompt a base model as "Question: ... Answer:" (its first sentence kept) instead of the chat template.'),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampled answers."),
    batch_size: int = typer.Option(32, "--batch-size", help="Answers decoded together."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, or auto."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the result (per family, overall, per prompt) as JSON."),
):
    """Ground-truth score per task family on a suite's held-out prompts, greedy and sampled (overall: mean of families)."""
    from llamactl.stages.eval_tasks import result_rows, run_eval_tasks

    r = run_eval_tasks(model, suite, split=split, samples=samples, temperature=temperature, top_p=top_p,
                       max_new_tokens=max_new_tokens, limit=limit, raw=raw, seed=seed, batch_size=batch_size,
                       device=device, out=out)
    cols, rows = result_rows(r)
    console.print(table(f"task scores of {model} on {suite} ({split}{', raw' if raw else ''})"
                        + (f" -> {out}" if out else ""), cols, rows))


# ---- reward models (issue 14) -----------------------------------------------------------------------
rm_app = typer.Typer(no_args_is_help=True, help="Helpfulness and safety reward models: train, evaluate, score.")
app.add_typer(rm_app, name="rm")


@rm_app.command("train")
@stage_command("reward", "parallel")
def rm_train(
    kind: Optional[str] = typer.Option(None, "--kind", help="helpfulness (default) or safety: recorded in the checkpoint; a safety RM's eval adds the unsafe detector."),
    init: Optional[Path] = typer.Option(None, "--init", help="Chat (SFT) checkpoint or run dir to start from; its LM head is replaced by the scalar score head."),
    data: Optional[Path] = typer.Option(None, "--data", help='Preference pairs JSONL: {"prompt"|"messages", "chosen", "rejected", "rating"?, "safety"?}.'),
    mix: Optional[str] = typer.Option(None, "--mix", help="Several preference files with proportions, e.g. safety.jsonl:0.9,helpful.jsonl:0.1 (the paper's safety-RM recipe); an epoch holds as many pairs as the files together."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (metrics, config, checkpoints)."),
    val: Optional[Path] = typer.Option(None, "--val", help="Held-out pairs: val loss and accuracy rows in metrics.jsonl (at the end, and every --eval-every)."),
    margin: Optional[str] = typer.Option(None, "--margin", help="Margin set of -log sigma(r_c - r_r - m(rating)), paper Table 27: none, small (1, 2/3, 1/3, 0) or large (3, 2, 1, 0). Default small for both kinds: section 3.2.2 adds the margin to both models and finds it helps most on separable pairs, and the small set does so without hurting similar pairs (A.3.3)."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the data (paper: 1; more over-fits)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (default: --epochs over the data)."),
    batch_pairs: Optional[int] = typer.Option(None, "--batch-pairs", help="Pairs per optimizer step (paper: 512, capped by the data; rounded to micro-batch x dp)."),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="Pairs per forward/backward (2 rows each; default 8)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (paper: 1e-5, 5e-6 for 70b), cosine to 10 %."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Warmup steps (paper: 3 % of the steps, at least 5)."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N steps (0: only at the end)."),
    keep: Optional[int] = typer.Option(None, "--keep", help="Checkpoints kept in the run dir."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the pair order."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Validation on --val every N steps (0: only at the end)."),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="When stdout is not a terminal (a cluster job's log, | tee): a plain log line every N steps instead of the progress bar (default 10)."),
    save_dtype: Optional[str] = typer.Option(None, "--save-dtype", help="Stored weights: bfloat16 (default), float32 or float16."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda."),
    *,
    opts: StageOptions,
):
    """Train a reward model: score = the scalar head at the last token of prompt + response (chat format), loss -log sigma(r_chosen - r_rejected - m(rating)); accuracy in metrics.jsonl. The checkpoint is a Hugging Face LlamaForSequenceClassification.

    Exit status: 0 when the run finished; 130 / 143 when SIGINT / SIGTERM stopped it after a checkpoint (continue with --resume); 1 on an error.
    """
    from llamactl.stages import reward as stage
    from llamactl.stages.runner import run_stage

    flags = dict(kind=kind, init=str(init) if init else None, data=str(data) if data else None, mix=mix,
                 out=str(out) if out else None, val=str(val) if val else None, margin=margin, epochs=epochs,
                 steps=steps, batch_pairs=batch_pairs, micro_batch=micro_batch, lr=lr, warmup=warmup,
                 save_every=save_every, keep=keep, seed=seed, eval_every=eval_every, log_every=log_every, save_dtype=save_dtype,
                 device=device)
    run_stage(stage.resolve, stage.describe, stage.run, flags=flags, launch=opts.launch, config=opts.config,
              dry_run=opts.dry_run, resume=opts.resume)


@rm_app.command("eval")
def rm_eval(
    model: Path = typer.Option(..., "--model", help="Reward checkpoint (or its run dir)."),
    data: Path = typer.Option(..., "--data", help="Held-out preference pairs JSONL."),
    safety: Optional[bool] = typer.Option(None, "--safety/--no-safety", help="Check sigma(score) < 0.15 as an unsafe detector on safety-tagged pairs (default: for a safety RM). Unsafe = the rejected answer of a safety pair (or, with the suite's gold_* fields, a response whose ground truth is < 0.5)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the figures as JSON."),
    batch_size: int = typer.Option(16, "--batch-size", help="Responses scored together."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, or auto."),
):
    """Accuracy overall and per rating (the paper's Table 8), mean score gap; unsafe-detector precision / recall."""
    import json

    from llamactl.stages.reward_eval import run_eval, table8_rows
    from llamactl.tasks.suite import write_text_atomic

    r = run_eval(model, data, safety=safety, batch_size=batch_size, device=device)
    cols, rows = table8_rows(r)
    console.print(table(f"reward model {model} on {data}" + (f" ({r['kind']})" if r.get("kind") else ""), cols, rows))
    console.print(f"mean margin r_chosen - r_rejected: {r['mean_margin']:.3f}")
    s = r.get("safety")
    if s:
        def pct(v):
            return "-" if v is None else f"{100 * v:.1f} %"

        console.print(table(f"unsafe detector sigma(score) < {s['threshold']}", ["", "value"],
                            [["responses", s["responses"]], ["unsafe", s["unsafe"]], ["flagged", s["flagged"]],
                             ["precision", pct(s["precision"])], ["recall", pct(s["recall"])]]))
    if out:
        write_text_atomic(out, json.dumps(r, indent=2) + "\n")


@rm_app.command("score")
def rm_score(
    model: Path = typer.Option(..., "--model", help="Reward checkpoint (or its run dir)."),
    data: Path = typer.Option(..., "--data", help='Responses JSONL: {"prompt"|"messages", "response", ...}.'),
    out: Path = typer.Option(..., "--out", help='JSONL to write: each line with "score" and "sigmoid_score" added.'),
    batch_size: int = typer.Option(16, "--batch-size", help="Responses scored together."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, or auto."),
):
    """Score responses with a reward model (the last token of the chat-format prompt + response)."""
    from llamactl.stages.reward_eval import run_score

    n = run_score(model, data, out, batch_size=batch_size, device=device)
    console.print(f"scored {n} responses -> {out}")


# ---- RLHF (issue 15) --------------------------------------------------------------------------------
rlhf_app = typer.Typer(no_args_is_help=True, help="Reinforcement learning from human feedback: rejection sampling, PPO, model-based comparison.")
app.add_typer(rlhf_app, name="rlhf")

# ---- rlhf rs (rejection sampling) ----
@rlhf_app.command("rs")
@stage_command("rs", "sft", "parallel")
def rlhf_rs(
    policy: Optional[Path] = typer.Option(None, "--policy", help="Current policy: a chat checkpoint (or run dir: its latest)."),
    rm_helpful: Optional[Path] = typer.Option(None, "--rm-helpful", help="Helpfulness reward model (checkpoint or run dir; kind helpfulness)."),
    rm_safety: Optional[Path] = typer.Option(None, "--rm-safety", help="Safety reward model (checkpoint or run dir; kind safety)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help='Prompt JSONL: {"prompt"|"messages", "safety"?: bool, ...}; safety-tagged prompts are rewarded by the safety RM alone.'),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory: samples.json, sft_data.jsonl, rs.json, PNGs, sft/ (default runs/rs)."),
    pool: Optional[Path] = typer.Option(None, "--pool", help="Pool directory: the best answer per prompt across all iterations so far (default RUN/pool; share it between iterations)."),
    k: Optional[int] = typer.Option(None, "--k", help="Samples per prompt at each temperature (default 10; the paper plots N up to 100)."),
    temperature: Optional[str] = typer.Option(None, "--temperature", help="Sampling temperature, or several as a comma list (K samples at each, Figure 8; 0 adds the greedy answer as a candidate); default 1.0."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling mass (default 1.0)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Most tokens per answer (default 48)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the samples (each has its own generator) and of the SFT data order."),
    iteration: Optional[int] = typer.Option(None, "--iteration", help="Iteration number recorded in the pool (default: the next after the pool's)."),
    gen_batch: Optional[int] = typer.Option(None, "--gen-batch", help="Sequences decoded and scored together (default 64)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="SFT peak learning rate (default 2e-5)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="SFT passes over the pool (default 2)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="SFT optimizer steps (overrides --epochs)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="SFT packed rows per step over all dp ranks (default 64)."),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="SFT rows per forward/backward."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="SFT tokens per packed row (default min(4096, context))."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="SFT warmup steps (default 0)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="SFT schedule: cosine (default) or constant."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="SFT checkpoint every N steps."),
    keep: Optional[int] = typer.Option(None, "--keep", help="SFT checkpoints kept."),
    save_dtype: Optional[str] = typer.Option(None, "--save-dtype", help="SFT stored weights: bfloat16 (default), float32 or float16."),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="When stdout is not a terminal (a cluster job's log, | tee): a plain log line every N steps instead of the progress bar (default 10)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda."),
    *,
    opts: StageOptions,
):
    """Rejection-sampling fine-tuning (paper 3.2.3): K samples per prompt from the policy, scored by R_c (safety RM if the prompt is tagged safety or R_s < 0.15, else helpfulness RM); the best per prompt joins the pool (best across all iterations); then SFT on the pool into RUN/sft.

    Reports Figure 7 (max and median reward among N samples, N = 1..K) and Figure 8 (reward per temperature) as tables, RUN/rs.json and PNGs. A rerun reuses this run's samples (RUN/samples.json); --resume continues its SFT.

    Exit status: 0 when the run finished; 130 / 143 when SIGINT / SIGTERM stopped the SFT after a checkpoint (continue with --resume); 1 on an error.
    """
    import functools

    from llamactl.stages import rejection as stage
    from llamactl.stages.runner import run_stage

    def s(p):
        return str(p) if p is not None else None

    flags = dict(policy=s(policy), rm_helpful=s(rm_helpful), rm_safety=s(rm_safety), prompts=s(prompts), out=s(out),
                 pool=s(pool), k=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                 iteration=iteration, gen_batch=gen_batch, device=device)
    sft_flags = dict(lr=lr, epochs=epochs, steps=steps, batch_size=batch_size, micro_batch=micro_batch, seq_len=seq_len,
                     warmup=warmup, schedule=schedule, save_every=save_every, keep=keep, save_dtype=save_dtype,
                     seed=seed, log_every=log_every)
    run_stage(functools.partial(stage.resolve, sft_flags=sft_flags), stage.describe, stage.run, flags=flags,
              launch=opts.launch, config=opts.config, dry_run=opts.dry_run, resume=opts.resume)


# ---- rlhf ppo ----
@rlhf_app.command("ppo")
@stage_command("ppo", "parallel")
def rlhf_ppo(
    size: Optional[str] = typer.Option(None, "--size", help=f"Model preset the policy must have ({SIZES}); sets beta (0.01 for 7b/13b and smaller, 0.005 for 34b/70b). Default: the policy's own shape."),
    policy: Optional[Path] = typer.Option(None, "--policy", help="Initial policy (rejection-sampling or SFT checkpoint, or its run dir); also the frozen reference pi_0."),
    rm_helpful: Optional[Path] = typer.Option(None, "--rm-helpful", help="Helpfulness reward model (rm train --kind helpfulness); the value model starts from it."),
    rm_safety: Optional[Path] = typer.Option(None, "--rm-safety", help="Safety reward model (rm train --kind safety)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help='Training prompts JSONL ({"prompt"|"messages", "safety"?, ...}; e.g. a suite\'s prompts.train.jsonl).'),
    val_prompts: Optional[Path] = typer.Option(None, "--val-prompts", help="Held-out prompts answered greedily every --eval-every iterations (reward, KL; early stopping)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory: policy/ and value/ checkpoints (policy/latest is the result), metrics.jsonl, config.toml (default runs/ppo)."),
    iterations: Optional[int] = typer.Option(None, "--iterations", help="PPO iterations (default 100)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Prompts (rollouts) per iteration over all data-parallel ranks (paper: 512)."),
    minibatch: Optional[int] = typer.Option(None, "--minibatch", help="Rollouts per optimizer step, one step per minibatch for policy and value (paper: 64)."),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="Rows per forward/backward within a minibatch (default 8)."),
    ppo_epochs: Optional[int] = typer.Option(None, "--ppo-epochs", help="Passes over an iteration's rollouts (default 1)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Constant learning rate of policy and value (paper: 1e-6)."),
    value_lr: Optional[float] = typer.Option(None, "--value-lr", help="Constant learning rate of the value model (default: --lr)."),
    freeze_policy: Optional[int] = typer.Option(None, "--freeze-policy", help="First N iterations train only the value model, so its baseline (started from the RM's untrained per-token outputs) settles before it steers the policy (default 0)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay on matrices (paper: 0.1)."),
    clip: Optional[float] = typer.Option(None, "--clip", help="Gradient-norm clip (paper: 1.0; 0: off)."),
    beta: Optional[float] = typer.Option(None, "--beta", help="KL penalty coefficient (default by --size: 0.01 or 0.005)."),
    cliprange: Optional[float] = typer.Option(None, "--cliprange", help="PPO ratio clip epsilon (default 0.2)."),
    cliprange_value: Optional[float] = typer.Option(None, "--cliprange-value", help="Value-loss clip around the rollout's values (default 0.2)."),
    gamma: Optional[float] = typer.Option(None, "--gamma", help="Discount (default 1.0)."),
    lam: Optional[float] = typer.Option(None, "--lam", help="GAE lambda (default 0.95)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Rollout sampling temperature (default 1.0)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Rollout nucleus mass (default 1.0)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Most tokens per response (default 128)."),
    rollout_batch: Optional[int] = typer.Option(None, "--rollout-batch", help="Rows decoded together (0: the rank's whole batch; default 0)."),
    truncated: Optional[str] = typer.Option(None, "--truncated", help="Responses that hit --max-new-tokens without EOS: score (as they are, default) or penalize (--truncated-reward)."),
    truncated_reward: Optional[float] = typer.Option(None, "--truncated-reward", help="Whitened reward of a truncated response under --truncated penalize (default -3)."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help='Held-out evaluation every N iterations (and before the first), rows with "split": "val" (0: off).'),
    val_limit: Optional[int] = typer.Option(None, "--val-limit", help="Use only the first N held-out prompts (0: all)."),
    patience: Optional[int] = typer.Option(None, "--patience", help="Stop after this many evaluations without a better held-out R_c (0: never; default 3)."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Save policy, value and state every N iterations (0: only at the end; default 10)."),
    keep: Optional[int] = typer.Option(None, "--keep", help="Saved iterations kept (default 3)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of prompt order, rollouts and minibatches."),
    save_dtype: Optional[str] = typer.Option(None, "--save-dtype", help="Stored weights: bfloat16 (default), float32 or float16; exact fp32 masters stay in train_state."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda."),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="GPUs the --dry-run plan assumes (default: the layout's, at least 8; 64 for 34b/70b)."),
    *,
    opts: StageOptions,
):
    """PPO with the paper's reward: WHITEN(LOGIT(R_c)) at the last token minus beta * KL to the initial policy per token; rollouts in the training layout.

    Exit status: 0 when the run finished (or stopped early on held-out reward); 130 / 143 when SIGINT / SIGTERM stopped it after saving (continue with --resume); 1 on an error.
    """
    from llamactl.stages import ppo as stage
    from llamactl.stages.runner import resolve_parallel, run_stage

    flags = dict(size=size, policy=str(policy) if policy else None, rm_helpful=str(rm_helpful) if rm_helpful else None,
                 rm_safety=str(rm_safety) if rm_safety else None, prompts=str(prompts) if prompts else None,
                 val_prompts=str(val_prompts) if val_prompts else None, out=str(out) if out else None,
                 iterations=iterations, batch_size=batch_size, minibatch=minibatch, micro_batch=micro_batch,
                 ppo_epochs=ppo_epochs, lr=lr, value_lr=value_lr, freeze_policy=freeze_policy, weight_decay=weight_decay, clip=clip, beta=beta, cliprange=cliprange,
                 cliprange_value=cliprange_value, gamma=gamma, lam=lam, temperature=temperature, top_p=top_p,
                 max_new_tokens=max_new_tokens, rollout_batch=rollout_batch, truncated=truncated,
                 truncated_reward=truncated_reward, eval_every=eval_every, val_limit=val_limit, patience=patience,
                 save_every=save_every, keep=keep, seed=seed, save_dtype=save_dtype, device=device)
    if opts.dry_run and policy is None and opts.config is None:
        pflags = opts.launch.parallel_flags()
        pflags.setdefault("nproc", (pflags.get("tp") or 1) * (pflags.get("pp") or 1))  # a plan needs no processes
        stage.dry_run_without_checkpoints(flags, resolve_parallel({}, pflags), gpus)
        return
    run_stage(stage.resolve, lambda plan: stage.describe(plan, gpus), stage.run, flags=flags, launch=opts.launch,
              config=opts.config, dry_run=opts.dry_run, resume=opts.resume)


# ---- rlhf compare ----
@rlhf_app.command("compare")
def rlhf_compare(
    a: Path = typer.Option(..., "--a", help="Checkpoint (or run dir) A: the model whose win rate is reported."),
    b: Path = typer.Option(..., "--b", help="Checkpoint (or run dir) B: the model A is compared with (e.g. the previous stage)."),
    prompts: Path = typer.Option(..., "--prompts", help='Prompts JSONL: {"prompt", "safety"?}; a task suite\'s prompts.heldout.jsonl (with its task fields) adds the ground-truth judge.'),
    rm_helpful: Path = typer.Option(..., "--rm-helpful", help="Helpfulness reward model: judges prompts not tagged safety."),
    rm_safety: Path = typer.Option(..., "--rm-safety", help="Safety reward model: judges safety-tagged prompts."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the result (win / tie / loss per judge and kind, per-prompt answers) as JSON."),
    samples: int = typer.Option(1, "--samples", help="Answers per prompt and model; a judge compares their means."),
    temperature: float = typer.Option(0.0, "--temperature", help="Sampling temperature (0: greedy; --samples > 1 needs > 0)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", help="Most tokens per answer."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampled answers (the same for A and B)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N prompts of each family (of each kind without families)."),
    raw_a: bool = typer.Option(False, "--raw-a", help='Prompt A as a base model ("Question: ... Answer:", first sentence kept) instead of the chat template.'),
    raw_b: bool = typer.Option(False, "--raw-b", help='Prompt B as a base model (e.g. the pretrained checkpoint against SFT).'),
    batch_size: int = typer.Option(32, "--batch-size", help="Answers decoded together."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, or auto."),
):
    """Win rate of A over B judged by the reward models and by the task suite's ground-truth scorer, helpfulness and safety separately (paper 3.4.1, Figure 11). A tie: judged values within 0.01."""
    from llamactl.stages.compare import result_rows, run_compare

    r = run_compare(a, b, prompts, rm_helpful, rm_safety, samples=samples, temperature=temperature, top_p=top_p,
                    max_new_tokens=max_new_tokens, seed=seed, limit=limit, batch_size=batch_size, device=device,
                    raw_a=raw_a, raw_b=raw_b, out=out)
    cols, rows = result_rows(r)
    console.print(table(f"A = {a} vs B = {b} on {r['prompts']} prompts of {prompts}" + (f" -> {out}" if out else ""),
                        cols, rows))
    if r.get("ground_truth_absent"):
        console.print(f"ground truth absent: {r['ground_truth_absent']}")


# ---- gatt (Ghost Attention) ----
gatt_app = typer.Typer(cls=default_subcommand("train"), no_args_is_help=True,
                       help="Ghost Attention (paper 3.3): keep a system instruction over many turns. `llamactl gatt --model M ...` means `gatt train`.")
app.add_typer(gatt_app, name="gatt")
_KINDS_HELP = "hobby, language, figure, case, start, end, length, mention"


def _split_kinds(kinds: Optional[str]) -> Optional[list]:
    return None if kinds is None else [k.strip() for k in kinds.split(",") if k.strip() and k.strip() != "none"]


@gatt_app.command("train")
@stage_command("gatt", "sft", "parallel")
def gatt_train(
    model: Optional[Path] = typer.Option(None, "--model", help="Current chat model (checkpoint or run dir): it samples the answers, and training starts from it."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompt JSONL (e.g. the task suite's prompts.train.jsonl): the user turns."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory: gatt.train.jsonl, gatt.json, and the SFT run on them (default runs/gatt)."),
    dialogues: Optional[int] = typer.Option(None, "--dialogues", help="Dialogues sampled (default 128)."),
    turns: Optional[int] = typer.Option(None, "--turns", help="User turns planned per dialogue; a dialogue ends earlier when its next turn would not fit the context (default 20)."),
    per_dialogue: Optional[int] = typer.Option(None, "--per-dialogue", help="Training samples per dialogue, ending at random turns, loss on that last answer only (0: one per turn; default 4)."),
    samples: Optional[int] = typer.Option(None, "--samples", help="Answers sampled per turn: the first keeping the constraint is kept, else the first is repaired (default 1)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Answer length cap (default 24)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature (default 0.7; 0 greedy)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling mass (default 0.9)."),
    kinds: Optional[str] = typer.Option(None, "--kinds", help=f"Built-in instruction families, comma-separated, or none (default all: {_KINDS_HELP})."),
    constraint: Optional[list[str]] = typer.Option(None, "--constraint", help="Your own instruction, added to the pool (repeatable): a spec such as figure:Napoleon, hobby:chess, language:pig_latin, capitals, lowercase, start:WORD, end:WORD, mention:WORD, max_words:N, joined with +."),
    constraints: Optional[Path] = typer.Option(None, "--constraints", help="A file of such specs, one per line (# comments)."),
    max_parts: Optional[int] = typer.Option(None, "--max-parts", help="Instructions combine 1..N families at random (default 2)."),
    concise: Optional[float] = typer.Option(None, "--concise", help='Share of instructions in their concise form ("Figure: Napoleon"; default 0.5, the paper\'s half).'),
    ghost: Optional[bool] = typer.Option(None, "--ghost/--no-ghost", help="--no-ghost: the ablation, the instruction left in every user turn of the training samples."),
    gen_batch_size: Optional[int] = typer.Option(None, "--gen-batch-size", help="Dialogues generated together (default 64)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of instructions, user turns, sampling and the data order (default 0)."),
    replay: Optional[Path] = typer.Option(None, "--replay", help="An SFT JSONL mixed into the GAtt set (e.g. the SFT data), so a small model keeps the tasks it learned."),
    replay_ratio: Optional[float] = typer.Option(None, "--replay-ratio", help="Replayed records per GAtt sample (default 1; all of --replay at most)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="SFT passes over the GAtt set (default 2)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="SFT optimizer steps (overrides --epochs)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per packed row (default the model's context)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Packed rows per optimizer step (default 64)."),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="Rows per forward/backward."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default 2e-5, the SFT stage's)."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Warmup steps (default 0)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="cosine (default) or constant."),
    cross_attention: Optional[bool] = typer.Option(None, "--cross-attention/--no-cross-attention", help="Packed samples attend to each other (default: no, each starts at position 0 with its instruction)."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N steps."),
    keep: Optional[int] = typer.Option(None, "--keep", help="Checkpoints kept."),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="When stdout is not a terminal (a cluster job's log, | tee): a plain log line every N steps instead of the progress bar (default 10)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda (sampling and training)."),
    *,
    opts: StageOptions,
):
    """Build the GAtt SFT set with the current model and fine-tune on it through the sft stage.

    Instructions (hobby, language, public figure, the task suite's constraints, yours) are combined at random, half made concise, joined to every user turn while the model answers (answers kept when they keep the constraint, else repaired), then kept only as the first turn's system message, with loss on the last answer alone.
    """
    from llamactl.stages import gatt as stage
    from llamactl.stages.runner import run_stage

    flags = dict(model=str(model) if model else None, prompts=str(prompts) if prompts else None,
                 out=str(out) if out else None, dialogues=dialogues, turns=turns, per_dialogue=per_dialogue,
                 samples=samples, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                 kinds=_split_kinds(kinds), constraints=list(constraint) if constraint else None,
                 constraints_file=str(constraints) if constraints else None, max_parts=max_parts, concise=concise,
                 ghost=ghost, gen_batch_size=gen_batch_size, seed=seed, replay=str(replay) if replay else None,
                 replay_ratio=replay_ratio, epochs=epochs, steps=steps, seq_len=seq_len,
                 batch_size=batch_size, micro_batch=micro_batch, lr=lr, warmup=warmup, schedule=schedule,
                 cross_attention=cross_attention, save_every=save_every, keep=keep, log_every=log_every, device=device,
                 dry_run=opts.dry_run, resume=opts.resume)
    run_stage(stage.resolve, stage.describe, stage.run, flags=flags, launch=opts.launch, config=opts.config,
              dry_run=opts.dry_run, resume=opts.resume)


@gatt_app.command("eval")
def gatt_eval(
    model: Path = typer.Option(..., "--model", help="The model with GAtt (checkpoint or run dir)."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="The same model without GAtt (e.g. the one GAtt started from)."),
    also: Optional[list[str]] = typer.Option(None, "--also", help="More models as LABEL=CKPT (repeatable), e.g. no-ghost=runs/gatt-ablation."),
    prompts: Path = typer.Option(..., "--prompts", help="Prompt JSONL for the user turns (held-out prompts)."),
    turns: int = typer.Option(20, "--turns", help="Turns per dialogue (fewer when the context is full)."),
    dialogues: int = typer.Option(32, "--dialogues", help="Dialogues per model."),
    constraint: Optional[list[str]] = typer.Option(None, "--constraint", help="Instruction spec (repeatable); with no --kinds, exactly these are used in turn."),
    constraints: Optional[Path] = typer.Option(None, "--constraints", help="A file of specs, one per line."),
    kinds: Optional[str] = typer.Option(None, "--kinds", help=f"Families to sample instructions from (default all: {_KINDS_HELP}; none when --constraint is given)."),
    max_parts: int = typer.Option(2, "--max-parts", help="Sampled instructions combine 1..N families."),
    concise: float = typer.Option(0.0, "--concise", help="Share of instructions in their concise form."),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens", help="Answer length cap."),
    temperature: float = typer.Option(0.0, "--temperature", help="0: greedy (default)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
    seed: int = typer.Option(1, "--seed", help="Seed of instructions and user turns (default 1; training's default is 0)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Dialogues generated together."),
    out: Optional[Path] = typer.Option(None, "--out", help="JSON of the figures; the plot goes next to it as .png."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
):
    """Adherence per turn index (the instruction only in the system message, as at inference), with and without GAtt."""
    from llamactl.stages.gatt_eval import GattEvalConfig, run_eval

    models = {"gatt": model}
    if baseline is not None:
        models["baseline"] = baseline
    for spec in also or []:
        label, sep, path = spec.partition("=")
        if not sep or not label.strip() or not path.strip() or label.strip() in models:
            raise LlamactlError(f"--also takes LABEL=CKPT with a new label, got {spec!r} (--also)")
        models[label.strip()] = Path(path.strip())
    user = list(constraint or [])
    kind_list = _split_kinds(kinds)
    if kind_list is None:
        kind_list = [] if (user or constraints) else GattEvalConfig().kinds
    cfg = GattEvalConfig(prompts=str(prompts), dialogues=dialogues, turns=turns, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_p=top_p, kinds=kind_list, constraints=user,
                         constraints_file=str(constraints) if constraints else None, max_parts=max_parts,
                         concise=concise, seed=seed, batch_size=batch_size)
    run_eval(models, cfg, out=out, device=device)


# ---- report and demo (issue 16) ----
@app.command("report")
def report_cmd(
    run_dir: Path = typer.Argument(..., help="A run directory of any stage, a folder of runs, or the demo's directory."),
    out: Optional[Path] = typer.Option(None, "--out", help="Markdown file to write (default RUN_DIR/report.md); PNG plots go to plots/ beside it."),
    with_files: Optional[list[Path]] = typer.Option(None, "--with", help="Result JSON kept elsewhere (rm eval, eval tasks, gatt eval, rlhf compare, rs.json) to include; repeatable."),
):
    """report.md with PNG plots from whatever the directory holds: loss curves, RM accuracy per rating, RS max / median, PPO reward and KL, GAtt adherence, and the table of held-out score and win rates per stage."""
    from llamactl import plots
    from llamactl.report import rich_tables, run_report

    from rich.console import Console

    r = run_report(run_dir, out, with_files or ())
    # into a log or a pipe: wide lines rather than columns cut to rich's default of 80 characters
    out_console = console if console.is_terminal else Console(highlight=False, width=max(console.width, 160))
    for t in rich_tables(r):
        out_console.print(t)
    if not r.plots_available:
        console.print(plots.MISSING, markup=False, soft_wrap=True)
    console.print(f"report: {r.path}", soft_wrap=True)


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Demo directory: one sub-directory per stage, demo.json (progress), report.md."),
    minutes: float = typer.Option(12.0, "--minutes", help="Budget in minutes on 2 idle cores (calibrated; more cores are faster): scales every stage's steps and samples (default 12)."),
    size: str = typer.Option("tiny", "--size", help="Model preset the step counts are tuned for: tiny."),
    seed: int = typer.Option(0, "--seed", help="Seed of every stage (the same seed gives the same results)."),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="End with a one-shot chat answer from the final model."),
):
    """The whole Llama 2-Chat recipe on this machine: task suite, tokenizer, pretrain, SFT, preferences, helpfulness and safety RMs, rejection sampling, PPO, GAtt, report, chat.

    Every step is a public llamactl command, printed before it runs. Run it again after Ctrl-C or a crash to continue: finished steps are kept (demo.json), an unfinished training stage resumes from its checkpoint.

    Exit status: 0 when the demo finished; 130 / 143 when Ctrl-C / SIGTERM stopped it after the running stage saved (run it again to continue); 1 when a stage failed or was killed.
    """
    from llamactl.stages.demo import run_demo
    from llamactl.stages.demo_plan import DemoConfig

    run_demo(DemoConfig(out=out, minutes=minutes, size=size, seed=seed), chat=chat)


# ---- entry point ------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry: every error a user can cause is one line `error: <what> (<where>)`.

    Exit codes: 2 usage errors (click's convention: bad or missing flag, unknown option), 1 other user
    errors, 130 / 143 stops by SIGINT / SIGTERM, a failed rank's own code under --nproc (whose line the
    launcher prints once, not once per rank). `llamactl --debug ...` shows tracebacks instead.
    """
    import os

    from rich.markup import escape  # messages may hold "[/INST]", paths with brackets, ...

    from llamactl.errors import one_line, usage_error_line
    from llamactl.parallel.launch import RanksFailed

    try:
        from typer._click import exceptions as usage  # typer >= 0.24 vendors its own click
    except ImportError:  # pragma: no cover - older typer uses the click package
        from click import exceptions as usage
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args

    def fail(line: str | None, code: int, *, user: bool = True):
        """Print the line (a rank started by --nproc leaves it to the launcher instead) and exit."""
        if line is not None:
            left = False
            if "RANK" in os.environ:
                from llamactl.parallel.launch import report_rank_error

                left = report_rank_error(line, code, user=user)
            if not left:
                err_console.print(f"[red]error:[/red] {escape(line)}", markup=True, soft_wrap=True)
        raise SystemExit(code)

    try:
        code = app(args=args, standalone_mode=False)
    except usage.NoArgsIsHelpError as e:  # `llamactl data`: the help was printed; still a usage error
        if e.format_message().strip():
            e.show()
        raise SystemExit(e.exit_code)
    except usage.ClickException as e:
        if debug:
            raise
        fail(usage_error_line(e, args), e.exit_code)
    except typer.Abort:
        fail("aborted", 1)
    except (LlamactlError, LayoutError) as e:
        if debug:
            raise
        fail(one_line(str(e)), 1)
    except RanksFailed as e:  # this process launched the ranks: their one line, their exit code
        fail(e.message, e.exit_code)
    except KeyboardInterrupt:
        fail(None, 130)
    except SystemExit:
        raise
    except Exception as e:  # a bug rather than a user error: still one line unless --debug
        if debug:
            raise
        fail(f"{type(e).__name__}: {one_line(str(e))} (run with --debug for the traceback)", 1, user=False)
    if isinstance(code, int) and code:  # typer.Exit(n) and Ctrl-C (130) come back as a return value
        raise SystemExit(code)
    # every rank finished: leave the process group together. Left to interpreter exit, gloo's threads are
    # torn down by static destructors and a rank can abort ("terminate called without an active exception")
    from llamactl.parallel.launch import shutdown

    shutdown()



