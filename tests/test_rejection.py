"""`llamactl rlhf rs` (stages/rejection.py, rs_pool.py): the pool keeps the best answer across iterations,
Figure 7's best-of-N arithmetic against a hand case, and two iterations end to end through the CLI with a
rerun that reuses the samples, wrong reward models refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


def _cand(key, reward, response="a", temp=1.0):
    from llamactl.rs_pool import Candidate

    return Candidate(key, [{"role": "user", "content": f"q{key}"}], key == "s", response, reward, reward + 0.01,
                     reward - 0.01, temp, {"family": "x"})


def test_pool_keeps_the_best_across_iterations(tmp_path):
    from llamactl.rs_pool import Pool

    pool = Pool.load(tmp_path / "pool")
    assert pool.entries == {} and pool.next_iteration() == 1
    c1 = pool.merge([_cand("a", 0.3, "a1"), _cand("a", 0.6, "a2"), _cand("a", 0.6, "a3"), _cand("b", 0.8, "b1")], 1)
    assert c1 == {"added": 2, "replaced": 0, "kept": 0}
    assert pool.entries["a"]["response"] == "a2"  # the best of the iteration; the first of equals
    pool.record(1, "run1", {"x": 1})
    pool.save()
    pool = Pool.load(tmp_path / "pool")
    assert pool.next_iteration() == 2
    # iteration 2: a improves, b only gets worse answers, c is new; an equal reward does not replace
    c2 = pool.merge([_cand("a", 0.7, "a4"), _cand("b", 0.5, "b2"), _cand("b", 0.8, "b3"), _cand("c", 0.1, "c1")], 2)
    assert c2 == {"added": 1, "replaced": 1, "kept": 1}
    got = {k: (e["response"], e["reward"], e["iteration"]) for k, e in pool.entries.items()}
    assert got == {"a": ("a4", 0.7, 2), "b": ("b1", 0.8, 1), "c": ("c1", 0.1, 2)}
    before = json.dumps(pool.entries, sort_keys=True)
    assert pool.merge([_cand("a", 0.7, "a9"), _cand("c", 0.05)], 2) == {"added": 0, "replaced": 0, "kept": 2}
    assert json.dumps(pool.entries, sort_keys=True) == before  # merging again changes nothing
    assert pool.mean_reward == pytest.approx((0.7 + 0.8 + 0.1) / 3)
    rows = pool.sft_rows()
    assert [r["messages"][-1] for r in rows] == [{"role": "assistant", "content": x} for x in ("a4", "b1", "c1")]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "pool.json").write_text('{"entries": 3}')
    from llamactl.errors import LlamactlError

    with pytest.raises(LlamactlError, match="not a rejection-sampling pool"):
        Pool.load(tmp_path / "bad")


def _merge_slowly(directory: str, key: str, hold: float, started, log: str) -> None:
    """One run's merge: read the pool, hold it for `hold` seconds, add `key`, write it (under the lock)."""
    import time

    from llamactl.rs_pool import Pool, locked

    def note(msg):
        Path(log).write_text(msg)

    started.set()
    with locked(directory, notify=note):
        pool = Pool.load(directory)
        time.sleep(hold)
        pool.merge([_cand(key, 0.5)], 1)
        pool.save()


def test_two_runs_merging_into_one_pool_keep_both(tmp_path):
    """Without the lock both runs read the empty pool and the second write loses the first run's entry."""
    import multiprocessing as mp

    from llamactl.rs_pool import LOCK_FILE, Pool

    ctx = mp.get_context("fork")
    first, second = ctx.Event(), ctx.Event()
    logs = [tmp_path / "log1", tmp_path / "log2"]
    p1 = ctx.Process(target=_merge_slowly, args=(str(tmp_path / "pool"), "a", 0.8, first, str(logs[0])))
    p1.start()
    assert first.wait(10)
    import time

    time.sleep(0.3)  # p1 holds the lock and has read the empty pool
    p2 = ctx.Process(target=_merge_slowly, args=(str(tmp_path / "pool"), "b", 0.0, second, str(logs[1])))
    p2.start()
    p1.join(20)
    p2.join(20)
    assert p1.exitcode == 0 and p2.exitcode == 0
    assert sorted(Pool.load(tmp_path / "pool").entries) == ["a", "b"]
    assert "waiting for another rejection-sampling run" in logs[1].read_text() and not logs[0].exists()
    assert (tmp_path / "pool" / LOCK_FILE).exists()


