"""`llamactl pretrain` / `eval` end to end in subprocesses: bit-exact resume after kill -9 (validation rows
included), SIGTERM / SIGINT exit codes, --zero under torchrun, flags over the config file, the dry-run's
global batch, values given as 0 or past the context refused, help texts with brackets."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_token_data

from llamactl.errors import LlamactlError

ARGS = ["--size", "tiny", "--steps", "8", "--seq-len", "32", "--batch-tokens", "256", "--micro-batch", "4",
        "--save-every", "3", "--eval-tokens", "256", "--eval-every", "4", "--peak-flops", "1e11", "--lr", "3e-3",
        "--warmup", "2"]


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
    return make_token_data(tiny_corpus, tiny_tokenizer, tmp_path_factory, 1500, 0.05)


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
    assert len(_metrics(run)) == 8                     # step 7 ran (7 train rows + val at 4), never checkpointed
    p = _run("pretrain", "--data", str(data), "--out", str(run), *ARGS, "--resume")
    assert "resuming from" in p.stderr and "step 6" in p.stderr
    ref, got = _metrics(straight), _metrics(run)
    assert [(r["split"], r["step"]) for r in got] == [("train", s) for s in range(1, 5)] + [("val", 4)] + \
        [("train", s) for s in range(5, 9)] + [("val", 8)]
    for a, b in zip(ref, got):
        a, b = ({k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in (a, b))
        assert a == b, (a, b)   # exact float equality, validation rows too
    assert ref[-1]["loss"] < ref[0]["loss"]
    assert checkpoint.latest(run).name == "step-000008"
    assert (run / "config.toml").is_file()


@pytest.mark.parametrize("sig,code", [("TERM", 143), ("INT", 130)])
def test_signal_leaves_a_loadable_checkpoint_and_a_distinct_exit_code(data, tmp_path, sig, code):
    """SIGTERM / SIGINT: the step finishes, a checkpoint is saved, and the exit status is 128 + the signal's
    number (143 / 130), so a scheduler can tell a stopped run from a finished one (0)."""
    from llamactl import checkpoint

    run = tmp_path / "term"
    p = _run("pretrain", "--data", str(data), "--out", str(run), *ARGS,
             env={"LLAMACTL_FAULT_AT_STEP": "2", "LLAMACTL_FAULT_SIGNAL": sig}, check=False)
    assert p.returncode == code, p.stderr
    assert f"stopped by SIG{sig} after step 2" in re.sub(r"\s+", " ", p.stdout)
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
    assert "global batch │ 32 sequences (8,192 tokens)" in out   # the run's own batch, in sequences
    assert not (tmp_path / "dry").exists()


def test_dry_run_global_batch_is_sequences_not_tokens(data, tmp_path):
    """Defect: a 16,384-token step of the tiny preset (seq 256) was shown as "16384 sequences (4,194,304
    tokens)": tokens were passed where sequences are expected."""
    p = _run("pretrain", "--data", str(data), "--out", str(tmp_path / "dry"), "--batch-tokens", "16384", "--dry-run")
    out = re.sub(r"\s+", " ", p.stdout)
    assert "global batch │ 64 sequences (16,384 tokens)" in out, out
    assert "4,194,304" not in out


def test_flags_win_over_the_config_files_parallel_section(data, tmp_path):
    """Defect: `--tp 4 --nproc 4` with a file holding tp = 2, nproc = 8 planned dp 4 while the launched world
    had dp 2. preset <- file <- flags: the flags win, the file fills in what they leave out."""
    from llamactl.stages.pretrain import resolve

    toml = tmp_path / "p.toml"
    toml.write_text("[parallel]\ntp = 2\nnproc = 8\nzero = true\n")
    plan = resolve({"data": str(data)}, toml, {"tp": 4, "nproc": 4})
    assert (plan.parallel.tp, plan.parallel.nproc, plan.parallel.zero, plan.dp) == (4, 4, True, 1)
    plan = resolve({"data": str(data)}, toml, {})
    assert (plan.parallel.tp, plan.parallel.nproc, plan.dp) == (2, 8, 4)
    assert resolve({"data": str(data)}, toml, {"zero": False}).parallel.zero is False
    p = _run("pretrain", "--data", str(data), "--config", str(toml), "--tp", "4", "--nproc", "4", "--dry-run")
    assert "tp 4 x pp 1 x dp 1" in p.stdout and "nproc = 4" in p.stdout and "tp = 4" in p.stdout


