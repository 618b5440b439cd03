"""Reward models (stages/reward.py, stages/reward_eval.py): margins, the pair loss, the score position under
padding, bucket arithmetic, the mix, bad data, training at TP / PP / DP against one process, exact resume,
Hugging Face export, and the three `rm` commands end to end."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dist_utils import spawn

VOCAB = 256


def _cfg(**kw):
    from llamactl.config import preset

    return preset("tiny", dim=64, n_layers=2, vocab_size=VOCAB, max_seq_len=64, **kw)


def _pairs(n: int, seed: int = 0, ratings=True):
    """Random token pairs of uneven lengths (ids >= 3: no BOS/EOS/pad 0 among them)."""
    from llamactl.chat_data import RATINGS
    from llamactl.stages.reward import EncodedPair, MARGINS

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        lc, lr = (int(x) for x in torch.randint(3, 21, (2,), generator=g))
        b = i % 4 if ratings else -1
        out.append(EncodedPair(torch.randint(3, VOCAB, (lc,), generator=g).tolist(),
                               torch.randint(3, VOCAB, (lr,), generator=g).tolist(),
                               MARGINS["small"][b] if b >= 0 else 0.0, b, f"f:{i + 1}"))
    assert RATINGS
    return out


# ---- margins, loss, buckets ----------------------------------------------------------------------
def test_margin_sets_are_table_27():
    from llamactl.errors import LlamactlError
    from llamactl.stages.reward import margin

    ratings = ["significantly_better", "better", "slightly_better", "negligibly_better"]
    assert [margin(r, "small") for r in ratings] == [1.0, 2 / 3, 1 / 3, 0.0]
    assert [margin(r, "large") for r in ratings] == [3.0, 2.0, 1.0, 0.0]
    assert [margin(r, "none") for r in ratings] == [0.0] * 4
    assert margin(None, "large") == 0.0
    with pytest.raises(LlamactlError, match="--margin"):
        margin("better", "huge")


def test_loss_and_metrics_against_a_hand_computation():
    from llamactl.stages.reward import RewardBatch, reward_loss

    pairs = _pairs(3)
    batch = RewardBatch.from_pairs(pairs)
    out = torch.randn(6, batch.tokens.shape[1], generator=torch.Generator().manual_seed(3))
    loss, m = reward_loss(out, batch)
    want, right, gap = 0.0, 0, 0.0
    for i, p in enumerate(pairs):
        rc, rr = out[i, len(p.chosen) - 1].item(), out[3 + i, len(p.rejected) - 1].item()
        want += -math.log(1.0 / (1.0 + math.exp(-(rc - rr - p.margin))))
        right += rc > rr
        gap += rc - rr
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert m["accuracy"].item() == right and m["score_gap"].item() == pytest.approx(gap, rel=1e-6)
    assert batch.num_valid == 3 and batch.num_tokens == sum(len(p.chosen) + len(p.rejected) for p in pairs)
    # softplus form: a huge gap neither overflows nor loses the value
    from llamactl.stages.reward import pair_loss

    big = pair_loss(torch.tensor([-200.0]), torch.tensor([0.0]), torch.tensor([1.0]))
    assert big.item() == pytest.approx(201.0)


def test_bucket_accuracy_and_detector_arithmetic():
    from llamactl.stages.reward_eval import bucket_accuracy, detector, sigmoid

    rc = [2.0, 1.0, 0.0, 0.5, 1.0, -1.0]
    rr = [1.0, 2.0, 0.0, 0.0, 0.0, 0.0]
    rt = ["significantly_better", "significantly_better", "better", "slightly_better", None, "negligibly_better"]
    r = bucket_accuracy(rc, rr, rt)
    assert r["buckets"]["significantly_better"] == {"pairs": 2, "accuracy": 0.5}
    assert r["buckets"]["better"] == {"pairs": 1, "accuracy": 0.0}  # a tie is wrong
    assert r["buckets"]["slightly_better"] == {"pairs": 1, "accuracy": 1.0}
    assert r["buckets"]["negligibly_better"] == {"pairs": 1, "accuracy": 0.0}
    assert r["accuracy"] == pytest.approx(3 / 6) and r["unrated"] == 1
    assert r["mean_margin"] == pytest.approx((1 - 1 + 0 + 0.5 + 1 - 1) / 6)
    scores = [-3.0, -1.0, -2.0, 2.0]  # sigmoid: 0.047, 0.27, 0.12, 0.88
    d = detector(scores, [True, True, False, False])
    assert (d["flagged"], d["unsafe"]) == (2, 2)
    assert d["precision"] == pytest.approx(0.5) and d["recall"] == pytest.approx(0.5)
    assert sigmoid(-800.0) == 0.0 and sigmoid(800.0) == 1.0


def test_mix_counts_cycling_and_bad_specs():
    from llamactl.errors import LlamactlError
    from llamactl.stages.reward import epoch_order, parse_mix

    mix = parse_mix("a.jsonl:9,b.jsonl:1")
    assert [(str(p), w) for p, w in mix] == [("a.jsonl", 0.9), ("b.jsonl", 0.1)]
    order = epoch_order([30, 70], [0.9, 0.1], seed=0, epoch=0)  # 100 pairs: 90 from a (cycled), 10 from b
    assert len(order) == 100 and sum(s == 0 for s, _ in order) == 90
    a = [i for s, i in order if s == 0]
    assert set(a) == set(range(30)) and max(a.count(i) for i in range(30)) == 3
    assert len({i for s, i in order if s == 1}) == 10  # b's share drawn without repeats
    assert epoch_order([30, 70], [0.9, 0.1], 0, 0) == order != epoch_order([30, 70], [0.9, 0.1], 0, 1)
    for bad in ("a.jsonl", "a.jsonl:0", "a.jsonl:x", ":0.5", ""):
        with pytest.raises(LlamactlError, match=r"--mix\)$"):
            parse_mix(bad)


# ---- the score position under padding ------------------------------------------------------------
def test_score_is_the_last_token_with_left_right_or_no_padding(one_thread):
    from llamactl.model import build_model
    from llamactl.scoring import sequence_scores
    from llamactl.stages.reward import RewardBatch, reward_loss

    model = build_model(_cfg(), head="reward", seed=1)
    pairs = _pairs(4, seed=5)
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    alone = torch.stack([model(torch.tensor([s]))[0, -1] for s in seqs])
    t = max(map(len, seqs))
    right = torch.zeros(len(seqs), t, dtype=torch.long)
    left = torch.zeros(len(seqs), t, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.bool)
    for i, s in enumerate(seqs):
        right[i, :len(s)] = torch.tensor(s)
        left[i, t - len(s):] = torch.tensor(s)
        mask[i, t - len(s):] = True
    lengths = torch.tensor([len(s) for s in seqs])
    torch.testing.assert_close(sequence_scores(model, right, lengths), alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sequence_scores(model, left, mask), alone, rtol=1e-5, atol=1e-6)
    batch = RewardBatch.from_pairs(pairs)
    assert torch.equal(batch.tokens, right) and torch.equal(batch.lengths, lengths)
    loss, _ = reward_loss(model(batch.tokens), batch)
    n = len(pairs)
    from llamactl.stages.reward import pair_loss

    want = pair_loss(alone[:n], alone[n:], batch.margins).sum()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


# ---- bad data ------------------------------------------------------------------------------------
def test_bad_data_is_one_line_naming_file_line_field(tmp_path, tiny_tokenizer):
    from llamactl.chat_data import load_records
    from llamactl.errors import LlamactlError
    from llamactl.stages.reward import encode_pairs
    from llamactl.tokenizer import Tokenizer

    good = {"prompt": "Add 2 and 3.", "chosen": "5", "rejected": "7", "rating": "better"}
    cases = [({**good, "rating": "great"}, "field rating"), ({**good, "chosen": 5}, "field chosen"),
             ({k: v for k, v in good.items() if k != "rejected"}, "field rejected"),
             ({**good, "safety": "yes"}, "field safety"), ({**good, "rejected": "5"}, "field rejected")]
    for obj, field in cases:
        f = tmp_path / "p.jsonl"
        f.write_text(json.dumps(good) + "\n" + json.dumps(obj) + "\n")
        with pytest.raises(LlamactlError) as e:
            load_records(f, "preferences", "--data")
        msg = str(e.value)
        assert "\n" not in msg and f"{f}:2" in msg and field in msg and "--data" in msg, msg
    tok = Tokenizer.load(tiny_tokenizer)
    f = tmp_path / "long.jsonl"
    f.write_text(json.dumps(good) + "\n" + json.dumps({**good, "chosen": "word " * 80}) + "\n")
    with pytest.raises(LlamactlError, match=rf"more than the model's context of 64 \({f}:2, --data\)"):
        encode_pairs(tok, load_records(f, "preferences"), "small", 64)


# ---- training at every layout equals one process -------------------------------------------------
STEPS, BATCH, MICRO = 3, 8, 2


def _train(ctx, run_dir, steps=STEPS, stop_at=None, resume=False):
    from llamactl.model import build_model
    from llamactl.stages.reward import PairBatches, reward_loss
    from llamactl.trainer import TrainConfig, fit

    model = build_model(_cfg(), ctx, head="reward", seed=0)
    batches = PairBatches([_pairs(12, 1), _pairs(7, 2)], [0.75, 0.25], micro_batch=MICRO,
                          accum=BATCH // (MICRO * ctx.dp), dp=ctx.dp, dp_rank=ctx.dp_rank, seed=3)
    cfg = TrainConfig(steps=steps, lr=3e-3, warmup=1, clip=1.0, bucket_mb=0.01, save_dtype="float32")
    cbs = [lambda tr, row: row["step"] == stop_at] if stop_at else []
    fit(model, ctx, cfg, batches, run_dir=run_dir, loss_fn=reward_loss, resume=resume, show_progress=False,
        callbacks=cbs, stage="reward")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["grad_norm"], r["accuracy"]) for r in rows], model


def _layouts(rank, world, root):
    import torch.distributed as dist

    from llamactl.parallel.context import ParallelContext

    ref, _ = _train(ParallelContext.single(), Path(root) / f"ref{rank}")
    assert len(ref) == STEPS and len({r[0] for r in ref}) == STEPS
    for tp, pp in ((2, 1), (1, 2), (1, 1)):
        ctx = ParallelContext.from_world(tp, pp)
        tag = f"tp{ctx.tp} pp{ctx.pp} dp{ctx.dp}"
        got, _ = _train(ctx, Path(root) / tag.replace(" ", "_"))
        dist.barrier()
        for i, (a, b) in enumerate(zip(got, ref)):
            assert a[0] == pytest.approx(b[0], rel=1e-5), f"{tag} loss step {i + 1}: {a[0]} != {b[0]}"
            assert a[1] == pytest.approx(b[1], rel=1e-5), f"{tag} grad norm step {i + 1}"
            assert a[2] == pytest.approx(b[2], abs=1e-9), f"{tag} accuracy step {i + 1}"


def test_training_at_tp2_pp2_dp2_equals_one_process(tmp_path):
    spawn(_layouts, 2, str(tmp_path))


def test_exact_resume(tmp_path, one_thread):
    from llamactl.parallel.context import ParallelContext

    ctx = ParallelContext.single()
    whole, m1 = _train(ctx, tmp_path / "whole", steps=4)
    part, _ = _train(ctx, tmp_path / "cut", steps=4, stop_at=2)
    assert len(part) == 2
    resumed, m2 = _train(ctx, tmp_path / "cut", steps=4, resume=True)
    assert resumed == whole
    for (k, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(a, b), k


# ---- Hugging Face export -------------------------------------------------------------------------
def test_checkpoint_is_a_hf_sequence_classifier_with_equal_scores(tmp_path, one_thread):
    transformers = pytest.importorskip("transformers")
    from llamactl.checkpoint import load_model
    from llamactl.parallel.context import ParallelContext
    from llamactl.scoring import sequence_scores

    _train(ParallelContext.single(), tmp_path / "run", steps=2)
    ckpt = tmp_path / "run" / "step-000002"
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["num_labels"] == 1
    hf = transformers.LlamaForSequenceClassification.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
    ours, _ = load_model(ckpt)
    pairs = _pairs(3, seed=9)
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    t = max(map(len, seqs))
    pad = hf.config.pad_token_id
    ids = torch.full((len(seqs), t), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    lengths = torch.tensor([len(s) for s in seqs])
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=(torch.arange(t)[None] < lengths[:, None]).long()).logits[:, 0]
    torch.testing.assert_close(sequence_scores(ours, ids, lengths), theirs.float(), rtol=1e-4, atol=1e-5)


# ---- the commands --------------------------------------------------------------------------------
def test_rm_commands_end_to_end(tmp_path, tiny_checkpoint):
    from llamactl.cli import main

    rows = []
    for i in range(12):
        a, b = i % 7, i % 5
        rows.append({"prompt": f"Add {a} and {b}.", "chosen": str(a + b), "rejected": f"I cannot help with {a}.",
                     "rating": ["significantly_better", "better", "slightly_better", "unsure"][i % 4],
                     "safety": i % 3 == 0})
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(*args):
        try:
            main(list(args))
        except SystemExit as e:
            return e.code
        return 0

    out = tmp_path / "rm"
    assert run("rm", "train", "--kind", "safety", "--init", str(tiny_checkpoint), "--mix", f"{data}:0.5,{data}:0.5",
               "--out", str(out), "--batch-pairs", "4", "--micro-batch", "2", "--steps", "2", "--val", str(data),
               "--save-dtype", "float32") == 0
    mrows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["split"] for r in mrows] == ["train", "train", "val"] and all("accuracy" in r for r in mrows)
    meta = json.loads((out / "step-000002" / "llamactl.json").read_text())
    assert meta["head"] == "reward" and meta["extra"]["rm_kind"] == "safety" and meta["extra"]["margin"] == "small"
    res = tmp_path / "eval.json"
    assert run("rm", "eval", "--model", str(out), "--data", str(data), "--out", str(res)) == 0
    r = json.loads(res.read_text())
    assert r["pairs"] == 12 and sum(b["pairs"] for b in r["buckets"].values()) == 12
    assert r["safety"]["responses"] == 8 and r["safety"]["unsafe"] == 4
    # the val row of training and rm eval score the same pairs with the same weights
    assert mrows[-1]["accuracy"] == pytest.approx(r["accuracy"], abs=1e-9)
    resp = tmp_path / "resp.jsonl"
    resp.write_text(json.dumps({"prompt": "Add 1 and 2.", "response": "3", "id": 7}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "Hi"}], "response": "Hello"}) + "\n")
    scored = tmp_path / "scored.jsonl"
    assert run("rm", "score", "--model", str(out), "--data", str(resp), "--out", str(scored)) == 0
    got = [json.loads(x) for x in scored.read_text().splitlines()]
    assert got[0]["id"] == 7 and all(0 < g["sigmoid_score"] < 1 for g in got)
    assert got[0]["sigmoid_score"] == pytest.approx(1 / (1 + math.exp(-got[0]["score"])))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    assert run("rm", "score", "--model", str(out), "--data", str(bad), "--out", str(tmp_path / "o.jsonl")) == 1
    assert not (tmp_path / "o.jsonl").exists()
