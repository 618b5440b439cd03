"""`llamactl plan`: memory, layout and step time of a training run, without running it."""
from __future__ import annotations

from typing import Optional

import typer

from llamactl.cli.app import SIZES, app


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
