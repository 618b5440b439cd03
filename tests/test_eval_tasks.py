"""`llamactl eval tasks`: what it reports is score_responses of the answers it got, per family and overall."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamactl.cli import main
from llamactl.errors import LlamactlError
from llamactl.stages.answers import RAW_TEMPLATE, answer_items, clean_answer, encode_items
from llamactl.stages.eval_tasks import evaluate, limit_per_family, result_rows
from llamactl.tasks import FAMILIES, REFUSALS, score_responses, suite_items
from task_utils import make_suite_and_checkpoint


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny shapes: one thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, Path]:
    return make_suite_and_checkpoint(tmp_path_factory.mktemp("eval_tasks"), seed=1)


@pytest.fixture(scope="module")
def items(made):
    return suite_items(made[0])


def _fake(answer_of):
    """An answer function that never touches a model; records what it was asked."""
    calls = []

    def answer(its, n, t):
        calls.append((len(its), n, t))
        return [[answer_of(it, k) for k in range(n)] for it in its]
    answer.calls = calls
    return answer


# ---- scoring without a model ----------------------------------------------------------------------------
def test_gold_answers_score_one_per_family_and_overall(items):
    fake = _fake(lambda it, k: it["answer"])
    r = evaluate(items, fake, samples=3, temperature=0.8)
    assert fake.calls == [(len(items), 1, 0.0), (len(items), 3, 0.8)]  # greedy is temperature 0, then N at T
    assert list(r["families"]) == list(FAMILIES)
    assert all(f["greedy"] == f["sampled"] == 1.0 for f in r["families"].values())
    assert r["overall"] == {"prompts": len(items), "greedy": 1.0, "sampled": 1.0}
    assert all(r["families"][f]["prompts"] == sum(it["family"] == f for it in items) for f in FAMILIES)
    assert r["families"]["unsafe"]["safety"] is True and r["families"]["copy"]["safety"] is False


def test_reported_numbers_are_score_responses_of_the_answers(items):
    # greedy: the gold on even items, a refusal on odd ones; samples: gold, then garbage, then a refusal
    greedy = lambda it, i: it["answer"] if i % 2 == 0 else REFUSALS[1]  # noqa: E731
    index = {id(it): i for i, it in enumerate(items)}
    choices = lambda it, k: [it["answer"], "zzz", REFUSALS[0]][k]  # noqa: E731

    def answer(its, n, t):
        if t == 0:
            return [[greedy(it, index[id(it)])] for it in its]
        return [[choices(it, k) for k in range(n)] for it in its]

    r = evaluate(items, answer, samples=3, temperature=1.0)
    want_g = score_responses(items, [greedy(it, i) for i, it in enumerate(items)])
    want_s = score_responses([it for it in items for _ in range(3)], [choices(it, k) for it in items for k in range(3)])
    for f in FAMILIES:
        assert r["families"][f]["greedy"] == want_g[f] and r["families"][f]["sampled"] == want_s[f]
    assert r["overall"]["greedy"] == pytest.approx(sum(want_g.values()) / len(want_g))
    assert r["overall"]["sampled"] == pytest.approx(sum(want_s.values()) / len(want_s))
    assert 0 < r["overall"]["greedy"] < 1 and r["families"]["unsafe"]["sampled"] == pytest.approx(2 / 3)
    assert [row["greedy_score"] for row in r["items"][:2]] == [1.0, 1.0 if items[1]["safety"] else 0.0]
    cols, rows = result_rows(r)
    assert cols[-1] == "sampled (3 @ T 1)" and rows[-1][0] == "overall" and len(rows) == len(FAMILIES) + 1


def test_greedy_only_limit_and_errors(items):
    fake = _fake(lambda it, k: "zzz")
    r = evaluate(items, fake, samples=0)
    assert fake.calls == [(len(items), 1, 0.0)] and r["overall"]["sampled"] is None and r["overall"]["greedy"] == 0.0
    assert len(result_rows(r)[0]) == 4
    with pytest.raises(LlamactlError, match="--temperature > 0"):
        evaluate(items, fake, samples=2, temperature=0.0)
    with pytest.raises(LlamactlError, match="--samples"):
        evaluate(items, fake, samples=-1)
    two = limit_per_family(items, 2)
    assert [it["family"] for it in two] == [f for f in FAMILIES for _ in range(2)]
    assert two == [it for f in FAMILIES for it in [x for x in items if x["family"] == f][:2]]
    assert limit_per_family(items, None) == items
    with pytest.raises(LlamactlError, match="--limit"):
        limit_per_family(items, 0)


def test_raw_prompts_and_answer_cleaning(made, items):
    from llamactl.tokenizer import Tokenizer

    tok = Tokenizer.load(made[1] / "tokenizer.model")
    raw = encode_items(tok, items[:2], raw=True)
    assert raw[0] == tok.encode(RAW_TEMPLATE.format(prompt=items[0]["prompt"]), bos=True)
    assert encode_items(tok, items[:1], raw=False)[0] != raw[0]
    assert clean_answer(" 17\nQuestion: what", raw=True) == "17"
    assert clean_answer("17 Question: What is 2 + 2? Answer: 4", raw=True) == "17"
    assert clean_answer(" 17\nmore ", raw=False) == "17\nmore"
    assert clean_answer("ball hat The words bread apple copied are ball hat.", raw=True) == "ball hat"
    assert clean_answer("5 The list apple moon has 1 word.", raw=True) == "5"
    assert clean_answer("Sorry, I can not help with that. I", raw=True) == "Sorry, I can not help with that."
    for it in items:  # no gold answer is cut
        assert clean_answer(it["answer"] + " The words sun are sun.", raw=True) == it["answer"], it
    assert clean_answer("Use soap and warm water. If you add 2 and 3, you get 5.", raw=True) == "Use soap and warm water."
    assert clean_answer("I will not help with that, it could hurt someone. The", raw=True) == \
        "I will not help with that, it could hurt someone."


# ---- the command on a tiny checkpoint ----------------------------------------------------------------------
def test_eval_tasks_command(made, tmp_path, capsys):
    from llamactl.generation import load_for_generation

    suite, ckpt = made
    out = tmp_path / "r" / "eval.json"
    main(["eval", "tasks", "--model", str(ckpt), "--suite", str(suite), "--limit", "2", "--samples", "2",
          "--temperature", "1.0", "--max-new-tokens", "8", "--out", str(out)])
    shown = " ".join(capsys.readouterr().out.split())
    r = json.loads(out.read_text())
    items = limit_per_family(suite_items(suite), 2)
    assert [row["prompt"] for row in r["items"]] == [it["prompt"] for it in items]
    # what it reports is score_responses of its own answers, and the greedy answers are generate's
    g = score_responses(items, [row["greedy"] for row in r["items"]])
    assert {f: v["greedy"] for f, v in r["families"].items()} == g
    model, tok = load_for_generation(ckpt, "cpu")
    assert [row["greedy"] for row in r["items"]] == [a[0] for a in answer_items(model, tok, items, max_new_tokens=8)]
    assert (r["samples"], r["temperature"], r["split"], r["max_new_tokens"]) == (2, 1.0, "heldout", 8)
    assert all(0.0 <= v["sampled"] <= 1.0 for v in r["families"].values())
    assert "overall" in shown and all(f in shown for f in FAMILIES)
    # --raw and greedy only; the train split
    main(["eval", "tasks", "--model", str(ckpt), "--suite", str(suite), "--limit", "1", "--samples", "0",
          "--max-new-tokens", "4", "--raw", "--split", "train"])
    assert "raw" in capsys.readouterr().out
    # `llamactl eval` without a subcommand is still the loss evaluation
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(ckpt), "--data", str(tmp_path / "none")])
    assert e.value.code == 1 and "--data" in capsys.readouterr().err


def test_eval_tasks_errors_write_nothing(made, tmp_path, capsys):
    suite, ckpt = made
    out = tmp_path / "eval.json"
    cases = [(["--suite", str(tmp_path)], "not a task suite"), (["--suite", str(suite), "--split", "test"], "--split"),
             (["--suite", str(suite), "--samples", "2", "--temperature", "0"], "--temperature"),
             (["--suite", str(suite), "--limit", "0"], "--limit"),
             (["--suite", str(suite), "--max-new-tokens", "0"], "--max-new-tokens")]
    for extra, needle in cases:
        with pytest.raises(SystemExit) as e:
            main(["eval", "tasks", "--model", str(ckpt), "--out", str(out), *extra])
        assert e.value.code == 1
        err = capsys.readouterr().err
        assert needle in " ".join(err.split()) and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []
