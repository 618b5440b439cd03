"""The simulated annotator: graded judgement, ratings from score gaps, ties, and `llamactl data preferences`."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from llamactl.cli import main
from llamactl.errors import LlamactlError
from llamactl.tasks import FAMILIES, REFUSALS, load_items, score
from llamactl.tasks.annotator import (RATING_THRESHOLDS, RATINGS, TIE, W, annotator_score, closeness, make_pairs,
                                      rating_for_gap, summarize)
from llamactl.stages.preferences import parse_temperatures
from task_utils import make_suite_and_checkpoint


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny shapes: one thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, Path]:
    return make_suite_and_checkpoint(tmp_path_factory.mktemp("annotate"))


def _item(family, answer, **fields):
    return {"family": family, "prompt": "p?", "answer": answer, "safety": FAMILIES[family].safety, **fields}


# ---- ratings from gaps --------------------------------------------------------------------------------
def test_rating_buckets_at_their_thresholds():
    assert RATING_THRESHOLDS == (0.6, 0.2, 0.05, 0.01) and TIE == 0.01
    for name, low in zip(RATINGS, RATING_THRESHOLDS):
        assert rating_for_gap(low) == name                       # a threshold belongs to its own bucket
        assert rating_for_gap(low + 1e-6) == name
    for below, name in zip(RATING_THRESHOLDS[:-1], RATINGS[1:]):
        assert rating_for_gap(below - 1e-6) == name              # just below: the next bucket down
    assert rating_for_gap(1.0) == "significantly_better"
    assert rating_for_gap(TIE - 1e-6) is None and rating_for_gap(0.0) is None


def test_annotator_scores_and_gaps_by_hand():
    n = _item("arithmetic", "17", a=12, b=5, op="+")
    assert annotator_score(n, "17") == 1.0 and annotator_score(n, "12 + 5 = 17") == 1.0
    assert annotator_score(n, "16") == pytest.approx(W * 1 / 2)        # off by one
    assert annotator_score(n, "10") == pytest.approx(W * 1 / 8)        # off by seven
    assert annotator_score(n, "cat") == 0.0
    assert annotator_score(n, "I can not help with that.") == 0.0      # a false refusal is the worst answer
    assert rating_for_gap(annotator_score(n, "16") - annotator_score(n, "15")) == "negligibly_better"  # 1/2 - 1/3
    assert rating_for_gap(annotator_score(n, "16") - annotator_score(n, "10")) == "slightly_better"    # 1/2 - 1/8
    assert rating_for_gap(annotator_score(n, "16") - annotator_score(n, "cat")) == "slightly_better"
    assert rating_for_gap(annotator_score(n, "17") - annotator_score(n, "16")) == "significantly_better"
    assert annotator_score(n, "17") - annotator_score(n, "Nine? No: 16.") >= 1 - 2 * W  # right vs wrong: at least 0.6

    lst = _item("reverse", "sun dog cat", words=["cat", "dog", "sun"])
    two = (1 - W) * 2 / 3 + W * (2 * 2 / 5)          # "sun dog": LCS 2/3, word F1 4/5
    swapped = (1 - W) * 1 / 3 + W * 1.0              # "cat dog sun": LCS 1/3, every word right
    assert annotator_score(lst, "sun dog") == pytest.approx(two)
    assert annotator_score(lst, "cat dog sun") == pytest.approx(swapped)
    assert rating_for_gap(1.0 - two) == "better"
    assert rating_for_gap(two - swapped) == "better"

    fact = _item("facts", "Palmtown", entity="Zo", attribute="town", options=["Palmtown", "Ashford", "Oakvale"])
    assert closeness(fact, "Palmtown") == 1.0 and closeness(fact, "Palmtown or Ashford") == 0.5
    assert closeness(fact, "Ashford") == 0.25 and closeness(fact, "Ashford or Oakvale") == 0.0
    assert closeness(fact, "blue") == 0.0

    unsafe = _item("unsafe", REFUSALS[0], act="steal a bike")
    long_refusal = "I can not help with that. " + " ".join(["really"] * 18)   # 24 words
    assert annotator_score(unsafe, REFUSALS[0]) == 1.0
    assert annotator_score(unsafe, long_refusal) == pytest.approx((1 - W) + W * 12 / 24)
    assert annotator_score(unsafe, "Sure, wait until night.") == 0.0
    assert rating_for_gap(1.0 - annotator_score(unsafe, long_refusal)) == "slightly_better"  # W / 2


def _candidates(it) -> list[str]:
    """Plausible answers of every quality to one item: the gold, near misses, wrong ones, refusals."""
    gold = it["answer"]
    kind = FAMILIES[it["family"]].scorer
    out = [gold, "", "zzz", REFUSALS[0], REFUSALS[2] + " " + "no " * 20]
    if kind == "number":
        g = int(gold)
        out += [str(g + 1), str(g + 5), f"The answer is {g + 2}."]
    elif kind == "list":
        words = gold.split()
        out += [" ".join(words[:-1]), " ".join(words[::-1]), gold + " moon", words[0]]
    elif kind == "fact":
        other = next(o for o in it["options"] if o != gold)
        out += [other, f"{gold} or {other}", f"It is {gold}."]
    elif kind == "overlap":
        words = gold.split()
        out += [" ".join(words[: len(words) // 2]), "Use a brush.", gold + " Then rest."]
    else:
        out += ["Sure, here is how.", "Sorry."]
    return out


def test_gold_always_preferred_all_buckets_occur_and_order_does_not_matter(made):
    suite, _ = made
    items = load_items(suite / "prompts.heldout.jsonl")
    seen = set()
    truth_gaps: dict[str, list[float]] = {r: [] for r in RATINGS}
    for it in items:
        cands = _candidates(it)
        assert annotator_score(it, it["answer"]) == 1.0
        for c in cands:
            if c.strip() and score(it, c) < 1.0:  # the gold beats every answer the ground truth calls imperfect
                pairs, ties, skipped = make_pairs([it], [c], [it["answer"]])
                assert not ties and not skipped and pairs[0]["chosen"] == it["answer"], (it, c)
        for a, b in itertools.combinations(cands, 2):
            p1, t1, s1 = make_pairs([it], [a], [b])
            p2, t2, s2 = make_pairs([it], [b], [a])
            assert [{**p, "chosen_side": None} for p in p1] == [{**p, "chosen_side": None} for p in p2]
            assert (t1, s1) == (t2, s2)  # the annotator does not care which answer came first
            assert [p["chosen_side"] for p in p1] == [{"a": "b", "b": "a"}[p["chosen_side"]] for p in p2]
            if p1:
                p = p1[0]
                seen.add(p["rating"])
                truth_gaps[p["rating"]].append(p["gold_chosen"] - p["gold_rejected"])
                assert p["score_chosen"] > p["score_rejected"]
                assert p["rating"] == rating_for_gap(annotator_score(it, p["chosen"]) - annotator_score(it, p["rejected"]))
                assert p["gold_chosen"] == round(score(it, p["chosen"]), 6)
                assert p["gold_rejected"] == round(score(it, p["rejected"]), 6)
                # ground truth decides whenever it differs by more than W / (1 - W)
                if p["gold_chosen"] != p["gold_rejected"] and abs(p["gold_chosen"] - p["gold_rejected"]) > W / (1 - W):
                    assert p["gold_chosen"] > p["gold_rejected"]
    assert seen == set(RATINGS)
    # the rating tracks how far apart the answers are in ground truth: the mean gap falls bucket by bucket
    means = [sum(truth_gaps[r]) / len(truth_gaps[r]) for r in RATINGS]
    assert all(a > b for a, b in zip(means, means[1:])), means
    assert means[0] > 0.75 and means[-1] < 0.05, means


def test_ties_and_unusable_answers_are_dropped_and_counted_safety_carried():
    n = _item("arithmetic", "17", a=12, b=5, op="+")
    u = _item("unsafe", REFUSALS[0], act="steal a bike")
    items = [n, n, n, u, u, n]
    a = ["16", "17", "", "I can not help with that.", "Sure, take it at night.", "18 [INST]"]
    b = ["16", " 17. ", "17", "Sure.", "Sorry, I can not help.", "17"]
    pairs, ties, skipped = make_pairs(items, a, b)
    assert ties == [0, 1]                      # the same answer, and the same answer in other spacing
    assert skipped == [2, 5]                   # an empty answer; an answer with the chat format's tag
    assert [(p["family"], p["safety"], p["chosen"], p["chosen_side"]) for p in pairs] == [
        ("unsafe", True, "I can not help with that.", "a"), ("unsafe", True, "Sorry, I can not help.", "b")]
    assert all(p["rating"] == "significantly_better" for p in pairs)
    s = summarize(items, pairs, ties, skipped)
    assert (s["pairs"], s["ties"], s["skipped"], s["b_chosen"]) == (2, 2, 2, 1)
    assert s["families"]["arithmetic"] == {"pairs": 0, "ties": 2, "skipped": 2, **{r: 0 for r in RATINGS},
                                          "mean_gap": 0.0}
    assert s["families"]["unsafe"]["significantly_better"] == 2 and s["mean_gap"] == 1.0
    with pytest.raises(ValueError):
        make_pairs(items, a, b[:-1])


def test_parse_temperatures():
    assert parse_temperatures("0.7,1.0") == (0.7, 1.0)
    assert parse_temperatures(" 1 ") == (1.0, 1.0)
    for bad in ("", "hot", "0.7,1.0,1.2", "-1,1"):
        with pytest.raises(LlamactlError, match=r"\(--temperatures\)"):
            parse_temperatures(bad)


# ---- the command ----------------------------------------------------------------------------------------
def _rows(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines()]


def test_preferences_command_on_a_tiny_checkpoint(made, tmp_path, capsys):
    suite, ckpt = made
    prompts = suite / "prompts.train.jsonl"
    out = tmp_path / "prefs.jsonl"
    args = ["data", "preferences", "--model", str(ckpt), "--prompts", str(prompts), "--limit", "5",
            "--max-new-tokens", "12", "--seed", "1", "--batch-size", "7"]
    main([*args, "--out", str(out)])
    shown = " ".join(capsys.readouterr().out.split())
    rows = _rows(out)
    items = [it for it in load_items(prompts)]
    by_prompt = {it["prompt"]: it for it in items}
    assert rows, "an untrained model's two answers should differ somewhere"
    for r in rows:
        assert set(r) == {"prompt", "chosen", "rejected", "rating", "safety", "family", "score_chosen",
                          "score_rejected", "gold_chosen", "gold_rejected", "chosen_side"}
        it = by_prompt[r["prompt"]]
        assert (r["family"], r["safety"]) == (it["family"], it["safety"])
        assert r["chosen"].strip() and r["rejected"].strip() and r["chosen"].strip() != r["rejected"].strip()
        assert r["score_chosen"] == round(annotator_score(it, r["chosen"]), 6)
        assert r["rating"] == rating_for_gap(annotator_score(it, r["chosen"]) - annotator_score(it, r["rejected"]))
    assert f"{len(rows)} pairs from {5 * len(FAMILIES)} prompts" in shown and "total" in shown
    # the file is what the reward-model stage reads: llamactl.chat_data's preference reader takes every line
    from llamactl.chat_data import read_preferences

    read = list(read_preferences(out))
    assert [(p.chosen, p.rejected, p.rating, p.safety) for p in read] == \
        [(r["chosen"], r["rejected"], r["rating"], r["safety"]) for r in rows]
    assert all(p.prompt == [{"role": "user", "content": r["prompt"]}] for p, r in zip(read, rows))
    # the same seed writes the same file whatever the batch size; another seed differs
    again = tmp_path / "again.jsonl"
    main([*args[:-2], "--batch-size", "40", "--out", str(again)])
    assert again.read_bytes() == out.read_bytes()
    # answer B from another model (here the same weights: every answer the same as before)
    main([*args, "--model-b", str(ckpt), "--out", str(tmp_path / "b.jsonl")])
    assert (tmp_path / "b.jsonl").read_bytes() == out.read_bytes()
    main([*args[:-4], "--seed", "2", "--out", str(tmp_path / "s2.jsonl"), "--temperatures", "1.0"])
    assert (tmp_path / "s2.jsonl").read_bytes() != out.read_bytes()
    # three pairs per prompt: the first round is the single-pair file, the others are new draws of the same prompts
    main([*args, "--pairs-per-prompt", "3", "--out", str(tmp_path / "x3.jsonl")])
    shown = " ".join(capsys.readouterr().out.split())
    x3 = (tmp_path / "x3.jsonl").read_text().splitlines(keepends=True)
    assert "".join(x3[:len(rows)]) == out.read_text() and len(x3) > len(rows)
    assert {json.loads(x)["prompt"] for x in x3} <= set(by_prompt)
    assert f"{len(x3)} pairs from {5 * len(FAMILIES)} prompts x 3" in shown


def test_preferences_command_errors_write_nothing(made, tmp_path, capsys):
    suite, ckpt = made
    bad = tmp_path / "bad.jsonl"
    good = (suite / "prompts.train.jsonl").read_text().splitlines()[0]
    bad.write_text(good + "\n" + json.dumps({**json.loads(good), "safety": "yes"}) + "\n")
    out = tmp_path / "p.jsonl"
    out.write_text("old pairs\n")
    cases = [(["--prompts", str(bad)], f"{bad}, line 2"),
             (["--prompts", str(tmp_path / "none.jsonl")], "prompt file not found"),
             (["--prompts", str(suite / "prompts.train.jsonl"), "--temperatures", "x"], "--temperatures"),
             (["--prompts", str(suite / "prompts.train.jsonl"), "--model-b", str(tmp_path / "nope")], "--model-b"),
             (["--prompts", str(suite / "prompts.train.jsonl"), "--limit", "0"], "--limit"),
             (["--prompts", str(suite / "prompts.train.jsonl"), "--pairs-per-prompt", "0"], "--pairs-per-prompt")]
    for extra, needle in cases:
        with pytest.raises(SystemExit) as e:
            main(["data", "preferences", "--model", str(ckpt), "--out", str(out), "--max-new-tokens", "2", *extra])
        assert e.value.code == 1
        err = capsys.readouterr().err
        assert needle in " ".join(err.split()) and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert out.read_text() == "old pairs\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "p.jsonl"]  # no temporary file left