@pytest.mark.parametrize("flag,value,msg", [
    ("--seq-len", "0", "seq_len must be >= 1, got 0 (--seq-len)"),
    ("--batch-tokens", "0", "batch_tokens must be >= 1, got 0 (--batch-tokens)"),
    ("--micro-batch", "0", "micro_batch must be >= 1, got 0 (--micro-batch)"),
    ("--steps", "0", "steps must be >= 1, got 0 (--steps)"),
    ("--lr", "0", "learning rate must be > 0, got 0.0 (--lr)"),
    ("--keep", "0", "keep must be >= 1, got 0 (--keep)"),
    ("--seq-len", "100000", "--seq-len 100000 is longer than the tiny model's context of 512 tokens"),
    ("--batch-tokens", "1000", "--batch-tokens 1,000 is not a multiple of micro-batch x seq-len x dp"),
])
def test_given_values_are_used_or_refused_never_replaced(data, flag, value, msg):
    """A 0 (or any value) the user gave is used or refused with a one-line error naming the flag; a
    --seq-len beyond the model's context is refused."""
    from llamactl.stages.pretrain import resolve

    key = flag[2:].replace("-", "_")
    flags = {"data": str(data), key: float(value) if key == "lr" else int(value)}
    if key == "batch_tokens" and value == "1000":
        flags.update(seq_len=64, micro_batch=4)
    with pytest.raises(LlamactlError) as e:
        resolve(flags)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_zero_values_are_one_line_errors_on_the_command_line(data, tmp_path):
    p = _run("pretrain", "--data", str(data), "--out", str(tmp_path / "r"), "--seq-len", "0", "--dry-run", check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines() == ["error: seq_len must be >= 1, got 0 (--seq-len)"]
    assert resolve_ok(data, {"eval_every": 0, "save_every": 0, "warmup": 0, "eval_tokens": 0})


def resolve_ok(data, flags) -> bool:
    """Zeros that mean something (off / none) are kept as given."""
    from llamactl.stages.pretrain import resolve

    c = resolve({"data": str(data), **flags}).cfg
    return all(getattr(c, k) == v for k, v in flags.items())


def test_zero_flag_under_torchrun_equals_one_process(data, straight, tmp_path):
    """--zero --nproc 2 (ZeRO-1 over dp 2, relaunched through torchrun) logs the losses of the 1-process run."""
    run = tmp_path / "zero"
    args = [a if a not in ("8", "3") else {"8": "3", "3": "0"}[a] for a in ARGS]  # 3 steps, save only at the end
    _run("pretrain", "--data", str(data), "--out", str(run), *args, "--nproc", "2", "--zero")
    import tomllib

    assert tomllib.loads((run / "config.toml").read_text())["parallel"]["zero"] is True
    from llamactl import checkpoint

    for rank in (0, 1):  # each dp rank saved its own shard of the AdamW state
        state = checkpoint.load_train_state(checkpoint.latest(run), _ctx(rank))
        assert state["optimizer"]["zero"]["dp"] == 2 and state["optimizer"]["zero"]["dp_rank"] == rank
    got = [r for r in _metrics(run) if r["split"] == "train"]
    ref = [r for r in _metrics(straight) if r["split"] == "train"][:3]
    assert [r["step"] for r in got] == [1, 2, 3]
    for a, b in zip(got, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["tokens"] == b["tokens"], (a, b)


def _ctx(rank):
    import dataclasses

    from llamactl.parallel.context import ParallelContext

    return dataclasses.replace(ParallelContext.single(), dp=2, rank=rank)


def test_help_texts_keep_their_square_brackets():
    """Rich markup swallowed "[pretrain]" in `pretrain --help` ("TOML file with , , sections"): every help
    text of every command renders to what it says."""
    import click
    import typer
    from rich.text import Text

    from llamactl.cli import app

    def commands(group, path=()):
        for name, cmd in group.commands.items():
            if isinstance(cmd, click.Group):
                yield from commands(cmd, path + (name,))
            else:
                yield path + (name,), cmd

    root = typer.main.get_command(app)
    seen = 0
    for path, cmd in commands(root):
        texts = [cmd.help or ""] + [getattr(p, "help", None) or "" for p in cmd.params]
        for t in texts:
            want = t.replace("\\[", "[")
            assert Text.from_markup(t).plain == want, (path, t)
            seen += "[" in want
    assert seen >= 2  # --config of pretrain, generate --prompts, ...
    p = _run("pretrain", "--help")
    assert "[pretrain], [model], [parallel]" in re.sub(r"[\s│]+", " ", p.stdout)
    assert "143 (SIGTERM)" in re.sub(r"[\s│]+", " ", p.stdout)


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
