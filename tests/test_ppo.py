"""PPO (paper 3.2.3): the per-token arithmetic against hand-computed cases, KL placement on real rollouts,
exact resume (2 iterations == 1 + SIGKILL + --resume 1, through the CLI), and one iteration at tp 2 (gloo)
equal to one process: rollouts, rewards and losses."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_utils import spawn

# ---- the math against hand-computed cases -------------------------------------------------------------


def test_kl_is_per_token_on_response_tokens_and_rewards_end_with_the_score():
    from llamactl import ppo

    logp = torch.tensor([[-1.0, -2.0, -0.5, -0.7, -9.0]])
    ref = torch.tensor([[-3.0, -1.0, -1.0, -0.2, -1.0]])
    mask = torch.tensor([[False, False, True, True, False]])  # prompt, prompt, response, response, pad
    kl = ppo.kl_per_token(logp, ref, mask)
    assert kl.tolist() == [[0.0, 0.0, 0.5, -0.5, 0.0]]
    r = ppo.token_rewards(torch.tensor([2.0]), kl, mask, beta=0.1)
    # -beta*kl per response token, the score added at the last response token (index 3), 0 elsewhere
    assert torch.allclose(r, torch.tensor([[0.0, 0.0, -0.05, 0.05 + 2.0, 0.0]]), atol=1e-7)
    assert ppo.last_valid_index(torch.tensor([[True, True, False], [False, True, True]])).tolist() == [1, 2]


def test_gae_against_a_hand_computation():
    from llamactl import ppo

    # one row: a prompt token, three response tokens, a pad; gamma 1, lambda 0.95
    r = torch.tensor([[9.0, 0.1, -0.2, 1.0, 9.0]])
    v = torch.tensor([[5.0, 0.5, 0.4, 0.3, 5.0]])
    mask = torch.tensor([[False, True, True, True, False]])
    adv, ret = ppo.gae(r, v, mask, gamma=1.0, lam=0.95)
    d3 = 1.0 + 0.0 - 0.3                 # last response token: no value after it
    d2 = -0.2 + 0.3 - 0.4
    d1 = 0.1 + 0.4 - 0.5
    a3 = d3
    a2 = d2 + 0.95 * a3
    a1 = d1 + 0.95 * a2
    want = torch.tensor([[0.0, a1, a2, a3, 0.0]])
    assert torch.allclose(adv, want, atol=1e-6)
    assert torch.allclose(ret, (want + v) * mask, atol=1e-6)
    # gamma < 1 discounts the next value and the running advantage
    adv2, _ = ppo.gae(r, v, mask, gamma=0.5, lam=1.0)
    b3 = 0.7
    b2 = -0.2 + 0.5 * 0.3 - 0.4 + 0.5 * b3
    assert adv2[0, 2].item() == pytest.approx(b2, abs=1e-6)


def test_advantage_whitening_over_valid_tokens_only():
    from llamactl import ppo

    x = torch.tensor([[100.0, 1.0, 2.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[False, True, True], [True, True, False]])
    w = ppo.masked_whiten(x, mask, eps=0.0)
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0])
    want = (vals - 2.5) / vals.var(unbiased=False).sqrt()
    assert torch.allclose(w[mask], want, atol=1e-6)
    assert w[~mask].tolist() == [0.0, 0.0]


def test_clipped_policy_and_value_losses_against_hand_cases():
    from llamactl import ppo

    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 2.0]]))   # ratios 1.5, 0.5, 1.1, 2.0
    adv = torch.tensor([[1.0, 1.0, -1.0, 3.0]])
    mask = torch.tensor([[True, True, True, False]])
    loss, m = ppo.policy_loss(logp, old, adv, mask, clip=0.2)
    # token 0: A>0, r 1.5 -> clipped 1.2 -> -1.2; token 1: A>0, r 0.5 -> max(-0.5, -0.8) = -0.5;
    # token 2: A<0, r 1.1 -> max(1.1, 1.1) = 1.1; token 3 masked
    assert loss.item() == pytest.approx(-1.2 - 0.5 + 1.1, abs=1e-6)
    assert m["clip_frac"].item() == pytest.approx(1.0)   # only token 0 took the clipped branch
    k3 = sum((r - 1) - math.log(r) for r in (1.5, 0.5, 1.1))
    assert m["approx_kl"].item() == pytest.approx(k3, abs=1e-6)

    v = torch.tensor([[1.0, 0.0, 0.5]])
    v_old = torch.tensor([[0.5, 0.0, 0.5]])
    ret = torch.tensor([[0.0, 1.0, 0.5]])
    mask = torch.tensor([[True, True, True]])
    vl, vm = ppo.value_loss(v, v_old, ret, mask, clip=0.2)
    # token 0: unclipped (1-0)^2 = 1, clipped v 0.7 -> 0.49: max 1; token 1: 1 and 1; token 2: 0
    assert vl.item() == pytest.approx(0.5 * (1.0 + 1.0 + 0.0), abs=1e-6)
    assert vm["vf_clip_frac"].item() == 0.0


def test_entropy_and_explained_variance():
    from llamactl import ppo

    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    p = torch.softmax(logits, -1)
    assert torch.allclose(ppo.entropy_from_logits(logits), -(p * p.log()).sum(-1), atol=1e-6)
    ret = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[True, True, True, False]])
    assert ppo.explained_variance(ret, ret, mask) == pytest.approx(1.0)
    v = torch.tensor([[2.0, 2.0, 2.0, 0.0]])  # the mean: explains nothing
    assert ppo.explained_variance(v, ret, mask) == pytest.approx(0.0, abs=1e-6)


# ---- tiny models ----------------------------------------------------------------------------------------
def _cfg():
    from llamactl.config import ModelConfig

    return ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=2048, multiple_of=32, max_seq_len=128)


@pytest.fixture(scope="module")
def ppo_inputs(tiny_tokenizer, tmp_path_factory):
    """A tiny policy, two tiny reward models (dim 32, 2 layers) and prompt files."""
    from llamactl import checkpoint
    from llamactl.model import build_model

    root = tmp_path_factory.mktemp("ppo")
    cfg = _cfg()
    pol = checkpoint.save(root / "policy", build_model(cfg, seed=1), tokenizer=tiny_tokenizer, stage="test")
    rms = {}
    for kind, seed in (("helpfulness", 2), ("safety", 3)):
        rms[kind] = checkpoint.save(root / f"rm-{kind}", build_model(cfg, head="reward", seed=seed),
                                    tokenizer=tiny_tokenizer, stage="reward", extra={"rm_kind": kind})
    lines = [{"prompt": f"What is {i} + {i + 1}?", "safety": i % 3 == 0} for i in range(12)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (root / "val.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines[:3]))
    return root, pol, rms["helpfulness"], rms["safety"]


def _flags(inp, out, **kw):
    root, pol, rmh, rms = inp
    f = dict(policy=str(pol), rm_helpful=str(rmh), rm_safety=str(rms), prompts=str(root / "prompts.jsonl"),
             out=str(out), iterations=2, batch_size=4, minibatch=2, micro_batch=1, max_new_tokens=6, lr=3e-3,
             save_every=1, save_dtype="float32", seed=5)
    f.update(kw)
    return f


def test_kl_sits_on_response_tokens_of_real_rollouts(ppo_inputs, one_thread):
    """The policy after one PPO iteration differs from pi_0 everywhere, prompt included; the KL term is
    still exactly 0 on prompt and padding positions and equals log pi - log pi_0 on every response token."""
    from llamactl import ppo
    from llamactl.generation import collate
    from llamactl.parallel.context import ParallelContext
    from llamactl.stages import ppo as stage

    plan = stage.resolve(_flags(ppo_inputs, ppo_inputs[0] / "unused"))
    ctx = ParallelContext.single()
    m = stage.load_models(plan, ctx, "cpu")
    with torch.no_grad():
        for p in m.policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    from llamactl.chat_data import PromptItem

    items = [PromptItem([{"role": "user", "content": "Add 3 and 4."}], safety=False, where="test")] * 3
    prompts = stage.encode_prompts(m.tok, items, 128, 6, "--prompts")
    samples, _ = stage.rollout(m, prompts, [1, 2, 3], plan.cfg, temperature=1.0)
    from llamactl.generation import generate

    # the decode-layout copy samples exactly what the training policy itself would
    direct = generate(m.policy, prompts, max_new_tokens=6, temperature=1.0, seeds=[1, 2, 3], eos_id=m.tok.eos_id)
    assert [s.tokens for s in samples] == [s.tokens for s in direct]
    roll = collate(samples)
    lp, ref, _ = stage.score_rollouts(m, roll, 2)
    mask = roll.mask[:, 1:]
    kl = ppo.kl_per_token(lp, ref, mask)
    real = (torch.arange(lp.shape[1])[None] < (roll.lengths - 1)[:, None])
    prompt_pos = real & ~mask
    assert (lp - ref)[prompt_pos].abs().min() > 0          # the models do differ on the prompt ...
    assert (kl[~mask] == 0).all()                            # ... but no KL is charged there
    assert torch.equal(kl[mask], (lp - ref)[mask])


def _weights(run: Path, name: str) -> dict:
    from safetensors.torch import load_file

    ck = Path(run) / name / (Path(run) / name / "latest").read_text().strip()
    out = {}
    for f in sorted(ck.glob("*.safetensors")):
        out.update(load_file(f))
    return out


TIMES = ("time_generate", "time_score", "time_train", "tokens_per_s", "rollout_tokens_per_s")


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines() if x]
    return [{k: v for k, v in r.items() if k not in TIMES} for r in rows]


def test_resume_after_sigkill_equals_an_uninterrupted_run(ppo_inputs, tmp_path, one_thread):
    """2 iterations in one go (in process) == the CLI killed (SIGKILL) after iteration 1, then --resume:
    identical policy and value weights and metric rows; the CLI also writes the run dir layout."""
    from llamactl.parallel.context import ParallelContext
    from llamactl.stages import ppo as stage

    ref_dir = tmp_path / "ref"
    flags = _flags(ppo_inputs, ref_dir, val_prompts=str(ppo_inputs[0] / "val.jsonl"), eval_every=1,
                   truncated="penalize")
    res = stage.run(stage.resolve(flags), ParallelContext.single(), show_progress=False)
    assert res.iteration == 2 and res.stopped_by is None

    run = tmp_path / "cli"
    args = [sys.executable, "-m", "llamactl", "rlhf", "ppo"]
    for k, v in _flags(ppo_inputs, run, val_prompts=str(ppo_inputs[0] / "val.jsonl"), eval_every=1,
                       truncated="penalize").items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "LLAMACTL_FAULT_AT_STEP": "1", "LLAMACTL_FAULT_SIGNAL": "KILL", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 1
    env.pop("LLAMACTL_FAULT_AT_STEP")
    p = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]

    for name in ("policy", "value"):
        a, b = _weights(ref_dir, name), _weights(run, name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    ra, rb = _rows(ref_dir), _rows(run)
    assert ra == rb
    train = [r for r in ra if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    keys = {"step", "loss", "value_loss", "lr", "grad_norm", "tokens", "reward_helpful", "reward_safety",
            "reward_combined", "reward_whitened", "kl", "entropy", "clip_frac", "approx_kl", "explained_var",
            "response_len", "truncated_frac"}
    assert keys <= set(train[0])
    val = [r for r in ra if r["split"] == "val"]
    assert [r["step"] for r in val] == [0, 1, 2] and {"reward_combined", "kl"} <= set(val[0])
    assert val[0]["kl"] == 0.0                      # pi == pi_0 before the first update
    assert train[1]["kl"] != 0.0
    # every response hit --max-new-tokens 6 without EOS: under --truncated penalize all get the fixed reward
    assert all(r["truncated_frac"] == 1.0 and r["reward_whitened"] == -3.0 for r in train)
    assert (run / "policy" / "latest").is_file() and (run / "value" / "latest").is_file()
    # RUN/best: the policy of the best held-out R_c, a complete checkpoint, the same in both runs
    best = [r for r in val if r["reward_combined"] > val[0]["reward_combined"]]
    if best:
        top = max(best, key=lambda r: r["reward_combined"])
        assert json.loads((run / "best.json").read_text())["iteration"] == top["step"]
        from llamactl.checkpoint import verify

        assert verify(run / "best") == []
    else:
        assert not (run / "best").exists()


def test_size_mismatch_and_bad_flags_are_one_line_errors(ppo_inputs, tmp_path):
    from llamactl.errors import LlamactlError
    from llamactl.stages import ppo as stage

    with pytest.raises(LlamactlError, match=r"--size 7b needs a 7b policy, but .* has dim=32 .*--policy / --size"):
        stage.resolve(_flags(ppo_inputs, tmp_path / "x", size="7b"))
    with pytest.raises(LlamactlError, match=r"multiple of --minibatch"):
        stage.resolve(_flags(ppo_inputs, tmp_path / "x", minibatch=3))
    with pytest.raises(LlamactlError, match=r"score or penalize"):
        stage.resolve(_flags(ppo_inputs, tmp_path / "x", truncated="drop"))
    with pytest.raises(LlamactlError, match=r"--rm-helpful needs a reward checkpoint"):
        stage.resolve(_flags(ppo_inputs, tmp_path / "x", rm_helpful=str(ppo_inputs[1])))
    plan = stage.resolve(_flags(ppo_inputs, tmp_path / "x"))
    assert plan.cfg.beta == 0.01 and plan.size == "custom" and plan.steps_per_iteration == 2


def test_early_stopping_on_held_out_reward(ppo_inputs, tmp_path, one_thread):
    """A policy that cannot move (lr 1e-30) never beats its held-out R_c before training: with --patience 1
    the run stops after the first evaluation, saved, with exit code 0."""
    from llamactl.parallel.context import ParallelContext
    from llamactl.runstate import state_steps
    from llamactl.stages import ppo as stage

    flags = _flags(ppo_inputs, tmp_path / "es", iterations=4, lr=1e-30, eval_every=1, patience=1, save_every=0,
                   val_prompts=str(ppo_inputs[0] / "val.jsonl"))
    res = stage.run(stage.resolve(flags), ParallelContext.single(), show_progress=False)
    assert res.iteration == 1 and res.exit_code == 0
    assert state_steps(tmp_path / "es") == [2]      # 2 optimizer steps (minibatches) in iteration 1
    assert [r["step"] for r in res.rows if r["split"] == "val"] == [0, 1]
    assert not (tmp_path / "es" / "best").exists()  # nothing beat the initial policy


def test_freeze_policy_trains_only_the_value_model(ppo_inputs, tmp_path, one_thread):
    from llamactl.parallel.context import ParallelContext
    from llamactl.stages import ppo as stage

    res = stage.run(stage.resolve(_flags(ppo_inputs, tmp_path / "fz", iterations=1, freeze_policy=1, value_lr=1e-2)),
                    ParallelContext.single(), show_progress=False)
    assert res.rows[0]["policy_frozen"] is True and res.rows[0]["grad_norm"] == 0.0
    init = {}
    from safetensors.torch import load_file

    for f in Path(ppo_inputs[1]).glob("*.safetensors"):
        init.update(load_file(f))
    after = _weights(tmp_path / "fz", "policy")
    assert all(torch.equal(init[k].float(), after[k].float()) for k in init)
    v0 = {}
    for f in Path(ppo_inputs[2]).glob("*.safetensors"):
        v0.update(load_file(f))
    v1 = _weights(tmp_path / "fz", "value")
    assert any(not torch.equal(v0[k].float(), v1[k].float()) for k in v0)


def test_dry_run_70b_prints_the_plan_without_checkpoints(capsys):
    from llamactl.cli import main

    main(["rlhf", "ppo", "--size", "70b", "--dry-run"])
    out = capsys.readouterr().out
    assert "beta = 0.005" in out and "lr = 1e-06" in out and "batch_size = 512" in out
    assert "tp 8 x pp 8" in out and "memory per GPU (5 models)" in out and "iteration time" in out


# ---- tp 2 equals one process ------------------------------------------------------------------------------
def _tp_worker(rank, world, flags, out_root):
    from llamactl.parallel.context import ParallelContext
    from llamactl.stages import ppo as stage

    def one(ctx, tag):
        plan = stage.resolve({**flags, "out": str(Path(out_root) / tag)})
        plan.parallel.tp = ctx.tp
        m = stage.load_models(plan, ctx, "cpu")
        trainers = stage.make_trainers(m, plan)
        from llamactl.chat_data import read_prompts

        items = list(read_prompts(Path(plan.cfg.prompts)))
        prompts = stage.encode_prompts(m.tok, items, plan.model.max_seq_len, plan.cfg.max_new_tokens, "--prompts")
        order = stage.PromptOrder(len(prompts), plan.cfg.seed)
        rows = order.take(plan.cfg.batch_size)
        # the rollouts themselves: the first iteration's samples at the same seeds
        from llamactl.generation import sequence_seed

        seeds = [sequence_seed(plan.cfg.seed, k) for k in range(len(rows))]
        samples, _ = stage.rollout(m, [prompts[i] for i in rows], seeds, plan.cfg, temperature=plan.cfg.temperature)
        row = stage.iteration(m, trainers, items, prompts, rows, 0, plan.cfg)
        return [s.tokens for s in samples], row

    tp_ctx = ParallelContext.from_world(tp=2)
    toks2, row2 = one(tp_ctx, "tp2")
    if rank == 0:
        toks1, row1 = one(ParallelContext.single(), "tp1")
        assert toks1 == toks2
        for k in ("loss", "value_loss", "grad_norm", "value_grad_norm", "reward_helpful", "reward_safety",
                  "reward_combined", "reward_whitened", "kl", "entropy", "clip_frac", "approx_kl", "explained_var",
                  "response_len", "truncated_frac"):
            assert row2[k] == pytest.approx(row1[k], rel=1e-4, abs=1e-5), (k, row1, row2)


def test_one_iteration_at_tp2_equals_one_process(ppo_inputs, tmp_path):
    spawn(_tp_worker, 2, _flags(ppo_inputs, tmp_path / "unused", iterations=1), str(tmp_path))


@pytest.mark.parametrize("pack_min", [None, 0])
def test_sampler_copy_follows_the_policy_after_in_place_updates(pack_min, monkeypatch):
    """PPO samples with a decode-layout copy of the policy refreshed in place before every rollout: after an
    in-place update of the policy (an optimizer step) it samples what the policy itself does. With the size
    floor at 0 every matrix has a oneDNN-packed copy, which must be dropped at each refresh or go stale."""
    from types import SimpleNamespace

    from llamactl import model as model_mod
    from llamactl.config import ModelConfig
    from llamactl.generation import generate
    from llamactl.model import build_model
    from llamactl.stages import ppo_iteration as it

    if pack_min is not None:
        monkeypatch.setattr(model_mod, "PACK_MIN_ELEMENTS", pack_min)
    cfg = ModelConfig(dim=48, n_layers=3, n_heads=6, n_kv_heads=3, vocab_size=97, multiple_of=8, max_seq_len=64)
    policy = build_model(cfg, seed=3)
    m = SimpleNamespace(policy=policy, sampler=it.decode_copy(policy))
    assert m.sampler is not policy
    prompts = [[1, 5 + i, 9, 2 * i + 3] for i in range(12)]  # 12 rows: past the GEMV, into the (packed) GEMM
    kw = dict(max_new_tokens=6, temperature=0.9, top_p=0.9, seed=4)

    def same() -> bool:
        a, b = generate(policy, prompts, **kw), generate(m.sampler, prompts, **kw)
        return all(x.tokens == y.tokens and max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs)) <= 1e-5
                   for x, y in zip(a, b))

    assert same()
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(-1.3)
    it.sync_sampler(m)
    assert same()
    packed = sum(len(x.__dict__.get("_llamactl_packed", {})) for x in m.sampler.modules())
    assert packed == (3 * 4 + 1 if pack_min == 0 else 0)  # q|k|v, wo, w1|w3, w2 per layer; the head
    if pack_min == 0:  # the same refresh without dropping the packed copies decodes with stale weights
        monkeypatch.setattr(it, "drop_packed_weights", lambda model: None)
        with torch.no_grad():
            for p in policy.parameters():
                p.mul_(-0.7)
        it.sync_sampler(m)
        assert not same()
