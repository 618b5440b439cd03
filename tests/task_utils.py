"""A small task suite, a tokenizer trained on its text and a tiny random checkpoint (tests of the
annotator and of `eval tasks`; ~2 s to make)."""
from __future__ import annotations

from pathlib import Path

from llamactl.tasks import SuiteConfig, write_suite

SMALL = SuiteConfig(entities=12, sft_train=40, prompts_train=20, heldout=20, pretrain_examples=30,
                    entity_documents=2, filler_documents=30)
VOCAB = 400


def make_suite_and_checkpoint(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """(suite dir, checkpoint dir): a 2-layer dim-32 lm with seeded random weights, context 160."""
    from llamactl import checkpoint
    from llamactl.config import preset
    from llamactl.model import build_model
    from llamactl.tokenizer import train_tokenizer

    suite = root / "suite"
    write_suite(suite, config=SMALL)
    tok = train_tokenizer([suite / "pretrain.txt"], root / "tok", vocab_size=VOCAB, num_threads=1)
    cfg = preset("tiny", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=160)
    ckpt = checkpoint.save(root / "ckpt", build_model(cfg, seed=seed), tokenizer=tok, stage="test")
    return suite, ckpt
