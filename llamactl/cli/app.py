"""The root `llamactl` app, its command groups and what several command modules share (the stage options
declared once, `default_subcommand`, `--peak-tflops`); it imports no command module, they import it."""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from llamactl.errors import LlamactlError
from llamactl.stages.runner import LaunchOptions

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train Llama 2 / Llama 2-Chat models the way the paper did, from one CPU to a GPU cluster.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train, inspect and use SentencePiece tokenizers.")
app.add_typer(tokenizer_app, name="tokenizer")

_state = {"debug": False}

SIZES = "tiny, small, 7b, 13b, 34b, 70b"


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors.")):
    _state["debug"] = debug


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


# ---- command groups, in the order `llamactl --help` lists them (their commands live in the modules) ----
data_app = typer.Typer(no_args_is_help=True, help="Prepare training data: tokenized shards, SFT sets, preference pairs.")
app.add_typer(data_app, name="data")

eval_app = typer.Typer(cls=_DefaultToLoss, no_args_is_help=True,
                       help="Evaluate a checkpoint: loss on held-out tokens (the default), or task-suite scores.")
app.add_typer(eval_app, name="eval")

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks of llamactl's building blocks.")
app.add_typer(bench_app, name="bench")

rm_app = typer.Typer(no_args_is_help=True, help="Helpfulness and safety reward models: train, evaluate, score.")
app.add_typer(rm_app, name="rm")

rlhf_app = typer.Typer(no_args_is_help=True, help="Reinforcement learning from human feedback: rejection sampling, PPO, model-based comparison.")
app.add_typer(rlhf_app, name="rlhf")

gatt_app = typer.Typer(cls=default_subcommand("train"), no_args_is_help=True,
                       help="Ghost Attention (paper 3.3): keep a system instruction over many turns. `llamactl gatt --model M ...` means `gatt train`.")
app.add_typer(gatt_app, name="gatt")
