"""Tiny model on real English that every machine has offline (CPython's stdlib docstrings and docs).

Runs the real commands (tokenizer train, data prepare, pretrain, eval), then compares the loss with
the unigram entropy of the training tokens (the best loss a model that ignores context can reach):
a model that learned anything from context ends well below it.

    python bench/pretrain_tiny.py [--work /tmp/llamactl-tiny] [--steps 300] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def sh(*args: str, env=None) -> str:
    cmd = [sys.executable, "-m", "llamactl", *args]
    print("$ llamactl " + " ".join(shlex.quote(a) for a in args), flush=True)
    p = subprocess.run(cmd, text=True, stdout=subprocess.PIPE, env=env)
    print(p.stdout, flush=True)
    if p.returncode:
        raise SystemExit(f"command failed with exit code {p.returncode}")
    return p.stdout


def unigram_entropy(data_dir: Path) -> float:
    """Entropy (nats/token) of the training tokens' unigram distribution."""
    from llamactl.data import TokenData

    d = TokenData(data_dir, "train")
    counts = np.zeros(d.vocab_size, dtype=np.int64)
    for a in d.arrays:
        counts += np.bincount(np.asarray(a), minlength=d.vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/llamactl-tiny"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    w = a.work
    w.mkdir(parents=True, exist_ok=True)
    corpus = w / "stdlib.txt"
    if not corpus.exists():
        from llamactl.corpus import write_stdlib_corpus

        write_stdlib_corpus(corpus)
    if not (w / "tok" / "tokenizer.model").exists():
        sh("tokenizer", "train", "--input", str(corpus), "--vocab-size", "2048", "--out", str(w / "tok"), env=env)
    if not (w / "data" / "index.json").exists():
        sh("data", "prepare", "--input", str(corpus), "--tokenizer", str(w / "tok"), "--out", str(w / "data"),
           "--val-fraction", "0.02", env=env)
    h = unigram_entropy(w / "data")
    run = w / f"run-{a.steps}"
    t0 = time.time()
    sh("pretrain", "--size", "tiny", "--data", str(w / "data"), "--out", str(run), "--steps", str(a.steps),
       "--seq-len", str(a.seq_len), "--batch-tokens", str(a.batch_tokens), "--eval-tokens", "1000000",
       *(["--resume"] if (run / "latest").exists() else []), env=env)
    minutes = (time.time() - t0) / 60
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = float(np.mean([r["loss"] for r in rows[-10:]]))
    ev = json.loads((run / "eval.json").read_text())
    sh("eval", "--model", str(run), "--data", str(w / "data"), env=env)
    tps = float(np.median([r["tokens_per_s"] for r in rows]))
    print(f"unigram entropy of the training tokens: {h:.3f} nats/token (perplexity {math.exp(h):.1f})")
    print(f"after {len(rows)} steps ({rows[-1]['tokens']:,} tokens, {minutes:.1f} min, median {tps:,.0f} tok/s): "
          f"train loss {train:.3f}, eval loss {ev['loss']:.3f} on {ev['tokens']:,} held-out tokens")
    print(f"tiny pretrain eval loss: {ev['loss'] / h:.2f}x unigram entropy "
          f"({ev['loss']:.3f} vs {h:.3f} nats/token, eval perplexity {ev['perplexity']:.1f} vs {math.exp(h):.1f})")


if __name__ == "__main__":
    main()
