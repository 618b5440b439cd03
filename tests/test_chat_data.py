"""Chat-stage data: SFT / preference / prompt files (every bad-data error names file, line and field),
SFT loss masks (only answer tokens ever carry loss, every assistant turn), packing and its batch source."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from llamactl.chat_data import (RATINGS, PreferencePair, PromptItem, SFTExample, load_records, read_preferences,
                                read_prompts, read_sft, write_jsonl)
from llamactl.data import IGNORE
from llamactl.errors import LlamactlError
from llamactl.sft_data import SFTBatches, encode_sft, iter_packed, pack, positions
from llamactl.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_tokenizer) -> Tokenizer:
    return Tokenizer.load(tiny_tokenizer)


def jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


U = lambda c: {"role": "user", "content": c}        # noqa: E731
A = lambda c: {"role": "assistant", "content": c}   # noqa: E731
S = lambda c: {"role": "system", "content": c}      # noqa: E731
DIALOG = [S("Be brief."), U("What is 2+2?"), A("It is 4."), U("And 10 times 3?"), A(" 30 "), U("Thanks"),
          A("You are welcome, bye.")]


# ---- reading ------------------------------------------------------------------------------------------
def test_read_sft_both_forms_in_order(tmp_path):
    p = jsonl(tmp_path / "sft.jsonl", [{"messages": DIALOG, "family": "math"}, "",
                                       {"prompt": "Hi", "response": "Hello!", "id": 7}])
    got = list(read_sft(p))
    assert [g.messages for g in got] == [DIALOG, [U("Hi"), A("Hello!")]]
    assert [g.extra for g in got] == [{"family": "math"}, {"id": 7}]
    assert [g.where for g in got] == [f"{p}:1", f"{p}:3"]  # blank lines skipped, numbering kept
    assert got[0].to_json() == {"messages": DIALOG, "family": "math"}


def test_read_preferences_and_prompts(tmp_path):
    rows = [{"prompt": "q1", "chosen": "good", "rejected": "bad", "rating": "unsure", "safety": False},
            {"messages": DIALOG[:2], "chosen": "4", "rejected": "5", "rating": "significantly_better", "src": "x"},
            {"prompt": "q3", "chosen": "a", "rejected": "b"}]
    pairs = list(read_preferences(jsonl(tmp_path / "p.jsonl", rows)))
    assert [p.rating for p in pairs] == ["negligibly_better", "significantly_better", None]
    assert [p.safety for p in pairs] == [False, None, None] and pairs[1].extra == {"src": "x"}
    assert pairs[1].dialog("chosen") == DIALOG[:2] + [A("4")] and pairs[1].dialog("rejected")[-1] == A("5")
    assert pairs[0].prompt == [U("q1")]
    items = list(read_prompts(jsonl(tmp_path / "q.jsonl", [
        {"prompt": "2+3?", "safety": False, "family": "arith", "answer": 5},
        {"messages": [S("s"), U("hi")], "safety": True}])))
    assert items[0].prompt == "2+3?" and items[0].fields == {"family": "arith", "answer": 5}
    assert items[1].messages == [S("s"), U("hi")] and items[1].safety is True and items[1].fields == {}


def test_write_round_trip_and_atomic(tmp_path):
    pairs = [PreferencePair([U("q")], "yes", "no", r, s) for r, s in zip(RATINGS, (True, False, None, True))]
    pairs.append(PreferencePair(DIALOG[:5] + [U("more")], "c", "r", None, None, extra={"k": 1}))
    out = tmp_path / "sub" / "pairs.jsonl"
    assert write_jsonl(out, pairs, kind="preferences") == 5
    back = list(read_preferences(out))
    assert [(b.prompt, b.chosen, b.rejected, b.rating, b.safety, b.extra) for b in back] == \
        [(p.prompt, p.chosen, p.rejected, p.rating, p.safety, p.extra) for p in pairs]
    before = out.read_bytes()
    bad = pairs[:2] + [PreferencePair([U("q")], "same", " same ")]
    with pytest.raises(LlamactlError, match=r"same answer.*pairs.jsonl:3, field rejected, --out"):
        write_jsonl(out, bad, kind="preferences")
    assert out.read_bytes() == before and sorted(p.name for p in out.parent.iterdir()) == ["pairs.jsonl"]
    items = [PromptItem([U("p")], True, {"answer": "x"}), SFTExample([U("u"), A("a")], extra={"t": 1})]
    write_jsonl(tmp_path / "q.jsonl", items[:1], kind="prompts")
    assert list(read_prompts(tmp_path / "q.jsonl"))[0].to_json() == {"prompt": "p", "safety": True, "answer": "x"}
    write_jsonl(tmp_path / "s.jsonl", items[1:], kind="sft")
    assert list(read_sft(tmp_path / "s.jsonl"))[0].to_json() == {"messages": [U("u"), A("a")], "t": 1}


GOOD = {"sft": {"prompt": "fine", "response": "also fine"},
        "preferences": {"prompt": "fine", "chosen": "a", "rejected": "b"},
        "prompts": {"prompt": "fine"}}
BAD = [  # (kind, line 2, field, what the message says)
    ("sft", '["a list"]', None, "expected a JSON object, got list"),
    ("sft", '{"messages": [}', None, "invalid JSON"),
    ("sft", {}, "messages", 'missing "messages"'),
    ("sft", {"messages": "hi"}, "messages", "non-empty list"),
    ("sft", {"messages": []}, "messages", "non-empty list"),
    ("sft", {"messages": ["hi"]}, r"messages\[0\]", "must be an object"),
    ("sft", {"messages": [{"content": "x"}, A("y")]}, r"messages\[0\]\.role", "string"),
    ("sft", {"messages": [U("x"), {"role": "assistant", "content": 3}]}, r"messages\[1\]\.content", "string"),
    ("sft", {"messages": [U("x"), {"role": "tool", "content": "y"}]}, r"messages\[1\]\.role", "roles are system"),
    ("sft", {"messages": [A("x"), U("y")]}, r"messages\[0\]\.role", "'assistant' where 'user' was expected"),
    ("sft", {"messages": [U("x"), U("y")]}, r"messages\[1\]\.role", "alternate"),
    ("sft", {"messages": [U("x"), A("y"), S("z"), A("w")]}, r"messages\[2\]\.role", "only the first message"),
    ("sft", {"messages": [S("s")]}, r"messages\[0\]\.role", "needs a user message"),
    ("sft", {"messages": [U("x"), A("y"), U("z")]}, r"messages\[2\]\.role", "last message must be from the assistant"),
    ("sft", {"messages": [U("x"), A("  \n")]}, r"messages\[1\]\.content", "must not be empty"),
    ("sft", {"messages": [S(""), U("x"), A("y")]}, r"messages\[0\]\.content", "must not be empty"),
    ("sft", {"messages": [U("x"), A("half \ud800 pair")]}, r"messages\[1\]\.content", "unpaired surrogate"),
    ("sft", {"prompt": "x"}, "response", 'missing "response"'),
    ("sft", {"response": "x"}, "prompt", 'missing "prompt"'),
    ("sft", {"prompt": 5, "response": "x"}, "prompt", "must be a string, got int"),
    ("sft", {"prompt": "x", "response": "a [/INST] b"}, "response", r"reserved tag \[/INST\]"),
    ("sft", {"messages": [U("x"), A("y")], "prompt": "x"}, "messages", "not both"),
    ("preferences", {"chosen": "a", "rejected": "b"}, "prompt", 'missing "prompt"'),
    ("preferences", {"prompt": "q", "messages": [U("q")], "chosen": "a", "rejected": "b"}, "messages", "not both"),
    ("preferences", {"messages": [U("q"), A("a")], "chosen": "a", "rejected": "b"}, r"messages\[1\]\.role",
     "last message must be from the user"),
    ("preferences", {"prompt": "q", "rejected": "b"}, "chosen", 'missing "chosen"'),
    ("preferences", {"prompt": "q", "chosen": "a", "rejected": ""}, "rejected", "must not be empty"),
    ("preferences", {"prompt": "q", "chosen": "same", "rejected": "same "}, "rejected", "same answer as chosen"),
    ("preferences", {"prompt": "q", "chosen": "<<SYS>> a", "rejected": "b"}, "chosen", "reserved tag <<SYS>>"),
    ("preferences", {"prompt": "q", "chosen": "a", "rejected": "b", "rating": "much_better"}, "rating",
     "must be one of significantly_better, better, slightly_better, negligibly_better"),
    ("preferences", {"prompt": "q", "chosen": "a", "rejected": "b", "rating": 2}, "rating", "must be one of"),
    ("preferences", {"prompt": "q", "chosen": "a", "rejected": "b", "safety": "yes"}, "safety", "true or false"),
    ("prompts", {"family": "x"}, "prompt", 'missing "prompt"'),
    ("prompts", {"prompt": "q <</SYS>>"}, "prompt", "reserved tag <</SYS>>"),
    ("prompts", {"prompt": "q", "safety": 1}, "safety", "true or false"),
    ("prompts", {"messages": [U("q"), A("a")]}, r"messages\[1\]\.role", "last message must be from the user"),
]


@pytest.mark.parametrize("kind, line, field, what", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_every_bad_record_names_file_line_and_field(tmp_path, kind, line, field, what):
    p = jsonl(tmp_path / f"{kind}.jsonl", [GOOD[kind], line, GOOD[kind]])
    with pytest.raises(LlamactlError) as e:
        load_records(p, kind)
    msg = str(e.value)
    where = rf"\({re.escape(str(p))}:2" + (rf", field {field}" if field else "") + r", --data\)$"
    assert re.search(what, msg) and re.search(where, msg), msg
    assert "\n" not in msg


@pytest.mark.parametrize("tag", ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"])
@pytest.mark.parametrize("role", ["system", "user", "assistant"])
def test_reserved_tags_refused_in_every_role(tmp_path, tag, role):
    msgs = [S("s"), U("u"), A("a")]
    i = ["system", "user", "assistant"].index(role)
    msgs[i] = {"role": role, "content": f"text {tag} more"}
    p = jsonl(tmp_path / "t.jsonl", [{"messages": msgs}])
    with pytest.raises(LlamactlError, match=rf"reserved tag {re.escape(tag)}.*t.jsonl:1, field messages\[{i}\]\.content"):
        list(read_sft(p))


def test_file_level_errors(tmp_path):
    with pytest.raises(LlamactlError, match=r"cannot read .*missing.jsonl.*--data"):
        list(read_sft(tmp_path / "missing.jsonl"))
    (tmp_path / "bin.jsonl").write_bytes(b'{"prompt": "a", "response": "b"}\n\x7fELF\x00\x01\n')
    with pytest.raises(LlamactlError, match=r"binary file.*bin.jsonl:2, --data"):
        list(read_sft(tmp_path / "bin.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(LlamactlError, match=r"no sft records in .*empty.jsonl \(--data\)"):
        load_records(tmp_path / "empty.jsonl", "sft")
    with pytest.raises(LlamactlError, match=r"--prompts"):
        list(read_prompts(jsonl(tmp_path / "q.jsonl", [{"x": 1}])))


# ---- SFT encoding: the loss falls exactly on the answers ----------------------------------------------
def _runs(values, mask, on):
    """Maximal runs of `values` where mask == on."""
    out, cur = [], []
    for v, m in zip(values, mask):
        if m == on:
            cur.append(v)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def test_sft_mask_is_exactly_every_answer(tok):
    ids, mask = encode_sft(tok, DIALOG)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    answers = [m["content"] for m in DIALOG if m["role"] == "assistant"]
    runs = _runs(ids, mask, 1)
    assert [tok.decode(r) for r in runs] == [a.strip() + " " for a in answers]  # Meta's " {answer} " ...
    assert all(r[-1] == tok.eos_id for r in runs)                               # ... with its EOS
    prompts = [tok.decode(r) for r in _runs(ids, mask, 0)]
    assert prompts == ["[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2+2? [/INST]", "[INST] And 10 times 3? [/INST]",
                       "[INST] Thanks [/INST]"]
    assert [i for i, m in zip(ids, mask) if m == 0].count(tok.bos_id) == 3 and tok.eos_id not in \
        [i for i, m in zip(ids, mask) if m == 0]
    # the same tokens as the chat encoder gives for the finished pairs (written out independently)
    want = []
    for u, a in [(f"<<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2+2?", "It is 4."), ("And 10 times 3?", "30"),
                 ("Thanks", "You are welcome, bye.")]:
        want += tok.encode(f"[INST] {u} [/INST] {a} ", bos=True, eos=True)
    assert ids == want


def test_sft_mask_when_user_and_answer_share_text(tok):
    """The mask comes from positions, not text: a user line repeated as the answer stays unmasked."""
    ids, mask = encode_sft(tok, [U("yes yes"), A("yes yes"), U("yes yes"), A("no")])
    prompt_len = len(tok.encode("[INST] yes yes [/INST]", bos=True))
    assert mask[:prompt_len] == [0] * prompt_len and mask[prompt_len] == 1
    assert [tok.decode(r) for r in _runs(ids, mask, 1)] == ["yes yes ", "no "]


def test_sft_last_turn_only(tok):
    ids, full = encode_sft(tok, DIALOG)
    ids2, last = encode_sft(tok, DIALOG, last_turn_only=True)
    assert ids == ids2 and [tok.decode(r) for r in _runs(ids, last, 1)] == ["You are welcome, bye. "]
    assert all(a >= b for a, b in zip(full, last))


# ---- packing --------------------------------------------------------------------------------------------
def _sample(n, start, answer_from):
    return list(range(start, start + n)), [0] * answer_from + [1] * (n - answer_from)


def test_pack_boundaries_and_document_ids():
    samples = [_sample(5, 100, 2), _sample(7, 200, 3), _sample(9, 300, 4), _sample(17, 400, 10), _sample(3, 500, 1)]
    rows = pack(samples, 16, pad_id=2)   # rows of 17 tokens
    assert rows.tokens.shape == (4, 17)
    assert rows.doc_ids.tolist() == [[0] * 5 + [1] * 7 + [-1] * 5,     # 9 more do not fit: next row
                                     [2] * 9 + [-1] * 8,               # 17 do not fit after 9
                                     [3] * 17,                         # exactly one row
                                     [4] * 3 + [-1] * 14]
    for i, (ids, m) in enumerate(samples):  # each sample whole, in one row, with its own mask
        r, cols = np.nonzero(rows.doc_ids == i)
        assert len(set(r.tolist())) == 1
        assert rows.tokens[r, cols].tolist() == ids and rows.loss_mask[r, cols].tolist() == [bool(x) for x in m]
    pad = rows.doc_ids == -1
    assert (rows.tokens[pad] == 2).all() and not rows.loss_mask[pad].any()
    assert positions(rows.doc_ids)[0].tolist() == list(range(5)) + list(range(7)) + list(range(5))
    # the training batch: inputs [:-1], targets [1:] counted only where the target is an answer token
    b = rows.batch()
    assert b.tokens.shape == (4, 16) and b.doc_ids.tolist() == rows.doc_ids[:, :-1].tolist()
    assert b.loss_mask.tolist() == rows.loss_mask[:, 1:].tolist()
    assert (b.targets[~b.loss_mask] == IGNORE).all()
    assert b.targets[b.loss_mask].tolist() == rows.tokens[:, 1:][rows.loss_mask[:, 1:]].tolist()
    # no target crosses into the next sample: a target at a sample's first token never counts
    first = np.zeros_like(rows.loss_mask)
    first[:, 1:] = rows.doc_ids[:, 1:] != rows.doc_ids[:, :-1]
    assert not (b.loss_mask.numpy() & first[:, 1:]).any()


def test_pack_long_samples_truncated_or_refused():
    samples = [_sample(4, 10, 1), _sample(30, 100, 5), _sample(4, 20, 1)]
    rows = pack(samples, 9, pad_id=0, overflow="truncate")
    assert rows.doc_ids.tolist() == [[0] * 4 + [-1] * 6, [1] * 10, [2] * 4 + [-1] * 6]
    assert rows.tokens[1].tolist() == list(range(100, 110))
    with pytest.raises(LlamactlError, match=r"sample 1 \(sft.jsonl:2\) has 30 tokens.*--seq-len 9"):
        pack(samples, 9, pad_id=0, overflow="refuse", names=["sft.jsonl:1", "sft.jsonl:2", "sft.jsonl:3"])
    assert len(pack(samples[:1], 9, pad_id=0, overflow="refuse")) == 1
    with pytest.raises(ValueError):
        list(iter_packed(samples, 9, pad_id=0, overflow="drop"))


def test_no_prompt_token_ever_carries_loss_file_to_batch(tok, tmp_path):
    """End to end: file -> records -> encoded -> packed -> batch; the counted targets are the answers."""
    rows = [{"messages": DIALOG}, {"prompt": "Say hi", "response": "hi"},
            {"messages": [U("1+1?"), A("2"), U("and 2+2?"), A("4")]}, {"prompt": "Name a colour.", "response": "Blue."}]
    recs = list(read_sft(jsonl(tmp_path / "sft.jsonl", rows)))
    samples = [encode_sft(tok, r.messages) for r in recs]
    packed = pack(samples, 128, pad_id=tok.eos_id, overflow="refuse")
    assert len(packed) < len(samples)  # some rows hold several samples
    b = packed.batch()
    answers = [[m["content"].strip() + " " for m in r.messages if m["role"] == "assistant"] for r in recs]
    tgt_doc = packed.doc_ids[:, 1:]  # the sample each target token belongs to
    for i, want in enumerate(answers):
        counted = b.loss_mask.numpy() & (tgt_doc == i)
        got = [tok.decode(r) for row, m in zip(b.targets.numpy(), counted) for r in _runs(row, m, True)]
        assert got == want


def test_sft_batches_epochs_resume_and_dp():
    samples = [_sample(3 + (i * 7) % 11, 1000 * i, 2) for i in range(23)]
    src = SFTBatches(samples, 15, pad_id=0, micro_batch=2, accum=2, seed=5)
    assert src.truncated == 0 and SFTBatches(samples, 10, pad_id=0, micro_batch=1).truncated == \
        sum(len(ids) > 11 for ids, _ in samples) > 0
    rows0 = src.rows()
    seen = sorted(set(rows0.doc_ids[rows0.doc_ids >= 0].tolist()))
    assert seen == list(range(23))  # every sample once per epoch
    for i, (ids, _) in enumerate(samples):  # doc ids are the samples' own indices
        assert rows0.tokens[rows0.doc_ids == i].tolist() == ids
    steps = [src.next_step() for _ in range(6)]  # crosses into epoch 1
    assert src.epoch >= 1
    again = SFTBatches(samples, 15, pad_id=0, micro_batch=2, accum=2, seed=5)
    again_steps = [again.next_step() for _ in range(6)]
    assert all(a.tokens.equal(b.tokens) and a.doc_ids.equal(b.doc_ids) for s, t in zip(steps, again_steps)
               for a, b in zip(s, t))
    assert not SFTBatches(samples, 15, pad_id=0, micro_batch=2, accum=2, seed=6).next_step()[0].tokens.equal(
        steps[0][0].tokens)
    # exact resume from (seed, epoch, position)
    r = SFTBatches(samples, 15, pad_id=0, micro_batch=2, accum=2, seed=5)
    [r.next_step() for _ in range(3)]
    state = r.state_dict()
    r2 = SFTBatches(samples, 15, pad_id=0, micro_batch=2, accum=2, seed=5)
    r2.load_state_dict(state)
    for s in steps[3:]:
        assert all(a.tokens.equal(b.tokens) for a, b in zip(s, r2.next_step()))
    with pytest.raises(LlamactlError, match="--seed"):
        SFTBatches(samples, 15, pad_id=0, micro_batch=2, seed=1).load_state_dict(state)
    # data parallel: two ranks split each global step's rows and advance the same state
    whole = SFTBatches(samples, 15, pad_id=0, micro_batch=2, accum=1, dp=1, seed=5)
    ranks = [SFTBatches(samples, 15, pad_id=0, micro_batch=1, accum=1, dp=2, dp_rank=k, seed=5) for k in (0, 1)]
    for _ in range(8):
        w = whole.next_step()[0]
        parts = [rk.next_step()[0] for rk in ranks]
        assert w.tokens[:1].equal(parts[0].tokens) and w.tokens[1:].equal(parts[1].tokens)
    assert ranks[0].state_dict() == ranks[1].state_dict() == whole.state_dict()
    with pytest.raises(LlamactlError, match=r"sample 23 \(x:23\) has 40 tokens"):
        SFTBatches(samples + [_sample(40, 0, 1)], 15, pad_id=0, micro_batch=1, overflow="refuse",
                   names=[f"x:{i}" for i in range(24)])


def test_encode_pair_is_prompt_plus_each_answer(tok):
    from llamactl.sft_data import encode_pair

    pair = PreferencePair(DIALOG[:5] + [U("Thanks")], "You are welcome.", "Whatever.")
    c, r = encode_pair(tok, pair.prompt, pair.chosen, pair.rejected)
    assert c == encode_sft(tok, pair.dialog("chosen"))[0] and r == encode_sft(tok, pair.dialog("rejected"))[0]
    head = tok.encode("[INST] Thanks [/INST]", bos=True)
    k = len(c) - len(tok.encode("[INST] Thanks [/INST] You are welcome. ", bos=True, eos=True))
    assert c[:k] == r[:k] and c[k:k + len(head)] == head  # the same prompt, then each answer
    assert c[-1] == r[-1] == tok.eos_id and tok.decode(c[k + len(head):]) == "You are welcome. "


def test_responses_to_score(tmp_path):
    from llamactl.chat_data import ResponseItem

    p = jsonl(tmp_path / "r.jsonl", [{"prompt": "q", "response": "a", "id": 3},
                                     {"messages": DIALOG[:5] + [U("more")], "response": "b"}])
    items = load_records(p, "responses")
    assert [i.dialog() for i in items] == [[U("q"), A("a")], DIALOG[:5] + [U("more"), A("b")]]
    assert items[0].to_json() == {"prompt": "q", "response": "a", "id": 3} and isinstance(items[1], ResponseItem)
    bad = jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "response": "a"}, {"prompt": "q", "response": "  "}])
    with pytest.raises(LlamactlError, match=r"must not be empty \(.*bad.jsonl:2, field response, --data\)"):
        load_records(bad, "responses")
