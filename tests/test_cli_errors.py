"""Bad input at the command line, tried as a new user would (issue 13): each case runs `llamactl` in a
subprocess and must end with its exit code (2 usage, 1 other user errors), exactly one `error:` line on
stderr naming the flag, file or rank, no traceback, and every file the user had exactly as it was.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

TRAIN = ["--size", "tiny", "--steps", "1", "--seq-len", "32", "--batch-tokens", "128", "--micro-batch", "4",
         "--eval-tokens", "0", "--peak-flops", "1e11", "--warmup", "0"]


def run_cli(*args, timeout=240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="100", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-m", "llamactl", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def snapshot(paths) -> dict[str, str | None]:
    """sha256 of every file under the given paths (None for a path that does not exist)."""
    out: dict[str, str | None] = {}
    for p in map(Path, paths):
        if not p.exists():
            out[str(p)] = None
        for f in sorted([p] if p.is_file() else p.rglob("*")):
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else "dir"
    return out


@dataclass
class Files:
    """What a user has: prepared data, a checkpoint, a tokenizer, and a fresh folder for this case."""

    data: Path
    ckpt: Path
    tok: Path
    tmp: Path


@dataclass
class Case:
    name: str
    argv: Callable[[Files], list]
    code: int
    names: Callable[[Files], list[str]]                # text the error line must hold (flag, file, rank)
    setup: Callable[[Files], None] = lambda f: None
    watch: Callable[[Files], list] = field(default=lambda f: [])   # beyond data, ckpt, tok and tmp
    timeout: float = 240.0                                           # a refused input answers at once


def _text(name: str, text: str):
    return lambda f: (f.tmp / name).write_text(text)


def _copy(src: str, dst: str, drop: str | None = None):
    def setup(f: Files):
        shutil.copytree(getattr(f, src), f.tmp / dst)
        if drop:
            (f.tmp / dst / drop).unlink()
    return setup


def _binary(f: Files):
    """A program, not text: the start of the Python interpreter (an ELF or Mach-O file), 300 KB."""
    (f.tmp / "program").write_bytes(Path(sys.executable).resolve().read_bytes()[:300_000])


def _corrupt_shard(f: Files):
    shutil.copytree(f.ckpt, f.tmp / "ck")
    shard = sorted((f.tmp / "ck").glob("model-*.safetensors"))[0]
    b = bytearray(shard.read_bytes())
    b[len(b) // 2: len(b) // 2 + 64] = b"\xff" * 64
    shard.write_bytes(bytes(b))


def _args(f: Files, extra) -> list:
    """Arguments; a callable one is a path inside this case's folder."""
    return [a(f) if callable(a) else a for a in extra]


def _pretrain(*extra):
    return lambda f: ["pretrain", "--data", f.data, "--out", f.tmp / "run", *TRAIN, *_args(f, extra)]


def _gen(*extra, model=None):
    return lambda f: ["generate", "--model", model(f) if model else f.ckpt, "--prompt", "hi", "--raw",
                      "--max-new-tokens", "2", *_args(f, extra)]


def _in_tmp(name: str):
    return lambda f: f.tmp / name


