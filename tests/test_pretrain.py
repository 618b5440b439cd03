"""`llamactl pretrain` / `eval` end to end in subprocesses: bit-exact resume after kill -9, SIGTERM, errors."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llamactl.errors import LlamactlError

ARGS = ["--size", "tiny", "--steps", "8", "--seq-len", "32", "--batch-tokens", "256", "--micro-batch", "4",
        "--save-every", "3", "--eval-tokens", "0", "--peak-flops", "1e11", "--lr", "3e-3", "--warmup", "2"]


def _run(*args, env=None, check=True):
    e = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200", **(env or {}))
    p = subprocess.run([sys.executable, "-m", "llamactl", *args], capture_output=True, text=True, env=e, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tiny_corpus, tiny_tokenizer, tmp_path_factory) -> Path:
    from llamactl.data import prepare

    src = tmp_path_factory.mktemp("src") / "text.txt"
    src.write_text("\n\n".join(tiny_corpus.read_text().split("\n\n")[:1500]))
    out = tmp_path_factory.mktemp("data")
    prepare([src], tiny_tokenizer, out, val_fraction=0.05, workers=1, show_progress=False)
    return out


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> Path:
    """The uninterrupted reference run."""
    run = tmp_path_factory.mktemp("runs") / "straight"
    _run("pretrain", "--data", str(data), "--out", str(run), *ARGS)
    return run


def test_resume_after_kill9_is_bit_exact(data, straight, tmp_path):
    from llamactl import checkpoint

    run = tmp_path / "killed"
    p = _run("pretrain", "--data", str(data), "--out", str(run), *ARGS,
             env={"LLAMACTL_FAULT_AT_STEP": "7", "LLAMACTL_FAULT_SIGNAL": "KILL"}, check=False)
    assert p.returncode == -9, p.stderr
    assert checkpoint.latest(run).name == "step-000006"
    assert len(_metrics(run)) == 7                     # step 7 ran but was never checkpointed
    p = _run("pretrain", "--data", str(data), "--out", str(run), *ARGS, "--resume")
    assert "resuming from" in p.stderr and "step 6" in p.stderr
    ref, got = _metrics(straight), _metrics(run)
    assert [r["step"] for r in got] == list(range(1, 9))
    for a, b in zip(ref, got):
        for k in ("loss", "lr", "grad_norm", "tokens"):
            assert a[k] == b[k], (a["step"], k, a[k], b[k])   # exact float equality
    assert ref[-1]["loss"] < ref[0]["loss"]
    assert checkpoint.latest(run).name == "step-000008"
    assert (run / "config.toml").is_file()


def test_sigterm_leaves_a_loadable_checkpoint(data, tmp_path):
    from llamactl import checkpoint

    run = tmp_path / "term"
    p = _run("pretrain", "--data", str(data), "--out", str(run), *ARGS,
             env={"LLAMACTL_FAULT_AT_STEP": "2", "LLAMACTL_FAULT_SIGNAL": "TERM"}, check=False)
    assert p.returncode == 0, p.stderr
    assert "stopped by SIGTERM after step 2" in re.sub(r"\s+", " ", p.stdout)
    ckpt = checkpoint.latest(run)
    assert ckpt.name == "step-000002" and checkpoint.verify(ckpt) == []
    model, meta = checkpoint.load_model(ckpt)
    assert model.cfg.vocab_size == 2048 and meta["step"] == 2
    assert [r["step"] for r in _metrics(run)] == [1, 2]


def test_eval_reports_loss_and_perplexity(data, straight):
    from llamactl import checkpoint

    p = _run("eval", "--model", str(checkpoint.latest(straight)), "--data", str(data), "--seq-len", "32",
             "--max-tokens", "2048")
    out = re.sub(r"\s+", " ", p.stdout)
    loss = float(re.search(r"loss \(nats/token\) │ ([0-9.]+)", out).group(1))
    ppl = float(re.search(r"perplexity │ ([0-9.]+)", out).group(1))
    assert ppl == pytest.approx(math.exp(loss), rel=1e-3)
    assert 0 < loss < math.log(2048)                  # better than uniform after 8 steps
    assert re.search(r"tokens │ 2,048", out)


def test_dry_run_prints_plan_and_writes_nothing(data, tmp_path):
    p = _run("pretrain", "--data", str(data), "--out", str(tmp_path / "dry"), "--size", "tiny", "--tokens", "100000",
             "--dry-run")
    out = re.sub(r"\s+", " ", p.stdout)
    assert "[pretrain]" in p.stdout and "steps = 13" in p.stdout   # ceil(100000 / 8192)
    assert "warmup = 1" in p.stdout and "lr = 0.003" in p.stdout
    assert "tokens / step │ 8,192" in out
    assert not (tmp_path / "dry").exists()


def test_defaults_config_file_and_flags(data, tmp_path):
    from llamactl.config import PRETRAIN_PEAK_LR
    from llamactl.stages.pretrain import resolve

    with pytest.raises(LlamactlError, match="tokenizer has 2048 tokens but the 7b model has a vocabulary of 32000"):
        resolve({"size": "7b", "data": str(data)})
    long = resolve({"size": "tiny", "data": str(data), "steps": 50_000})
    assert long.cfg.warmup == 2000 and long.cfg.lr == PRETRAIN_PEAK_LR["tiny"]   # paper warmup
    short = resolve({"size": "tiny", "data": str(data), "steps": 100})
    assert short.cfg.warmup == 10 and short.model.vocab_size == 2048             # 10 % of a short run
    toml = tmp_path / "p.toml"
    toml.write_text('[pretrain]\nsize = "tiny"\nsteps = 7\nlr = 0.001\nseq_len = 64\n[model]\nn_layers = 2\n')
    plan = resolve({"data": str(data), "lr": 0.002}, toml)
    assert (plan.cfg.steps, plan.cfg.lr, plan.cfg.seq_len, plan.model.n_layers) == (7, 0.002, 64, 2)  # flags win
    assert plan.step_tokens == plan.cfg.batch_tokens == 8192
    toml.write_text("[pretrain]\nstepz = 3\n")
    with pytest.raises(LlamactlError, match=r"unknown keys \['stepz'\]"):
        resolve({"data": str(data)}, toml)


def test_vocab_and_data_errors_are_one_line(data, tmp_path, tiny_corpus):
    from llamactl.data import prepare
    from llamactl.tokenizer import train_tokenizer

    small = tmp_path / "small.txt"
    small.write_text(tiny_corpus.read_text()[:150_000])
    other_tok = train_tokenizer([small], tmp_path / "tok", vocab_size=1024)
    p = _run("pretrain", "--data", str(data), "--out", str(tmp_path / "r"), "--tokenizer", str(other_tok), "--dry-run",
             check=False)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        f"error: data was tokenized with a vocabulary of 2048 but the model has 1024 ({data}, --data); "
        "prepare the data with the model's tokenizer"]
    bad = tmp_path / "bad"
    prepare([small], other_tok, bad, val_fraction=0.0, workers=1, show_progress=False)
    (bad / "train-00000.bin").write_bytes(b"\x01")
    p = _run("pretrain", "--data", str(bad), "--out", str(tmp_path / "r2"), "--steps", "1", check=False)
    assert p.returncode == 1
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: shard file is corrupt") and "train-00000.bin" in err[0]
