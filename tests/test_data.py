"""data prepare (determinism, round trip, validation split, errors) and the window sampler."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from llamactl.data import (Batch, PretrainBatches, TokenData, WindowSampler, is_validation, iter_documents,
                           list_inputs, prepare, read_index)
from llamactl.errors import LlamactlError


@pytest.fixture(scope="module")
def inputs(tiny_corpus, tmp_path_factory) -> Path:
    """A folder with two text files and a JSONL file cut from the corpus (small: tests stay fast)."""
    paras = tiny_corpus.read_text().split("\n\n")[:900]
    d = tmp_path_factory.mktemp("inputs")
    (d / "a.txt").write_text("\n\n".join(paras[:300]) + "\n")
    (d / "sub").mkdir()
    (d / "sub" / "b.txt").write_text("\n\n\n".join(paras[300:600]))
    (d / "c.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paras[600:]))
    return d


@pytest.fixture(scope="module")
def prepared(inputs, tiny_tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    prepare([inputs], tiny_tokenizer, out, val_fraction=0.05, workers=2, show_progress=False)
    return out


def _docs(inputs: Path) -> list[str]:
    return [d for f in list_inputs([inputs]) for d in iter_documents(f)]


def test_prepare_round_trip_and_split(prepared, inputs, tiny_tokenizer):
    from llamactl.tokenizer import Tokenizer

    tok = Tokenizer.load(tiny_tokenizer)
    docs = _docs(inputs)
    assert len(docs) == 900
    expect = {"train": [], "val": []}
    for d in docs:
        expect["val" if is_validation(d, 0.05) else "train"].extend([tok.bos_id] + tok.encode(d) + [tok.eos_id])
    index = read_index(prepared)
    assert index["dtype"] == "uint16" and index["vocab_size"] == tok.vocab_size
    for split in ("train", "val"):
        data = TokenData(prepared, split)
        got = data.read(0, data.num_tokens)
        assert got.tolist() == expect[split]
        assert index["splits"][split]["documents"] == sum(
            1 for d in docs if is_validation(d, 0.05) == (split == "val"))
    assert 0 < index["splits"]["val"]["documents"] < 0.15 * len(docs)
    # text between BOS and EOS decodes back to the document
    train = TokenData(prepared, "train").read(0, 4000).tolist()
    first = train[1:train.index(tok.eos_id)]
    assert tok.decode(first) == [d for d in docs if not is_validation(d, 0.05)][0]


def test_prepare_is_deterministic_across_workers_and_shards(prepared, inputs, tiny_tokenizer, tmp_path):
    out = tmp_path / "again"
    prepare([inputs], tiny_tokenizer, out, val_fraction=0.05, workers=1, shard_tokens=5000, show_progress=False)
    a, b = TokenData(prepared, "train"), TokenData(out, "train")
    assert len(b.arrays) > 3  # several shards, read back as one stream
    assert np.array_equal(a.read(0, a.num_tokens), b.read(0, b.num_tokens))
    # a window straddling a shard boundary
    assert np.array_equal(a.read(4990, 30), b.read(4990, 30))
    for split in ("train", "val"):
        assert read_index(out)["splits"][split]["tokens"] == read_index(prepared)["splits"][split]["tokens"]


def test_sampler_reproducible_and_resumable(prepared):
    data = TokenData(prepared, "train")
    s1, s2 = WindowSampler(data, 64, seed=3), WindowSampler(data, 64, seed=3)
    first = s1.next_windows(5)
    assert np.array_equal(first, s2.next_windows(5))
    assert not np.array_equal(first, WindowSampler(data, 64, seed=4).next_windows(5))
    # windows are real consecutive token runs of seq_len + 1
    starts = [int(s1._order()[i]) * 64 for i in range(5)]
    assert all(np.array_equal(first[i], data.read(starts[i], 65)) for i in range(5))
    # resume from (seed, epoch, position) only, across an epoch boundary
    n = s1.n_windows
    s1.next_windows(n - 7)
    state = s1.state_dict()
    assert state == {"seed": 3, "epoch": 0, "position": n - 2}
    after = s1.next_windows(6)
    s3 = WindowSampler(data, 64, seed=3)
    s3.load_state_dict(state)
    assert np.array_equal(after, s3.next_windows(6))
    assert s3.state_dict() == {"seed": 3, "epoch": 1, "position": 4}
    # each epoch visits every window once
    ep = WindowSampler(data, 64, seed=0)
    assert sorted(ep._order().tolist()) == list(range(n))


def test_pretrain_batches_split_inputs_targets(prepared):
    data = TokenData(prepared, "train")
    src = PretrainBatches(WindowSampler(data, 16, seed=0), micro_batch=3, accum=2)
    micro = src.next_step()
    assert len(micro) == 2 and micro[0].tokens.shape == (3, 16)
    w = WindowSampler(data, 16, seed=0).next_windows(6)
    assert micro[1].tokens.tolist() == w[3:, :-1].tolist() and micro[1].targets.tolist() == w[3:, 1:].tolist()
    # data parallel: the ranks split the same global windows, and all advance the same state
    ranks = [PretrainBatches(WindowSampler(data, 16, seed=0), micro_batch=3, accum=1, dp=2, dp_rank=r) for r in (0, 1)]
    parts = [r.next_step()[0].tokens for r in ranks]
    assert parts[0].tolist() == w[:3, :-1].tolist() and parts[1].tolist() == w[3:, :-1].tolist()
    assert ranks[0].state_dict() == ranks[1].state_dict() == src.state_dict()
    mask = np.ones((1, 16), dtype=bool)
    mask[0, :5] = False
    b = Batch.from_windows(w[:1], mask)
    assert b.targets[0, :5].tolist() == [-100] * 5 and b.num_valid == 11


def test_corrupt_and_empty_shards(prepared, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(prepared, bad)
    shard = bad / read_index(bad)["splits"]["train"]["shards"][0]["file"]
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-1])
    with pytest.raises(LlamactlError, match="corrupt.*train-00000.bin"):
        TokenData(bad, "train")
    shard.write_bytes(b"")
    with pytest.raises(LlamactlError, match="empty.*train-00000.bin"):
        TokenData(bad, "train")
    shard.write_bytes(np.full(len(raw) // 2, 65000, dtype=np.uint16).tobytes())
    with pytest.raises(LlamactlError, match="token id 65000"):
        TokenData(bad, "train")
    (bad / "index.json").write_text("{not json")
    with pytest.raises(LlamactlError, match="corrupt index.json"):
        TokenData(bad, "train")


def test_no_documents_and_bad_inputs(tiny_tokenizer, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(LlamactlError, match="no documents"):
        prepare([tmp_path / "empty.txt"], tiny_tokenizer, tmp_path / "o", show_progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": 1}\n')
    with pytest.raises(LlamactlError, match=r'string field "text", it is missing \(.*bad.jsonl:2, field text, --input\)'):
        prepare([tmp_path / "bad.jsonl"], tiny_tokenizer, tmp_path / "o", show_progress=False)
    with pytest.raises(LlamactlError, match="input not found"):
        prepare([tmp_path / "missing.txt"], tiny_tokenizer, tmp_path / "o", show_progress=False)


def test_cli_prepare_errors_are_one_line(tiny_tokenizer, tmp_path, capsys):
    from llamactl.cli import main

    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SystemExit) as e:
        main(["data", "prepare", "--input", str(tmp_path / "empty.txt"), "--tokenizer", str(tiny_tokenizer),
              "--out", str(tmp_path / "o")])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no documents found in 1 input file") and "Traceback" not in "".join(err)


# ---- one reader, one policy, nothing changed on error (issue 12 defect 3, issue 13 items 2 and 6) -------
def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _siblings(d: Path) -> list[str]:
    return sorted(p.name for p in d.parent.iterdir() if p.name != d.name and p.name.startswith(f".{d.name}"))


def test_tokenizer_train_and_prepare_read_the_same_files(tiny_corpus, tmp_path):
    from llamactl.tokenizer import train

    paras = tiny_corpus.read_text().split("\n\n")[:400]
    d = tmp_path / "mixed"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("\n\n".join(paras[:150]) + "\n")
    (d / "sub" / "b.rst").write_text("\n\n".join(paras[150:300]) + "\n")
    (d / "c.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paras[300:]))
    (d / "config.json").write_text('{\n "not": "a corpus"\n}\n')  # a config, not JSONL: walked by neither
    (d / "prog.py").write_text("print('code is not picked from folders')\n")
    files = list_inputs([d])
    assert [f.relative_to(d).as_posix() for f in files] == ["a.txt", "c.jsonl", "sub/b.rst"]
    r = train([d], tmp_path / "tok", 400)
    lines = [l for p in paras for l in p.splitlines() if l]
    assert r.sentences == len(lines)  # every line of every file prepare reads, and nothing else
    index = prepare([d], r.path, tmp_path / "data", val_fraction=0.0, workers=1, show_progress=False)
    assert index["sources"] == [str(f) for f in files] and index["splits"]["train"]["documents"] == len(paras)


ELF_HEAD = b"\x7fELF\x02\x01\x01\x00" + bytes(8) + b"\x02\x00\x3e\x00"


@pytest.mark.parametrize("name, raw, match", [
    ("prog.txt", ELF_HEAD + b"some words\n" * 50, r"binary file, not text: NUL byte at line 1 \(.*prog.txt:1, --input\)"),
    ("prog", b"hello\n" + ELF_HEAD, r"binary file.*prog:2"),
    ("latin1.txt", "caf\u00e9 ol\u00e9\n".encode("utf-8") + "na\u00efve\n".encode("latin-1"),
     r"not UTF-8 text: byte 0xef at line 2 \(.*latin1.txt:2, --input\)"),
    ("nul.jsonl", b'{"text": "ok"}\n{"text": "a\x00b"}\n', r"binary file.*nul.jsonl:2"),
])
def test_binary_and_non_utf8_refused_by_both_commands(tiny_tokenizer, tmp_path, name, raw, match):
    from llamactl.tokenizer import train

    src = tmp_path / name
    src.write_bytes(raw)
    with pytest.raises(LlamactlError, match=match):
        prepare([src], tiny_tokenizer, tmp_path / "o", workers=1, show_progress=False)
    with pytest.raises(LlamactlError, match=match):
        train([src], tmp_path / "t", 300)
    assert not (tmp_path / "o").exists() and not (tmp_path / "t" / "tokenizer.model").exists()


def test_utf8_bom_and_crlf_are_not_text(tiny_tokenizer, tmp_path):
    """A byte-order mark and Windows line ends read as the same documents as plain UTF-8 with \\n."""
    (tmp_path / "bom.txt").write_bytes("\ufeffFirst words,\r\nsame document.\r\n\r\nSecond.\r\n".encode("utf-8"))
    (tmp_path / "plain.txt").write_bytes("First words,\nsame document.\n\nSecond.\n".encode("utf-8"))
    a = prepare([tmp_path / "bom.txt"], tiny_tokenizer, tmp_path / "a", val_fraction=0.0, workers=1, show_progress=False)
    b = prepare([tmp_path / "plain.txt"], tiny_tokenizer, tmp_path / "b", val_fraction=0.0, workers=1, show_progress=False)
    assert a["splits"] == b["splits"]
    assert (tmp_path / "a" / "train-00000.bin").read_bytes() == (tmp_path / "b" / "train-00000.bin").read_bytes()


@pytest.mark.parametrize("case", ["empty", "binary", "bad_jsonl_late", "surrogate", "missing_tokenizer"])
def test_failed_prepare_leaves_existing_data_untouched(prepared, tiny_tokenizer, tmp_path, case):
    out = tmp_path / "data"
    shutil.copytree(prepared, out)
    before = _snapshot(out)
    src = tmp_path / "in.txt"
    tok = tiny_tokenizer
    if case == "empty":
        src.write_text("\n\n")
    elif case == "binary":
        src.write_bytes(ELF_HEAD * 100)
    elif case == "bad_jsonl_late":  # fails after thousands of tokens were written
        src = tmp_path / "in.jsonl"
        src.write_text("".join(json.dumps({"text": f"document number {i} has words"}) + "\n" for i in range(2000))
                       + '["not an object"]\n')
    elif case == "surrogate":
        src = tmp_path / "in.jsonl"
        src.write_text('{"text": "fine"}\n{"text": "half a pair \\ud83e here"}\n')
    else:
        src.write_text("words\n")
        tok = tmp_path / "nope.model"
    with pytest.raises(LlamactlError):
        prepare([src], tok, out, workers=1, show_progress=False)
    assert _snapshot(out) == before
    assert _siblings(out) == []  # no temporary directory left next to it


def test_prepare_replaces_existing_data_only_when_complete(prepared, tiny_tokenizer, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(prepared, out)
    (tmp_path / "small.txt").write_text("One short document.\n\nAnd another one.\n")
    index = prepare([tmp_path / "small.txt"], tiny_tokenizer, out, val_fraction=0.0, workers=1,
                    shard_tokens=8, show_progress=False)
    assert read_index(out) == index and index["splits"]["train"]["documents"] == 2
    # the old, longer set of shards is gone: only what the new index names (and the tokenizer) remain
    names = {sh["file"] for s in index["splits"].values() for sh in s["shards"]}
    assert sorted(p.name for p in out.iterdir()) == sorted(names | {"index.json", "tokenizer.model"})
    assert TokenData(out).num_tokens == index["splits"]["train"]["tokens"] and _siblings(out) == []


def test_prepare_refuses_an_out_dir_it_did_not_write(tiny_tokenizer, tmp_path):
    (tmp_path / "in.txt").write_text("Some words.\n")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(LlamactlError, match=r"not a prepared data directory.*notes.txt.*--out"):
        prepare([tmp_path / "in.txt"], tiny_tokenizer, mine, workers=1, show_progress=False)
    assert _snapshot(mine) == {"notes.txt": b"keep me"}
    (tmp_path / "file").write_text("x")
    with pytest.raises(LlamactlError, match=r"is a file.*--out"):
        prepare([tmp_path / "in.txt"], tiny_tokenizer, tmp_path / "file", workers=1, show_progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder is fine
    prepare([tmp_path / "in.txt"], tiny_tokenizer, empty, val_fraction=0.0, workers=1, show_progress=False)
    assert read_index(empty)["splits"]["train"]["documents"] == 1


def test_prepare_twice_with_out_inside_the_input_folder(tiny_tokenizer, tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "a.txt").write_text("Alpha words here.\n\nBeta words there.\n")
    first = prepare([src], tiny_tokenizer, src / "data", val_fraction=0.0, workers=1, show_progress=False)
    again = prepare([src], tiny_tokenizer, src / "data", val_fraction=0.0, workers=1, show_progress=False)
    assert again["splits"] == first["splits"] and again["sources"] == [str(src / "a.txt")]


@pytest.mark.parametrize("kwargs, match", [({"shard_tokens": 0}, "--shard-tokens"), ({"workers": 0}, "--workers"),
                                           ({"val_fraction": 1.0}, "--val-fraction")])
def test_prepare_refuses_bad_numbers(tiny_tokenizer, tmp_path, kwargs, match):
    (tmp_path / "in.txt").write_text("Some words.\n")
    with pytest.raises(LlamactlError, match=match):
        prepare([tmp_path / "in.txt"], tiny_tokenizer, tmp_path / "o", show_progress=False, **{"workers": 1, **kwargs})
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("change, match", [
    (lambda i: i.update(dtype="float32"), "dtype must be uint16 or uint32"),
    (lambda i: i.update(vocab_size="2048"), "vocab_size must be a positive integer"),
    (lambda i: i.update(vocab_size=70000), "does not fit dtype uint16"),
    (lambda i: i.update(splits=[1]), "splits must be an object"),
    (lambda i: i["splits"]["train"].update(shards={}), "has no list of shards"),
    (lambda i: i["splits"]["train"]["shards"][0].pop("file"), "without a file name"),
    (lambda i: i["splits"]["train"]["shards"][0].update(file="../../x.bin"), "not one data prepare writes"),
    (lambda i: i.clear(), "dtype"),
])
def test_damaged_index_is_one_clear_line(prepared, tmp_path, change, match):
    bad = tmp_path / "bad"
    shutil.copytree(prepared, bad)
    index = json.loads((bad / "index.json").read_text())
    change(index)
    (bad / "index.json").write_text(json.dumps(index))
    with pytest.raises(LlamactlError, match=rf"corrupt index.json: .*{match}.*index.json\)"):
        TokenData(bad, "train")


def test_prepare_recovers_from_a_killed_prepare(prepared, tiny_tokenizer, tmp_path):
    """A kill between moving the old data aside and renaming the new one in must not lose the old data."""
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "data"
    shutil.copytree(prepared, tmp_path / f".data.old-{dead.pid}")       # moved aside, never replaced
    (tmp_path / f".data.tmp-{dead.pid}" / ".parts").mkdir(parents=True)  # the killed run's work folder
    live = tmp_path / f".data.tmp-{os.getppid()}"                       # a live process: not ours to touch
    live.mkdir()
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(LlamactlError, match="no documents"):
        prepare([tmp_path / "empty.txt"], tiny_tokenizer, out, workers=1, show_progress=False)
    assert _snapshot(out) == _snapshot(prepared)  # the old data is back where it was
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "data", "empty.txt"])


def test_all_documents_in_validation_is_named(tiny_tokenizer, tmp_path):
    text = next(t for t in (f"document {i}" for i in range(100)) if is_validation(t, 0.5))
    (tmp_path / "one.txt").write_text(text + "\n")
    with pytest.raises(LlamactlError, match=r"no training documents: all 1 document\(s\).*--val-fraction\)"):
        prepare([tmp_path / "one.txt"], tiny_tokenizer, tmp_path / "o", val_fraction=0.5, workers=1,
                show_progress=False)
    assert not (tmp_path / "o").exists()


def test_prepare_out_under_a_file_is_one_line(tiny_tokenizer, tmp_path):
    (tmp_path / "in.txt").write_text("Some words.\n")
    (tmp_path / "f").write_text("x")
    with pytest.raises(LlamactlError, match=r"cannot write .*f/data.*\(--out\)"):
        prepare([tmp_path / "in.txt"], tiny_tokenizer, tmp_path / "f" / "data", workers=1, show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "in.txt"]


def test_prepare_failure_removes_the_folders_it_created(tiny_tokenizer, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(LlamactlError, match="no documents"):
        prepare([tmp_path / "empty.txt"], tiny_tokenizer, tmp_path / "new" / "deep" / "data", workers=1,
                show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]