def test_best_of_n_against_a_hand_case():
    from llamactl.rs_pool import best_of_n

    mx, md = best_of_n([[0.1, 0.5, 0.3, 0.9], [0.4, 0.2, 0.8, 0.6]])
    # N=1: both the first; N=2: max (0.5, 0.4), median (0.3, 0.3); N=3: max (0.5, 0.8), median (0.3, 0.4);
    # N=4: max (0.9, 0.8), median (0.4, 0.5)
    assert mx == pytest.approx([0.25, 0.45, 0.65, 0.85])
    assert md == pytest.approx([0.25, 0.30, 0.35, 0.45])
    with pytest.raises(ValueError):
        best_of_n([])


def test_prompt_key_and_temperatures():
    from llamactl.errors import LlamactlError
    from llamactl.rs_pool import prompt_key
    from llamactl.stages.rejection import parse_temperatures

    a = [{"role": "user", "content": "Hi"}]
    assert prompt_key(a) == prompt_key([dict(a[0])]) != prompt_key([{"role": "user", "content": "Hi!"}])
    assert parse_temperatures("0.7, 1.2") == [0.7, 1.2]
    for bad in ("", "x", "0", "1,1", "-1"):
        with pytest.raises(LlamactlError, match="--temperature"):
            parse_temperatures(bad)
    # rs takes the greedy answer as one more candidate (T 0), next to at least one sampling temperature
    assert parse_temperatures("0,0.7", greedy=True) == [0.0, 0.7]
    for bad in ("0", "0,0", "-1,1"):
        with pytest.raises(LlamactlError, match="one > 0"):
            parse_temperatures(bad, greedy=True)


def test_greedy_candidate_is_the_greedy_answer(made):
    """At T 0 the K candidates are the policy's greedy answer (decoded once); T > 0 answers still vary."""
    from llamactl.chat_data import read_prompts
    from llamactl.generation import encode_prompt, generate, load_for_generation
    from llamactl.stages.answers import clean_answer
    from llamactl.stages.rejection import sample_answers

    model, tok = load_for_generation(made["policy"], "cpu")
    items = list(read_prompts(made["prompts"]))[:3]
    got = sample_answers(model, tok, items, [0.0, 1.3], k=3, top_p=1.0, max_new_tokens=6, seed=0, iteration=1)
    for it, (greedy, sampled) in zip(items, got):
        ids = encode_prompt(tok, {"dialog": it.messages}, raw=False, system=None)
        s = generate(model, [ids], max_new_tokens=6, temperature=0.0, eos_id=tok.eos_id)[0]
        want = clean_answer(tok.decode(s.tokens[:-1] if s.finish_reason == "stop" else s.tokens), raw=False)
        assert greedy == [want] * 3 and len(sampled) == 3
    assert any(len(set(sampled)) > 1 for _, sampled in got)


