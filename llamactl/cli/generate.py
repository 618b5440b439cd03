"""`llamactl generate` and `llamactl chat`: sampling from a checkpoint, on one process or tp x pp."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from llamactl.cli.app import app
from llamactl.errors import LlamactlError


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
