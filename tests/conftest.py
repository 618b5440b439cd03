"""Shared pytest fixtures. Each helper appends its own below; keep them session-scoped and small."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch


# ---- text and tokenizer (tokenizer owner) -----------------------------------------------------------
TINY_CORPUS_BYTES = 600_000


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """~600 KB of English: stdlib docstrings, the same on every machine with the same Python."""
    from llamactl.corpus import write_stdlib_corpus

    return write_stdlib_corpus(tmp_path_factory.mktemp("corpus") / "stdlib.txt", max_bytes=TINY_CORPUS_BYTES)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus, tmp_path_factory) -> Path:
    """Path of a Llama-style SentencePiece BPE tokenizer.model (vocab 2048) trained once per session."""
    from llamactl.tokenizer import train_tokenizer

    return train_tokenizer([tiny_corpus], tmp_path_factory.mktemp("tokenizer"), vocab_size=2048)


def make_token_data(corpus: Path, tokenizer: Path, tmp_path_factory, paragraphs: int, val_fraction: float) -> Path:
    """Token shards of the corpus's first `paragraphs` paragraphs (`llamactl data prepare`, one worker)."""
    from llamactl.data import prepare

    src = tmp_path_factory.mktemp("src") / "text.txt"
    src.write_text("\n\n".join(corpus.read_text().split("\n\n")[:paragraphs]))
    out = tmp_path_factory.mktemp("data")
    prepare([src], tokenizer, out, val_fraction=val_fraction, workers=1, show_progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_data(tiny_corpus, tiny_tokenizer, tmp_path_factory) -> Path:
    """Shards of 300 paragraphs, no held-out split: the short pretraining runs of the launcher tests."""
    return make_token_data(tiny_corpus, tiny_tokenizer, tmp_path_factory, 300, 0.0)


# ---- checkpoints (generation / chat owner) ----------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_tokenizer, tmp_path_factory) -> Path:
    """A `tiny` lm checkpoint (seeded random weights, max_seq_len 512) with the tiny tokenizer."""
    from llamactl import checkpoint
    from llamactl.config import preset
    from llamactl.model import build_model

    model = build_model(preset("tiny"), seed=0)
    return checkpoint.save(tmp_path_factory.mktemp("ckpt") / "tiny", model, tokenizer=tiny_tokenizer, stage="test")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes gain nothing from more threads, and on a shared machine each parallel region can stall."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- fused kernels (kernels owner) ------------------------------------------------------------------
@pytest.fixture(scope="session")
def fused_cpu():
    """Build (or load from the cache) the CPU extension once; the public API must pick it. A failed build
    fails the tests that use this instead of letting them test the reference."""
    import os

    from llamactl.kernels import build, dispatch

    os.environ.pop("LLAMACTL_KERNELS", None)
    build.ensure("cpu")
    dispatch.reset()
    assert dispatch.backend("cpu").fused
    return torch.ops.llamactl_cpu.isa()