# ---- end to end -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny policy on the small suite's tokenizer and two reward models (seeded random weights)."""
    from task_utils import make_suite_and_checkpoint

    from llamactl import checkpoint
    from llamactl.checkpoint import load_config, tokenizer_path
    from llamactl.model import build_model

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("rs")
    suite, policy = make_suite_and_checkpoint(root)
    cfg, _ = load_config(policy)
    rms = {}
    for kind, seed, scale in (("helpfulness", 1, 40.0), ("safety", 2, -40.0)):
        m = build_model(cfg, head="reward", seed=seed)
        with torch.no_grad():
            m.score.weight.mul_(scale)  # scores of several units: rewards differ between samples
        rms[kind] = checkpoint.save(root / f"rm-{kind}", m, tokenizer=tokenizer_path(policy), stage="reward",
                                    extra={"rm_kind": kind})
    lines = [json.loads(x) for x in (suite / "prompts.train.jsonl").read_text().splitlines()]
    fams = {}
    for r in lines:
        fams.setdefault(r["family"], r)
    prompts = root / "prompts.jsonl"
    picked = list(fams.values())[:5] + [r for r in lines if r["safety"]][:1]  # five families and a safety prompt
    prompts.write_text("".join(json.dumps(r) + "\n" for r in picked))
    yield {"root": root, "policy": policy, "h": rms["helpfulness"], "s": rms["safety"], "prompts": prompts}
    torch.set_num_threads(n)


def _run(*args) -> int:
    from llamactl.cli import main

    try:
        main(list(map(str, args)))
    except SystemExit as e:
        return e.code
    return 0


def _rs(made, out, policy, *extra):
    return _run("rlhf", "rs", "--policy", policy, "--rm-helpful", made["h"], "--rm-safety", made["s"],
                "--prompts", made["prompts"], "--out", out, "--k", 3, "--temperature", "0.8,1.3",
                "--max-new-tokens", 6, "--steps", 2, "--batch-size", 2, "--micro-batch", 1, "--seq-len", 48,
                "--lr", 1e-3, "--save-dtype", "float32", "--device", "cpu", *extra)


