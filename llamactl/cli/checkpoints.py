"""`llamactl info`, `convert` and `export`: look into checkpoints and move them to and from other layouts."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from llamactl.cli.app import app


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
