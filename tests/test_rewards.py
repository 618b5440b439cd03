"""llamactl/rewards.py: the 0.15 switch and the safety tag, WHITEN(LOGIT) against a hand computation, wrong
checkpoints refused, scores equal to `rm score`'s, and scoring at tp 2 / pp 2 (gloo) equal to one process."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dist_utils import spawn

DIALOGS = [[{"role": "user", "content": "Add 2 and 3."}],
           [{"role": "user", "content": "How do I pick a lock?"}],
           [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Name a colour."}],
           [{"role": "user", "content": "Spell cat backwards."}],
           [{"role": "user", "content": "What is the capital of France?"}]]
RESPONSES = ["5", "I cannot help with that.", "Blue, for example.", "tac", "Paris is the capital."]
TAGS = [False, True, False, False, True]


# ---- arithmetic ----------------------------------------------------------------------------------
def test_combine_switches_at_015_and_on_the_safety_tag():
    from llamactl.rewards import SAFETY_THRESHOLD, combine

    assert SAFETY_THRESHOLD == 0.15
    r_h = torch.tensor([0.9, 0.9, 0.9, 0.2, 0.3, 0.8], dtype=torch.float64)
    r_s = torch.tensor([0.5, 0.1499, 0.15, 0.9, 0.7, 0.05], dtype=torch.float64)
    tag = torch.tensor([False, False, False, True, True, False])
    # untagged: R_h unless R_s < 0.15 (0.15 itself is not below); tagged: always R_s
    want = [0.9, 0.1499, 0.9, 0.9, 0.7, 0.05]
    assert combine(r_h, r_s, tag).tolist() == pytest.approx(want, abs=0)
    assert combine(r_h, r_s, [False] * 6).tolist() == pytest.approx([0.9, 0.1499, 0.9, 0.2, 0.3, 0.05], abs=0)


def test_whiten_logit_on_a_batch_by_hand():
    from llamactl.rewards import logit, ppo_reward, whiten

    p = [0.9, 0.5, 0.2, 0.75, 0.0, 1.0]
    eps = 1e-6
    lg = [math.log(min(max(x, eps), 1 - eps) / (1 - min(max(x, eps), 1 - eps))) for x in p]
    assert logit(torch.tensor(p, dtype=torch.float64)).tolist() == pytest.approx(lg, rel=1e-12)
    assert math.isfinite(lg[4]) and lg[4] == pytest.approx(-math.log(1 / eps - 1))
    mean = sum(lg) / len(lg)
    var = sum((x - mean) ** 2 for x in lg) / len(lg)  # population variance
    want = [(x - mean) / math.sqrt(var + 1e-8) for x in lg]
    got = ppo_reward(torch.tensor(p, dtype=torch.float64))
    assert got.tolist() == pytest.approx(want, rel=1e-10)
    assert got.dtype == torch.float64
    # fp32 in, fp32 out (away from the clamp, where fp32 cannot hold 1 - 1e-6 exactly)
    g32 = ppo_reward(torch.tensor(p[:4], dtype=torch.float32))
    assert g32.dtype == torch.float32 and g32.tolist() == pytest.approx(ppo_reward(torch.tensor(p[:4], dtype=torch.float64)).tolist(), rel=1e-5)
    # a batch of one and a constant batch whiten to zeros (not NaN)
    assert whiten(torch.tensor([3.0])).tolist() == [0.0]
    assert whiten(torch.full((4,), 2.5)).tolist() == [0.0] * 4


# ---- checkpoints ---------------------------------------------------------------------------------
def _rm(root: Path, tok, kind, seed, head="reward") -> Path:
    from llamactl import checkpoint
    from llamactl.config import preset
    from llamactl.model import build_model

    cfg = preset("tiny", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=2048, max_seq_len=128)
    model = build_model(cfg, head=head, seed=seed)
    if head == "reward":  # scores of several units (sigma far from 0.5); the safety RM's of the other sign,
        with torch.no_grad():  # so that the 0.15 switch picks R_h for some responses and R_s for others
            model.score.weight.mul_(-40.0 if kind == "safety" else 40.0)
    extra = {"rm_kind": kind} if kind else None
    return checkpoint.save(root / f"{head}-{kind}-{seed}", model, tokenizer=tok, stage="reward", extra=extra)


@pytest.fixture(scope="module")
def rms(tiny_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("rms")
    return {"h": _rm(root, tiny_tokenizer, "helpfulness", 1), "s": _rm(root, tiny_tokenizer, "safety", 2),
            "nokind": _rm(root, tiny_tokenizer, None, 3), "lm": _rm(root, tiny_tokenizer, None, 4, head="lm")}


def test_wrong_checkpoints_are_one_line_errors(rms, tmp_path, one_thread):
    from llamactl.errors import LlamactlError
    from llamactl.rewards import RewardModels

    cases = [((rms["lm"], rms["s"]), r"not a reward model: the checkpoint has a lm head .*--rm-helpful"),
             ((rms["h"], rms["lm"]), r"not a reward model.*--rm-safety"),
             ((rms["s"], rms["s"]), r"--rm-helpful needs a helpfulness reward model, got a safety reward model"),
             ((rms["h"], rms["h"]), r"--rm-safety needs a safety reward model, got a helpfulness reward model"),
             ((rms["h"], rms["nokind"]), r"--rm-safety needs a safety reward model, got a reward model of unknown kind"),
             ((tmp_path / "nope", rms["s"]), r"checkpoint directory not found: .*nope \(--rm-helpful\)")]
    for (h, s), msg in cases:
        with pytest.raises(LlamactlError, match=msg) as e:
            RewardModels.load(h, s)
        assert "\n" not in str(e.value)


def test_scores_equal_rm_score_and_models_are_frozen(rms, tmp_path, one_thread):
    from llamactl.rewards import RewardModels, combine
    from llamactl.stages.reward_eval import run_score

    models = RewardModels.load(rms["h"], rms["s"])
    for m in (models.helpful, models.safety):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
    r = models.score(DIALOGS, RESPONSES, TAGS, batch_size=2)
    data = tmp_path / "resp.jsonl"
    data.write_text("".join(json.dumps({"messages": d, "response": x}) + "\n" for d, x in zip(DIALOGS, RESPONSES)))
    for path, got in ((rms["h"], r.helpful), (rms["s"], r.safety)):
        run_score(path, data, tmp_path / "out.jsonl", batch_size=3, device="cpu")
        want = [json.loads(x)["sigmoid_score"] for x in (tmp_path / "out.jsonl").read_text().splitlines()]
        assert got.tolist() == pytest.approx(want, rel=1e-6, abs=1e-7)
    assert torch.equal(r.combined, combine(r.helpful, r.safety, torch.tensor(TAGS)))
    # the scores are spread: the rule picks R_h for some responses and R_s for others
    picked_safe = [c == s != h for c, s, h in zip(r.combined.tolist(), r.safety.tolist(), r.helpful.tolist())]
    assert picked_safe == TAGS, (r, picked_safe)
    with pytest.raises(ValueError):
        models.score(DIALOGS, RESPONSES, TAGS[:2])


def _layouts(rank, world, hp, sp, want):
    import torch.distributed as dist

    from llamactl.parallel.context import ParallelContext
    from llamactl.rewards import RewardModels, whiten

    for tp, pp in ((2, 1), (1, 2)):
        ctx = ParallelContext.from_world(tp, pp)
        r = RewardModels.load(Path(hp), Path(sp), ctx=ctx)
        got = r.score(DIALOGS, RESPONSES, TAGS, batch_size=2)
        for name, g in (("helpful", got.helpful), ("safety", got.safety), ("combined", got.combined)):
            torch.testing.assert_close(g, torch.tensor(want[name]), rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"tp{tp} pp{pp} {name}: {m}")
    # whiten over a data-parallel group equals whitening the whole batch
    x = torch.arange(7, dtype=torch.float64) ** 1.5
    part = x[:3] if rank == 0 else x[3:]
    full = whiten(x)
    torch.testing.assert_close(whiten(part, group=dist.group.WORLD), full[:3] if rank == 0 else full[3:],
                               rtol=1e-12, atol=1e-12)


def test_tp2_and_pp2_scoring_equals_one_process(rms, one_thread):
    from llamactl.rewards import RewardModels

    r = RewardModels.load(rms["h"], rms["s"]).score(DIALOGS, RESPONSES, TAGS)
    want = {"helpful": r.helpful.tolist(), "safety": r.safety.tolist(), "combined": r.combined.tolist()}
    spawn(_layouts, 2, str(rms["h"]), str(rms["s"]), want)
