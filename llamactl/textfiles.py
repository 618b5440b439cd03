"""Input text files: which files an `--input` names, and the one reader (and text policy) for all of them.

`tokenizer train`, `data prepare` and the chat-data readers read through here, so they pick the same
files from a folder and accept or refuse the same bytes:

- a folder is walked recursively in sorted order, hidden files and folders skipped, keeping only
  `WALK_SUFFIXES` (text and JSONL); a file named explicitly is read whatever its suffix;
- a file is JSONL (one JSON object per line) when its suffix is in `JSONL_SUFFIXES`, else plain text;
- text is UTF-8 (a leading byte-order mark is dropped); a NUL byte or bytes that are not UTF-8 make
  the file binary or mis-encoded: a one-line error naming file and line, never replacement characters
  turned into training tokens. `.json` is read as JSONL when named, but not picked from folders,
  where it is far more often a config or an index (e.g. a prepared data folder's index.json).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from llamactl.errors import LlamactlError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
WALK_SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".ndjson")


def is_jsonl(path: Path) -> bool:
    return Path(path).suffix.lower() in JSONL_SUFFIXES


def list_input_files(inputs: Sequence[Path], suffixes: Sequence[str] = WALK_SUFFIXES,
                     flag: str = "--input") -> list[Path]:
    """Files as given, folders expanded (recursively, sorted, no hidden files, only `suffixes`)."""
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


def iter_lines(path: Path, flag: str = "--input",
               on_bytes: Optional[Callable[[int], None]] = None) -> Iterator[tuple[int, str]]:
    """(line number, line with its newline) of a UTF-8 text file, streamed; binary files are refused.

    Newlines are universal (\r\n and \r read as \n); `on_bytes` gets each line's UTF-8 size (progress).
    """
    path = Path(path)
    lineno = 0
    try:
        with open(path, encoding="utf-8-sig", errors="strict") as f:
            for lineno, line in enumerate(f, 1):
                if "\x00" in line:
                    raise LlamactlError(f"binary file, not text: NUL byte at line {lineno} ({path}:{lineno}, {flag})")
                if on_bytes is not None:
                    on_bytes(len(line.encode("utf-8")))
                yield lineno, line
    except UnicodeDecodeError:
        raise _decode_error(path, flag) from None
    except OSError as e:
        raise LlamactlError(f"cannot read {path}: {e.strerror or e} ({flag})") from None


def _decode_error(path: Path, flag: str) -> LlamactlError:
    """Where the first bytes that are not UTF-8 are (found again line by line, only once it failed)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if b"\x00" in raw:
                return LlamactlError(f"binary file, not text: NUL byte at line {lineno} ({path}:{lineno}, {flag})")
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return LlamactlError(f"not UTF-8 text: byte 0x{raw[e.start]:02x} at line {lineno} "
                                     f"({path}:{lineno}, {flag})")
    return LlamactlError(f"not UTF-8 text ({path}, {flag})")


def iter_jsonl(path: Path, flag: str = "--input",
               on_bytes: Optional[Callable[[int], None]] = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSONL file; anything but an object is an error."""
    for lineno, line in iter_lines(path, flag, on_bytes):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise LlamactlError(f"invalid JSON: {e.msg} at column {e.colno} ({path}:{lineno}, {flag})") from None
        except RecursionError:
            raise LlamactlError(f"invalid JSON: nested too deeply ({path}:{lineno}, {flag})") from None
        if not isinstance(obj, dict):
            raise LlamactlError(f"expected a JSON object, got {type(obj).__name__} ({path}:{lineno}, {flag})")
        yield lineno, obj


def check_text(value: str, path: Path, lineno: int, field: str, flag: str = "--input") -> str:
    """A JSON string is text only if it is valid Unicode (no lone surrogates from \\ud800-style escapes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise LlamactlError(f"field {field!r} holds an unpaired surrogate \\u{ord(value[e.start]):04x}, not text "
                            f"({path}:{lineno}, field {field}, {flag})") from None
    return value


def jsonl_texts(path: Path, flag: str = "--input",
                on_bytes: Optional[Callable[[int], None]] = None) -> Iterator[tuple[int, str]]:
    """(line number, "text") of each object of a JSONL corpus file; every object must have a string "text"."""
    for lineno, obj in iter_jsonl(path, flag, on_bytes):
        text = obj.get("text")
        if not isinstance(text, str):
            got = "missing" if "text" not in obj else f"a {type(text).__name__}"
            raise LlamactlError(f'expected a string field "text", it is {got} ({path}:{lineno}, field text, {flag})')
        yield lineno, check_text(text, path, lineno, "text", flag)


def iter_documents(path: Path, flag: str = "--input") -> Iterator[str]:
    """Documents of one file, streamed: JSONL "text" fields, or blocks of text separated by blank lines."""
    if is_jsonl(path):
        for _, text in jsonl_texts(path, flag):
            if text.strip():
                yield text
        return
    block: list[str] = []
    for _, line in iter_lines(path, flag):
        if line.strip():
            block.append(line)
        elif block:
            yield "".join(block).rstrip("\r\n")
            block = []
    if block:
        yield "".join(block).rstrip("\r\n")


def iter_sentences(path: Path, flag: str = "--input",
                   on_bytes: Optional[Callable[[int], None]] = None) -> Iterator[str]:
    """Non-empty lines of one file (of each JSONL "text", split into lines): what a tokenizer trains on."""
    if is_jsonl(path):
        for _, text in jsonl_texts(path, flag, on_bytes):
            for part in text.splitlines():
                if part:
                    yield part
        return
    for _, line in iter_lines(path, flag, on_bytes):
        line = line.rstrip("\r\n")
        if line:
            yield line
