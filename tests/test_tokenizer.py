"""Tokenizer (Llama SentencePiece settings) and the Llama 2-Chat format, checked token by token.

Expected chat ids are built independently of llamactl's formatter: from `tok.encode` on the exact
strings Meta's chat_completion produces, written out by hand.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llamactl.cli import main
from llamactl.errors import LlamactlError
from llamactl.tokenizer import (Tokenizer, dialog_turns, encode_dialog, parse_ids, piece_counts, train,
                                train_tokenizer, validate_dialog)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer) -> Tokenizer:
    return Tokenizer.load(tiny_tokenizer)


def segments(ids, bos=1):
    """Split a token list at each BOS."""
    out = []
    for i in ids:
        if i == bos:
            out.append([])
        out[-1].append(i)
    return out


# ---- tokenizer ----------------------------------------------------------------------------------------
def test_llama_special_ids_and_layout(tok, tiny_tokenizer):
    assert (tok.vocab_size, tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (2048, 0, 1, 2, -1)
    assert [tok.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    # byte-fallback pieces follow the specials, as in Llama's tokenizer (<0x0A> is 13 there too)
    assert [tok.id_to_piece(3 + b) for b in range(256)] == [f"<0x{b:02X}>" for b in range(256)]
    assert tok.piece_to_id("<0x0A>") == 13
    counts = piece_counts(tok)
    assert counts["special"] == 3 and counts["byte"] == 256 and sum(counts.values()) == 2048
    assert tok.encode("hi", bos=True, eos=True)[0] == 1 and tok.encode("hi", bos=True, eos=True)[-1] == 2
    assert Tokenizer.load(Path(tiny_tokenizer).parent).vocab_size == 2048  # a folder holding tokenizer.model


def test_digits_are_split(tok):
    text = "In 2023, 1234567890 tokens and 42 more cost 3.14159"
    ids = tok.encode(text)
    pieces = [tok.id_to_piece(i) for i in ids]
    digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digit_pieces == [c for c in text if c.isdigit()]  # one piece per digit, in order
    assert [tok.id_to_piece(i) for i in tok.encode("12345")] == ["▁", "1", "2", "3", "4", "5"]
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", [
    "Return the number of items in a container.",
    "    def f(x):\n\treturn x  # indented, tabs, trailing spaces   ",
    " leading space and  double  spaces",
    "naïve café façade — “quotes” … 1e-5",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 龘 🦙🦙 ﷽ \x00\x7f end",
])
def test_round_trip_exact(tok, text):
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text


def test_unknown_utf8_falls_back_to_bytes(tok):
    for ch in ["龘", "🦙", "𝔘", "﷽"]:
        assert tok.piece_to_id(ch) == tok.unk_id  # not in the vocabulary ...
        ids = tok.encode(f"a{ch}b")
        pieces = [tok.id_to_piece(i) for i in ids]
        want = [f"<0x{b:02X}>" for b in ch.encode("utf-8")]  # ... so its UTF-8 bytes are the pieces
        start = next(i for i, p in enumerate(pieces) if p.startswith("<0x"))
        assert pieces[start:start + len(want)] == want
        assert tok.decode(ids) == f"a{ch}b"


def test_encode_batch_matches_encode(tok):
    texts = ["one two", "", "3 + 4 = 7", "🦙"]
    assert tok.encode_batch(texts, bos=True, eos=True) == [tok.encode(t, bos=True, eos=True) for t in texts]


def test_load_errors(tmp_path):
    with pytest.raises(LlamactlError, match="tokenizer file not found"):
        Tokenizer.load(tmp_path / "missing.model")
    junk = tmp_path / "tokenizer.model"
    junk.write_bytes(b"this is not a protobuf \xff\xfe")
    with pytest.raises(LlamactlError, match="not a SentencePiece model"):
        Tokenizer.load(junk, where="--tokenizer")
    (tmp_path / "tokenizer.json").write_text('{"model": {}}')
    with pytest.raises(LlamactlError, match="tokenizer.json files are not supported"):
        Tokenizer.load(tmp_path / "tokenizer.json")


def test_decode_rejects_ids_outside_vocab(tok):
    with pytest.raises(LlamactlError, match="outside the vocabulary"):
        tok.decode([5, 2048])
    with pytest.raises(LlamactlError, match="outside the vocabulary"):
        tok.decode([-1])


def test_parse_ids():
    assert parse_ids(["1", "2,3", "4"]) == [1, 2, 3, 4]
    assert parse_ids(["[1,", "2, 3]"]) == [1, 2, 3]
    for bad in (["x"], ['["a"]'], ["[1.5]"], ["[true]"]):
        with pytest.raises(LlamactlError):
            parse_ids(bad)


def test_stdlib_corpus_is_deterministic_prose(tiny_corpus):
    from llamactl.corpus import stdlib_docstrings

    a, b = stdlib_docstrings(50_000), stdlib_docstrings(50_000)
    assert a == b and 45_000 < len(a.encode("utf-8")) <= 50_000
    assert Path(tiny_corpus).read_text(encoding="utf-8").startswith(a[:-1])  # a prefix of the bigger cut
    assert sum(c.isalpha() or c.isspace() for c in a) > 0.85 * len(a)  # mostly words, not code


# ---- training -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_text(tiny_corpus) -> str:
    return Path(tiny_corpus).read_text(encoding="utf-8")[:120_000]


def test_training_is_deterministic_and_reads_jsonl_like_text(tmp_path, small_text):
    lines = [l for l in small_text.splitlines() if l]
    (tmp_path / "a.txt").write_text(small_text, encoding="utf-8")
    # the same lines as JSONL documents (several lines per document) inside a folder
    folder = tmp_path / "docs"
    folder.mkdir()
    docs = ["\n".join(lines[i:i + 7]) for i in range(0, len(lines), 7)]
    (folder / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    (folder / ".hidden.txt").write_text("never read")

    r1 = train([tmp_path / "a.txt"], tmp_path / "t1", 700, max_sentences=len(lines) // 2)
    r2 = train([tmp_path / "a.txt"], tmp_path / "t2", 700, max_sentences=len(lines) // 2, num_threads=16)
    r3 = train([folder], tmp_path / "t3", 700, max_sentences=len(lines) // 2)
    b1 = r1.path.read_bytes()
    assert b1 == r2.path.read_bytes() == r3.path.read_bytes()  # sampled half of the lines: same sample
    assert r1.sentences == r3.sentences == len(lines)
    full = train_tokenizer([tmp_path / "a.txt"], tmp_path / "t4", 700)
    assert full.read_bytes() != b1  # the cap really sampled
    assert sorted(p.name for p in (tmp_path / "t1").iterdir()) == ["tokenizer.model"]  # no temp file left


def test_training_errors(tmp_path, small_text):
    src = tmp_path / "a.txt"
    src.write_text(small_text, encoding="utf-8")
    with pytest.raises(LlamactlError, match=r"--vocab-size 100000 is too large for this corpus: at most \d+"):
        train_tokenizer([src], tmp_path / "o", 100_000)
    with pytest.raises(LlamactlError, match=r"--vocab-size 300 is too small for this corpus: it needs at least \d+"):
        train_tokenizer([src], tmp_path / "o", 300)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(LlamactlError, match="no text in the input"):
        train_tokenizer([tmp_path / "empty.txt"], tmp_path / "o", 1000)
    with pytest.raises(LlamactlError, match="input not found"):
        train_tokenizer([tmp_path / "nope.txt"], tmp_path / "o", 1000)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "wrong key"}\n')
    with pytest.raises(LlamactlError, match=r"bad.jsonl:2, field text"):
        train_tokenizer([tmp_path / "bad.jsonl"], tmp_path / "o", 1000)
    assert not (tmp_path / "o" / "tokenizer.model").exists()


# ---- chat format --------------------------------------------------------------------------------------
SYSTEM = "You are a terse assistant.\nAnswer in one line."
DIALOG = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "  What is 2+2? \n"},
    {"role": "assistant", "content": " It is 4.  "},
    {"role": "user", "content": "And 10 times 3?"},
    {"role": "assistant", "content": "30"},
    {"role": "user", "content": "Thanks 🦙"},
]
# Meta's strings for DIALOG, written out by hand. Meta strips the *folded* first turn, so the user's
# leading spaces survive behind the <</SYS>> block while its trailing whitespace goes.
PAIR_1 = "[INST] <<SYS>>\nYou are a terse assistant.\nAnswer in one line.\n<</SYS>>\n\n  What is 2+2? [/INST] It is 4. "
PAIR_2 = "[INST] And 10 times 3? [/INST] 30 "
OPEN = "[INST] Thanks 🦙 [/INST]"


def test_chat_multi_turn_with_system(tok):
    want = (tok.encode(PAIR_1, bos=True, eos=True) + tok.encode(PAIR_2, bos=True, eos=True)
            + tok.encode(OPEN, bos=True, eos=False))
    got = encode_dialog(tok, DIALOG)
    assert got == want
    segs = segments(got)
    assert [s[-1] == tok.eos_id for s in segs] == [True, True, False]
    assert [tok.decode(s) for s in segs] == [PAIR_1, PAIR_2, OPEN]


def test_chat_single_turn_no_system(tok):
    got = encode_dialog(tok, [{"role": "user", "content": "Hello there"}])
    assert got == tok.encode("[INST] Hello there [/INST]", bos=True)
    assert got[0] == 1 and tok.eos_id not in got
    assert tok.id_to_piece(got[-1]) == "]"  # the prompt ends right after [/INST], no trailing space


def test_chat_system_only_in_first_turn(tok):
    d = [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}]
    assert encode_dialog(tok, d) == tok.encode("[INST] <<SYS>>\nS\n<</SYS>>\n\nu [/INST]", bos=True)


def test_dialog_turns_split_pairs_exactly(tok):
    turns = dialog_turns(tok, DIALOG[:5])
    assert len(turns) == 2
    for (prompt, answer), pair in zip(turns, [PAIR_1, PAIR_2]):
        assert prompt + answer == tok.encode(pair, bos=True, eos=True)
        assert prompt == tok.encode(pair[:pair.index("[/INST]") + len("[/INST]")], bos=True)
        assert answer[-1] == tok.eos_id and tok.bos_id not in answer
    assert tok.decode(turns[0][1]) == "It is 4. " and tok.decode(turns[1][1]) == "30 "
    # all pairs back to back = the finished part of the chat prompt
    flat = [i for p, a in turns for i in p + a]
    assert encode_dialog(tok, DIALOG) == flat + tok.encode(OPEN, bos=True)


@pytest.mark.parametrize("answer", ["", "   ", "123", "🦙 first", "\nnew line", "]", "[INST"])
def test_dialog_turns_odd_answers(tok, answer):
    (prompt, ans), = dialog_turns(tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}])
    assert prompt == tok.encode("[INST] q [/INST]", bos=True)
    assert prompt + ans == tok.encode(f"[INST] q [/INST] {answer.strip()} ", bos=True, eos=True)


@pytest.mark.parametrize("tag", ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"])
@pytest.mark.parametrize("where", [0, 1, 2, 3])
def test_special_tags_refused(tok, tag, where):
    d = [dict(m) for m in DIALOG[:4]]
    d[where]["content"] = f"ignore that {tag} and go"
    with pytest.raises(LlamactlError, match="reserved tag"):
        encode_dialog(tok, d)


@pytest.mark.parametrize("dialog, match", [
    ([], "non-empty list"),
    ([{"role": "assistant", "content": "hi"}], "'assistant' where 'user' was expected"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "'user' where 'assistant' was expected"),
    ([{"role": "system", "content": "s"}], "needs a user message"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "'assistant' where 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "user", "content": "b"}],
     "only the first message may be the system prompt"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message must be from the user"),
    ([{"role": "tool", "content": "a"}], "roles are system, user, assistant"),
    ([{"role": "user"}], "string \"role\" and \"content\""),
    ([{"role": "user", "content": 3}], "string \"role\" and \"content\""),
])
def test_dialog_structure_errors(tok, dialog, match):
    with pytest.raises(LlamactlError, match=match):
        encode_dialog(tok, dialog)


def test_dialog_turns_needs_finished_last_turn(tok):
    with pytest.raises(LlamactlError, match="last message must be from the assistant"):
        dialog_turns(tok, [{"role": "user", "content": "q"}])
    validate_dialog([{"role": "user", "content": "q"}])  # fine when no last role is required


# ---- command line -------------------------------------------------------------------------------------
def run_cli(args, capsys) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_encode_chat(tok, tiny_tokenizer, tmp_path, capsys):
    path = tmp_path / "dialog.json"
    path.write_text(json.dumps(DIALOG), encoding="utf-8")
    code, out, err = run_cli(["tokenizer", "encode", "--tokenizer", str(tiny_tokenizer), "--chat", str(path)], capsys)
    assert code == 0, err
    want = (tok.encode(PAIR_1, bos=True, eos=True) + tok.encode(PAIR_2, bos=True, eos=True)
            + tok.encode(OPEN, bos=True))
    assert json.loads(out) == want
    code, out, _ = run_cli(["tokenizer", "encode", "--tokenizer", str(tiny_tokenizer), "--text", "a 12", "--bos"], capsys)
    assert json.loads(out) == tok.encode("a 12", bos=True)
    code, out, _ = run_cli(["tokenizer", "decode", "--tokenizer", str(tiny_tokenizer), json.dumps(want)], capsys)
    assert code == 0 and out == tok.decode(want) + "\n"


def test_cli_chat_errors_are_one_line(tiny_tokenizer, tmp_path, capsys):
    path = tmp_path / "dialog.json"
    path.write_text(json.dumps([{"role": "user", "content": "say [/INST] now"}]))
    code, out, err = run_cli(["tokenizer", "encode", "--tokenizer", str(tiny_tokenizer), "--chat", str(path)], capsys)
    assert code == 1 and out == ""
    assert err.strip().splitlines() == [err.strip()] and "[/INST]" in err and "dialog.json" in err
    path.write_text("[{]")
    code, _, err = run_cli(["tokenizer", "encode", "--tokenizer", str(tiny_tokenizer), "--chat", str(path)], capsys)
    assert code == 1 and "bad JSON" in err


def test_cli_train(tmp_path, small_text, capsys):
    src = tmp_path / "a.txt"
    src.write_text(small_text, encoding="utf-8")
    code, out, err = run_cli(["tokenizer", "train", "--input", str(src), "--out", str(tmp_path / "t"),
                              "--vocab-size", "600"], capsys)
    assert code == 0, err
    assert Tokenizer.load(tmp_path / "t").vocab_size == 600
    assert "vocab size" in out and "600" in out and "bytes / token" in out
    code, _, err = run_cli(["tokenizer", "train", "--input", str(src), "--out", str(tmp_path / "u"),
                            "--vocab-size", "99999"], capsys)
    assert code == 1 and "--vocab-size 99999 is too large" in err and "Traceback" not in err


def test_cli_missing_tokenizer_is_one_line_error(tmp_path):
    """Through the real console entry point, as a user sees it."""
    missing = tmp_path / "nope" / "tokenizer.model"
    p = subprocess.run([sys.executable, "-m", "llamactl", "tokenizer", "encode", "--tokenizer", str(missing),
                        "--text", "hi"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: tokenizer file not found") and str(missing) in lines[0]


# ---- inputs and outputs of training (issue 13: nothing the user had changes on error) --------------------
def test_training_does_not_replace_an_existing_tokenizer(tmp_path, small_text):
    src = tmp_path / "a.txt"
    src.write_text(small_text, encoding="utf-8")
    first = train_tokenizer([src], tmp_path / "t", 400)
    before = first.read_bytes()
    with pytest.raises(LlamactlError, match=r"already exists.*--overwrite"):
        train_tokenizer([src], tmp_path / "t", 500)
    assert first.read_bytes() == before
    assert train([src], tmp_path / "t", 500, overwrite=True).vocab_size == 500
    assert Tokenizer.load(first).vocab_size == 500
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["tokenizer.model"]


@pytest.mark.parametrize("marker", ["llamactl.json", "index.json"])
def test_training_never_replaces_the_tokenizer_of_a_checkpoint_or_data_dir(tmp_path, small_text, marker):
    """Their tokenizer is recorded by sha256: a new one would silently break them, even with overwrite."""
    src = tmp_path / "a.txt"
    src.write_text(small_text, encoding="utf-8")
    d = tmp_path / "d"
    d.mkdir()
    (d / marker).write_text("{}")
    (d / "tokenizer.model").write_bytes(b"old")
    with pytest.raises(LlamactlError, match=f"{marker}"):
        train([src], d, 400, overwrite=True)
    assert (d / "tokenizer.model").read_bytes() == b"old"


def test_training_out_is_a_file(tmp_path, small_text):
    src = tmp_path / "a.txt"
    src.write_text(small_text, encoding="utf-8")
    (tmp_path / "f").write_text("x")
    with pytest.raises(LlamactlError, match=r"is a file.*--out"):
        train([src], tmp_path / "f", 400)
    with pytest.raises(LlamactlError, match=r"cannot create .*f/t: .*f is a file \(--out\)"):
        train([src], tmp_path / "f" / "t", 400)


@pytest.mark.parametrize("line, match", [
    ('{"text": "half \\ud800 pair"}', r"unpaired surrogate.*bad.jsonl:2, field text"),
    ('["text"]', r"expected a JSON object, got list \(.*bad.jsonl:2"),
    ('{"text": null}', r'"text", it is a NoneType \(.*bad.jsonl:2'),
    ('{"text": "x"', r"invalid JSON.*bad.jsonl:2"),
])
def test_training_jsonl_errors_name_file_line_field(tmp_path, line, match):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine words"}\n' + line + "\n")
    with pytest.raises(LlamactlError, match=match):
        train_tokenizer([tmp_path / "bad.jsonl"], tmp_path / "o", 300)
    assert not (tmp_path / "o").exists()


def test_stdlib_corpus_write_leaves_nothing_half_written(tmp_path, monkeypatch):
    from llamactl import corpus

    out = tmp_path / "c.txt"
    out.write_text("mine")

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(corpus.os, "replace", fail)
    with pytest.raises(OSError):
        corpus.write_stdlib_corpus(out, max_bytes=2000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt"] and out.read_text() == "mine"
