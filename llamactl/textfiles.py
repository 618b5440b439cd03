"""Which files an `--input` names: files as given, folders expanded (recursively, sorted, no hidden files).

Shared by `tokenizer train` and `data prepare`, so both read exactly the same documents.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from llamactl.errors import LlamactlError


def list_input_files(inputs: Sequence[Path], suffixes: Sequence[str], flag: str = "--input") -> list[Path]:
    files: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*")
                           if f.is_file() and f.suffix.lower() in suffixes
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise LlamactlError(f"no {', '.join(suffixes)} files in folder {p} ({flag})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise LlamactlError(f"input not found: {p} ({flag})")
    return files
