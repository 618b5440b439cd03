"""`llamactl tokenizer ...`: train, encode and decode with SentencePiece tokenizers."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from llamactl.cli.app import tokenizer_app
from llamactl.errors import LlamactlError
from llamactl.ui import console, table


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