CASES = [
    # ---- usage errors: click's parser, exit 2, the flag named (item 5) --------------------------------
    Case("lr-not-a-number", _pretrain("--lr", "abc"), 2, lambda f: ["--lr", "'abc'"]),
    Case("lr-not-a-number-eq", _pretrain("--lr=abc"), 2, lambda f: ["--lr", "'abc'"]),
    Case("unknown-option", _pretrain("--bogus", "3"), 2, lambda f: ["--bogus"]),
    Case("misspelt-option", lambda f: ["data", "prepare", "--inptu", f.tmp / "x.txt"], 2, lambda f: ["--inptu", "--input"]),
    Case("missing-model", lambda f: ["generate", "--prompt", "hi"], 2, lambda f: ["--model"]),
    Case("option-without-value", lambda f: ["generate", "--model"], 2, lambda f: ["--model"]),
    Case("int-not-a-number", _gen("--max-new-tokens", "x"), 2, lambda f: ["--max-new-tokens", "'x'"]),
    Case("missing-argument", lambda f: ["info"], 2, lambda f: ["CKPT"]),
    Case("unknown-command", lambda f: ["pretrian"], 2, lambda f: ["pretrian"]),
    # ---- a value the user gave is used or refused, never replaced (item 3) ------------------------------
    Case("lr-zero", _pretrain("--lr", "0"), 1, lambda f: ["--lr"]),
    Case("seq-len-zero", _pretrain("--seq-len", "0"), 1, lambda f: ["--seq-len"]),
    Case("batch-tokens-zero", _pretrain("--batch-tokens", "0"), 1, lambda f: ["--batch-tokens"]),
    Case("micro-batch-zero", _pretrain("--micro-batch", "0"), 1, lambda f: ["--micro-batch"]),
    Case("lr-negative", _pretrain("--lr", "-1e-3"), 1, lambda f: ["--lr"]),
    # ---- --seq-len beyond the model's context (item 8): refused before any work, even in a dry run ------
    Case("seq-len-beyond-context", _pretrain("--seq-len", "100000", "--dry-run"), 1, lambda f: ["--seq-len"]),
    # ---- layouts (item 7) -------------------------------------------------------------------------------
    Case("tp-zero", _pretrain("--tp", "0"), 1, lambda f: ["--tp"]),
    Case("pp-zero", _pretrain("--pp", "0"), 1, lambda f: ["--pp"]),
    Case("nproc-zero", _pretrain("--nproc", "0"), 1, lambda f: ["--nproc"]),
    Case("tp-zero-in-config", _pretrain("--config", _in_tmp("p.toml")), 1, lambda f: ["--tp"],
         setup=_text("p.toml", "[parallel]\ntp = 0\n")),
    Case("tp-not-dividing-heads", _pretrain("--tp", "3", "--nproc", "3"), 1, lambda f: ["--tp 3", "heads"]),
    Case("pp-beyond-layers", _pretrain("--pp", "5", "--nproc", "5"), 1, lambda f: ["--pp 5", "layers"]),
    Case("generate-tp-zero", _gen("--tp", "0"), 1, lambda f: ["--tp"]),
    Case("generate-nproc-not-tp", _gen("--tp", "2", "--nproc", "3"), 1, lambda f: ["--nproc", "--tp"]),
    # ---- files: missing, not what they should be ----------------------------------------------------------
    Case("data-missing", lambda f: ["pretrain", "--data", f.tmp / "nodata", "--out", f.tmp / "run", *TRAIN], 1,
         lambda f: ["nodata"]),
    Case("model-missing", _gen(model=lambda f: f.tmp / "nomodel"), 1, lambda f: ["nomodel"]),
    Case("config-missing", _pretrain("--config", _in_tmp("none.toml")), 1, lambda f: ["none.toml"]),
    Case("config-not-toml", _pretrain("--config", _in_tmp("bad.toml")), 1, lambda f: ["bad.toml"],
         setup=_text("bad.toml", "[pretrain\nsteps = = 3\n")),
    Case("config-unknown-key", _pretrain("--config", _in_tmp("k.toml")), 1, lambda f: ["stepz"],
         setup=_text("k.toml", "[pretrain]\nstepz = 3\n")),
    Case("config-unknown-section", _pretrain("--config", _in_tmp("s.toml")), 1, lambda f: ["pretrian"],
         setup=_text("s.toml", "[pretrian]\nsteps = 3\n")),
    Case("tokenizer-missing", lambda f: ["tokenizer", "encode", "--tokenizer", f.tmp / "notok", "--text", "hi"], 1,
         lambda f: ["notok"]),
    Case("info-not-a-checkpoint", lambda f: ["info", f.data], 1, lambda f: [str(f.data)]),
    # ---- data prepare keeps what it had (item 2) and refuses binary files (item 6) -----------------------
    Case("prepare-empty-over-existing",
         lambda f: ["data", "prepare", "--input", f.tmp / "empty.txt", "--tokenizer", f.tok, "--out", f.tmp / "d",
                    "--workers", "1"], 1, lambda f: ["--input"],
         setup=lambda f: (_copy("data", "d")(f), (f.tmp / "empty.txt").write_text(""))),
    Case("prepare-binary",
         lambda f: ["data", "prepare", "--input", f.tmp / "program", "--tokenizer", f.tok, "--out", f.tmp / "d",
                    "--workers", "1"], 1, lambda f: ["program"], setup=_binary),
    Case("tokenizer-train-binary",
         lambda f: ["tokenizer", "train", "--input", f.tmp / "program", "--out", f.tmp / "t", "--vocab-size", "300"],
         1, lambda f: ["program"], setup=_binary),
    Case("tokenizer-train-over-existing",
         lambda f: ["tokenizer", "train", "--input", f.tmp / "a.txt", "--out", f.tmp / "t", "--vocab-size", "300"],
         1, lambda f: ["--overwrite", "--out"],
         setup=lambda f: ((f.tmp / "t").mkdir(), shutil.copy(f.tok, f.tmp / "t" / "tokenizer.model"),
                          (f.tmp / "a.txt").write_text("some text\n"))),
    # ---- generation: a checkpoint must be whole, values in range (item 9) ---------------------------------
    Case("generate-without-config", _gen(model=lambda f: f.tmp / "ck"), 1, lambda f: ["config.json"],
         setup=_copy("ckpt", "ck", drop="config.json")),
    Case("eval-without-config", lambda f: ["eval", "--model", f.tmp / "ck", "--data", f.data], 1,
         lambda f: ["config.json"], setup=_copy("ckpt", "ck", drop="config.json")),
    Case("temperature-negative", _gen("--temperature", "-1"), 1, lambda f: ["--temperature"]),
    Case("top-p-zero", _gen("--top-p", "0"), 1, lambda f: ["--top-p"]),
    Case("top-p-above-one", _gen("--top-p", "1.5"), 1, lambda f: ["--top-p"]),
    Case("max-new-tokens-zero", _gen("--max-new-tokens", "0"), 1, lambda f: ["--max-new-tokens"]),
    Case("chat-tags-in-prompt", lambda f: ["chat", "--model", f.ckpt, "--prompt", "hi [/INST] there",
                                           "--max-new-tokens", "2"], 1, lambda f: ["[/INST]"]),
    # ---- the same class of fault in the other commands ---------------------------------------------------
    Case("plan-tp-zero", lambda f: ["plan", "--size", "tiny", "--tp", "0"], 1, lambda f: ["--tp"]),
    Case("plan-gpus-zero", lambda f: ["plan", "--size", "tiny", "--gpus", "0"], 1, lambda f: ["--gpus"]),
    Case("eval-batch-size-zero", lambda f: ["eval", "--model", f.ckpt, "--data", f.data, "--batch-size", "0"], 1,
         lambda f: ["--batch-size"]),
    Case("export-mp-zero", lambda f: ["export", f.ckpt, f.tmp / "ex", "--to", "meta", "--mp", "0"], 1,
         lambda f: ["--mp"]),
    Case("prepare-val-fraction", lambda f: ["data", "prepare", "--input", f.tmp / "a.txt", "--tokenizer", f.tok,
                                            "--out", f.tmp / "d", "--val-fraction", "2"], 1,
         lambda f: ["--val-fraction"], setup=_text("a.txt", "one document\n\nanother one\n")),
    # without a check, 0 tokens per shard wrote empty shard files without end (~8,000 a second)
    Case("prepare-shard-tokens-zero", lambda f: ["data", "prepare", "--input", f.tmp / "a.txt", "--tokenizer", f.tok,
                                                 "--out", f.tmp / "d", "--shard-tokens", "0", "--workers", "1"], 1,
         lambda f: ["--shard-tokens"], setup=_text("a.txt", "one document\n\nanother one\n"), timeout=20),
    # ---- ranks started by --nproc: their line once, not a torchrun traceback (item 4) --------------------
    Case("ranks-corrupt-shard", _gen("--tp", "2", "--nproc", "2", model=lambda f: f.tmp / "ck"), 1,
         lambda f: ["model-00001-of-00001.safetensors"], setup=_corrupt_shard),
    Case("ranks-nothing-to-resume", _pretrain("--tp", "2", "--nproc", "2", "--resume"), 1,
         lambda f: ["--resume", str(f.tmp / "run")]),
    Case("ranks-resume-changed-layout", _pretrain("--tp", "2", "--nproc", "2", "--resume", "--steps", "2"), 1,
         lambda f: ["--tp", "step-000001"], setup=lambda f: _one_step_run(f)),
]


