"""Real English text that exists offline on every machine: the docs inside Python's standard library.

Tests and demos need a corpus to train tokenizers and tiny models on, without downloads. The stdlib
source ships with every Python, so its text is always there: first the docstrings of public modules,
classes and functions (~1.3 MB), then the Python language reference topics that `pydoc` carries
(~0.5 MB), then paragraphs of source comments (~1.5 MB). The walk is in sorted order and only parses
(`ast` / `tokenize`; nothing is imported), so the same Python version always gives the same text.
"""
from __future__ import annotations

import ast
import io
import os
import sysconfig
import tokenize
from pathlib import Path
from typing import Iterator, Optional

# Folders that are tests, vendored third-party code, build data or demo scripts, not library docs.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3",
              "ensurepip", "turtledemo", "venv", "pydoc_data", "Tools"}


def stdlib_dir() -> Path:
    """Where this interpreter's pure-Python standard library lives."""
    return Path(sysconfig.get_paths()["stdlib"])


def _public(name: str) -> bool:
    return not name.startswith("_")


def _module_files(root: Path) -> Iterator[Path]:
    """Public stdlib .py files in a fixed (sorted) order, skipping tests and private modules."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in _SKIP_DIRS and _public(d) and not d.startswith(("config-", "test"))
                             and "." not in d)
        for f in sorted(filenames):
            if not f.endswith(".py") or f.startswith("test"):
                continue
            if _public(f) or f == "__init__.py":
                yield Path(dirpath) / f


def _docstrings(tree: ast.Module) -> Iterator[str]:
    """Module docstring, then public classes / functions / methods in source order."""
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        yield doc

    def walk(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and _public(node.name):
                d = ast.get_docstring(node, clean=True)
                if d:
                    yield d
                if isinstance(node, ast.ClassDef):
                    yield from walk(node.body)

    yield from walk(tree.body)


def iter_stdlib_docstrings(root: Optional[Path] = None) -> Iterator[str]:
    """Each distinct docstring once, as a paragraph of text (trailing whitespace removed)."""
    seen: set[str] = set()
    for path in _module_files(root or stdlib_dir()):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError, UnicodeDecodeError):
            continue
        for doc in _docstrings(tree):
            doc = "\n".join(line.rstrip() for line in doc.strip().splitlines())
            if len(doc) < 16 or doc in seen:  # "Return self." style stubs carry no text
                continue
            seen.add(doc)
            yield doc


def _reference_topics(root: Path) -> Iterator[str]:
    """The language-reference pages `help("topic")` shows: string values of pydoc_data/topics.py."""
    path = root / "pydoc_data" / "topics.py"
    try:
        tree = ast.parse(path.read_bytes())
    except (OSError, SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            pages = {k.value: v.value for k, v in zip(node.keys, node.values)
                     if isinstance(k, ast.Constant) and isinstance(v, ast.Constant) and isinstance(v.value, str)}
            for key in sorted(pages):
                yield pages[key]


def _comment_blocks(path: Path) -> Iterator[str]:
    """Runs of whole-line comments on consecutive lines, without the '#', as one paragraph each."""
    block: list[str] = []
    last_row = -2
    try:
        src = path.read_bytes()
        for tok in tokenize.tokenize(io.BytesIO(src).readline):
            if tok.type != tokenize.COMMENT or tok.line.strip() != tok.string.strip():
                continue
            if tok.start[0] != last_row + 1 and block:
                yield "\n".join(block)
                block = []
            text = tok.string.lstrip("#").strip()
            if text and not text.startswith(("!", "-*-")):
                block.append(text)
            last_row = tok.start[0]
    except (tokenize.TokenError, SyntaxError, OSError, UnicodeDecodeError):
        return
    if block:
        yield "\n".join(block)


def _prose(text: str) -> bool:
    """Mostly letters and spaces: drops commented-out code and ASCII art."""
    letters = sum(c.isalpha() or c == " " for c in text)
    return len(text) >= 40 and letters >= 0.8 * len(text)


def iter_stdlib_text(root: Optional[Path] = None) -> Iterator[str]:
    """Docstrings, then reference topics, then comment paragraphs; each distinct paragraph once."""
    root = root or stdlib_dir()
    seen: set[str] = set()

    def fresh(items):
        for t in items:
            if t not in seen:
                seen.add(t)
                yield t

    yield from fresh(iter_stdlib_docstrings(root))
    yield from fresh(t.strip() for t in _reference_topics(root))
    for path in _module_files(root):
        yield from fresh(b for b in _comment_blocks(path) if _prose(b))


def stdlib_docstrings(max_bytes: Optional[int] = None, root: Optional[Path] = None) -> str:
    """`iter_stdlib_text()` joined by blank lines: ~3 MB, or at most `max_bytes` UTF-8 bytes (whole paragraphs)."""
    parts: list[str] = []
    size = 0
    for doc in iter_stdlib_text(root):
        n = len(doc.encode("utf-8")) + 2
        if max_bytes is not None and size + n > max_bytes:
            break
        parts.append(doc)
        size += n
    return "\n\n".join(parts) + "\n"


def write_stdlib_corpus(path: Path, max_bytes: Optional[int] = None) -> Path:
    """Write `stdlib_docstrings(max_bytes)` to `path` (UTF-8) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = stdlib_docstrings(max_bytes)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