def test_two_iterations_end_to_end(made, monkeypatch, capsys):
    from llamactl.checkpoint import latest
    from llamactl.rewards import RewardModels

    root = made["root"]
    run1, run2, pool = root / "it1", root / "it2", root / "it1" / "pool"
    assert _rs(made, run1, made["policy"]) == 0
    out = capsys.readouterr().out
    assert "Figure 7" in out and "Figure 8" in out
    assert (run1 / "rs_best_of_n.png").is_file() and (run1 / "rs_temperature.png").is_file()
    rs = json.loads((run1 / "rs.json").read_text())
    (it,) = rs["iterations"]
    assert it["iteration"] == 1 and it["k"] == 3 and it["n"] == [1, 2, 3] and set(it["temperatures"]) == {"0.8", "1.3"}
    samples = json.loads((run1 / "samples.json").read_text())
    recs = samples["records"]
    assert len(recs) == 6 and all(len(r["samples"]) == 2 and all(len(t) == 3 for t in r["samples"]) for r in recs)
    # the figures are the samples' arithmetic: max / median at T 0.8, mean per temperature
    first = [[s["reward"] for s in r["samples"][0]] for r in recs]
    assert it["max"][-1] == pytest.approx(sum(max(x) for x in first) / 6)
    assert it["median"][-1] == pytest.approx(sum(sorted(x)[1] for x in first) / 6)
    assert it["temperatures"]["1.3"] == pytest.approx(sum(s["reward"] for r in recs for s in r["samples"][1]) / 18)
    assert all(a <= b + 1e-12 for a, b in zip(it["max"], it["max"][1:])) and it["max"][0] == pytest.approx(it["median"][0])
    # the rewards are R_c of the reward models on the same text
    rms = RewardModels.load(made["h"], made["s"])
    flat = [(r, s) for r in recs for per in r["samples"] for s in per if s["usable"]]
    assert len(flat) > 20
    want = rms.score([r["messages"] for r, _ in flat], [s["response"] for _, s in flat], [r["safety"] for r, _ in flat])
    assert [s["reward"] for _, s in flat] == pytest.approx(want.combined.tolist(), rel=1e-6)
    assert any(r["safety"] for r, _ in flat) and not all(r["safety"] for r, _ in flat)
    # the pool holds each prompt's best usable sample; SFT ran on it
    p1 = json.loads((pool / "pool.json").read_text())["entries"]
    for r in recs:
        best = max((s["reward"] for per in r["samples"] for s in per if s["usable"]), default=None)
        assert (r["key"] in p1) == (best is not None)
        if best is not None:
            assert p1[r["key"]]["reward"] == best and p1[r["key"]]["iteration"] == 1
    assert it["pool_size"] == len(p1) == len((run1 / "sft_data.jsonl").read_text().splitlines())
    ck1 = latest(run1 / "sft")
    assert ck1 is not None and ck1.name == "step-000002"
    meta1 = json.loads((ck1 / "llamactl.json").read_text())
    assert meta1["extra"]["data"] == str(run1 / "sft_data.jsonl") and meta1["stage"] == "rs"

    # iteration 2 from the fine-tuned policy into the same pool: entries only ever improve
    # (and without matplotlib: tables only, the hint printed once)
    from llamactl import plots

    monkeypatch.setattr(plots, "available", lambda: False)
    assert _rs(made, run2, run1 / "sft", "--pool", pool, "--seed", 1) == 0
    out = capsys.readouterr().out
    assert out.count(plots.MISSING) == 1 and "Figure 7" in out and not list(run2.glob("*.png"))
    p2 = json.loads((pool / "pool.json").read_text())["entries"]
    assert set(p1) <= set(p2)
    for key, e in p1.items():
        assert p2[key]["reward"] >= e["reward"]
        if p2[key]["iteration"] == 1:
            assert p2[key] == e
    rs2 = json.loads((run2 / "rs.json").read_text())
    assert [x["iteration"] for x in rs2["iterations"]] == [1, 2]
    # a rerun with --resume after a crash in the SFT (its last checkpoint lost) reuses the samples (sampling
    # would fail here) and continues the SFT from its checkpoint
    import shutil

    import llamactl.stages.rejection as rej

    assert sorted(p.name for p in (run2 / "sft").glob("step-*")) == ["step-000001", "step-000002"]
    shutil.rmtree(run2 / "sft" / "step-000002")
    mtime = (run2 / "samples.json").stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("sampled again")

    monkeypatch.setattr(rej, "sample_and_score", boom)
    assert _rs(made, run2, run1 / "sft", "--pool", pool, "--seed", 1, "--resume") == 0
    assert (run2 / "samples.json").stat().st_mtime_ns == mtime and latest(run2 / "sft").name == "step-000002"
    assert "resuming from" in capsys.readouterr().err  # the SFT continued from its step-1 checkpoint
    assert json.loads((pool / "pool.json").read_text())["entries"] == p2
    assert json.loads((run2 / "rs.json").read_text()) == rs2
    # other settings in the same run dir are refused, naming what differs
    capsys.readouterr()
    assert _rs(made, run2, run1 / "sft", "--pool", pool, "--seed", 2) == 1
    assert "seed differ" in capsys.readouterr().err


def test_wrong_reward_models_and_dry_run(made, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["rlhf", "rs", "--policy", made["policy"], "--prompts", made["prompts"], "--out", out]
    assert _run(*base, "--rm-helpful", made["s"], "--rm-safety", made["s"]) == 1
    assert "--rm-helpful needs a helpfulness reward model, got a safety reward model" in capsys.readouterr().err
    assert _run(*base, "--rm-helpful", made["h"], "--rm-safety", made["policy"]) == 1
    assert "not a reward model" in capsys.readouterr().err
    assert _run(*base, "--rm-helpful", made["h"], "--rm-safety", made["s"], "--temperature", "0") == 1
    assert "--temperature" in capsys.readouterr().err
    assert _run(*base, "--rm-helpful", made["h"], "--rm-safety", made["s"], "--lr", "-1") == 1
    assert not out.exists()
    assert _run(*base, "--rm-helpful", made["h"], "--rm-safety", made["s"], "--k", 4, "--dry-run") == 0
    assert "rejection sampling plan" in capsys.readouterr().out and not out.exists()
