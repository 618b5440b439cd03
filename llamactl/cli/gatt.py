"""`llamactl gatt ...`: Ghost Attention training (the default sub-command) and its multi-turn evaluation."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from llamactl.cli.app import StageOptions, gatt_app, stage_command
from llamactl.errors import LlamactlError


# ---- gatt (Ghost Attention) ----
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