def _one_step_run(f: Files):
    """A run with one checkpoint saved at tp 1 (its train state needs the same layout to resume exactly)."""
    p = run_cli(*_pretrain()(f))
    assert p.returncode == 0 and (f.tmp / "run" / "step-000001").is_dir(), p.stderr[-2000:]


@pytest.fixture(scope="module")
def user_files(tiny_corpus, tiny_tokenizer, tiny_checkpoint, tmp_path_factory) -> tuple[Path, Path, Path]:
    """Prepared data (vocab of the tiny tokenizer), the tiny checkpoint, the tokenizer; never changed."""
    from llamactl.data import prepare

    src = tmp_path_factory.mktemp("src") / "text.txt"
    src.write_text("\n\n".join(tiny_corpus.read_text().split("\n\n")[:400]))
    data = tmp_path_factory.mktemp("data")
    prepare([src], tiny_tokenizer, data, val_fraction=0.05, workers=1, show_progress=False)
    return data, tiny_checkpoint, tiny_tokenizer


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case: Case, user_files, tmp_path):
    data, ckpt, tok = user_files
    f = Files(data, ckpt, tok, tmp_path)
    case.setup(f)
    argv = [str(a) for a in case.argv(f)]
    watched = [data, ckpt, tok, tmp_path, *case.watch(f)]
    before = snapshot(watched)
    try:
        p = run_cli(*argv, timeout=case.timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no answer within {case.timeout:.0f} s: llamactl {' '.join(argv)}")
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error:")]
    shown = f"exit {p.returncode}\nstderr:\n{p.stderr[-3000:]}\nstdout:\n{p.stdout[-1000:]}"
    assert "Traceback" not in p.stderr and "ChildFailedError" not in p.stderr, shown
    assert len(errors) == 1 and lines[-1] == errors[0], shown        # one error line, the last thing said
    line = errors[0]
    assert "--debug" not in line, shown                             # a user error, not the fallback for bugs
    for name in case.names(f):
        assert name in line, (name, shown)
    if case.name.startswith("ranks-"):
        assert "(rank" not in line, shown                           # the ranks agree: no rank to name
    assert p.returncode == case.code, shown
    assert snapshot(watched) == before, shown                       # nothing the user had was touched


def test_help_still_works():
    p = run_cli("--help")
    assert p.returncode == 0 and "pretrain" in p.stdout and not p.stderr.strip()
    p = run_cli("pretrain", "--help")
    assert p.returncode == 0 and "--lr" in p.stdout and not p.stderr.strip()
    assert "[pretrain], [model], [parallel]" in " ".join(p.stdout.replace("│", " ").split())  # markup kept them
