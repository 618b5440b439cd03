"""The planner: per-rank parameter counts agree with the model built on the meta device, memory terms
follow their formulas, the recommended layouts fit, and bad layouts are one-line errors."""
from __future__ import annotations

import pytest

from llamactl.config import preset
from llamactl.parallel.context import ParallelContext
from llamactl.plan import (GIB, PAPER_GPU_HOURS, count_on_meta, make_plan, memory_for, paper_mfu, param_report,
                           stage_param_count)


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (4, 1), (1, 3), (2, 2), (4, 4)])
def test_stage_param_count_matches_meta_model(tp, pp):
    cfg = preset("tiny")  # 4 heads, 2 kv heads: tp 4 replicates each kv head on 2 ranks
    for head in ("lm", "reward"):
        total = 0
        for r in range(pp):
            planned = stage_param_count(cfg, tp, pp, r, head)
            for t in range(tp):
                assert count_on_meta(cfg, ParallelContext(tp=tp, pp=pp, rank=r * tp + t), head) == planned
            total += planned
        if tp == 1:
            want = cfg.num_params() - (0 if head == "lm" else cfg.vocab_size * cfg.dim - cfg.dim)
            assert total == want


def test_param_report_keeps_working():
    r = param_report("7b", preset("7b"))
    assert r.params == r.meta_params == preset("7b").num_params()
    assert r.bytes_per_dtype["bf16"] == 2 * r.params


def test_70b_ppo_on_64_gpus():
    plan = make_plan("70b", "ppo", gpus=64, gpu_mem=80)
    o = plan.chosen
    assert o is not None and o.fits
    assert (o.tp, o.pp, o.dp) == (8, 8, 1)
    assert o.memory.total <= 0.9 * 80 * GIB
    assert plan.check_ok and len(plan.checks) == 3 * 8  # lm, reward, value heads x 8 stages
    # every smaller model-parallel layout was evaluated and does not fit
    assert all(not x.fits for x in plan.options if x.tp * x.pp < 64)


def test_memory_terms_follow_their_formulas():
    cfg = preset("7b")
    s, b, h = 4096, 1, cfg.dim
    plain = memory_for(cfg, "pretrain", 8, 1, 4, zero=False, recompute=False, seq=s, micro_batch=b, n_micro=16,
                       gen_batch=0)
    zero = memory_for(cfg, "pretrain", 8, 1, 4, zero=True, recompute=False, seq=s, micro_batch=b, n_micro=16,
                      gen_batch=0)
    rec = memory_for(cfg, "pretrain", 8, 1, 4, zero=False, recompute=True, seq=s, micro_batch=b, n_micro=16,
                     gen_batch=0)
    n = stage_param_count(cfg, 8, 1, 0)
    assert plain.weights == 6 * n and plain.grads == 4 * n and plain.optimizer == 8 * n
    assert zero.optimizer == pytest.approx(8 * n / 4)
    per_layer = s * b * h * (10 + 24 / 8)  # Korthikanti et al. 2022, no score term (flash attention)
    assert plain.activations == pytest.approx(cfg.n_layers * per_layer)
    assert rec.activations == pytest.approx(cfg.n_layers * 2 * s * b * h + per_layer)
    assert plain.logits == pytest.approx(2 * 4 * s * b * cfg.vocab_size / 8)
    # 1F1B: the first stage keeps min(pp, micro-batches) micro-batches in flight
    p4 = memory_for(cfg, "pretrain", 1, 4, 1, zero=False, recompute=False, seq=s, micro_batch=b, n_micro=2,
                    gen_batch=0)
    assert p4.activations == pytest.approx(2 * (cfg.n_layers // 4) * s * b * h * 34)


def test_paper_mfu_is_plausible():
    rows = paper_mfu()
    assert [r[0] for r in rows] == list(PAPER_GPU_HOURS)
    for size, hours, flops, mfu in rows:
        assert 0.3 < mfu < 0.5, (size, mfu)


def _cli(capsys, *args):
    from llamactl.cli import main

    code = 0
    try:
        main(list(args))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_plan_70b_ppo(capsys):
    code, out, _ = _cli(capsys, "plan", "--size", "70b", "--stage", "ppo", "--gpus", "64", "--gpu-mem", "80")
    assert code in (0, None)
    assert "plan: tp 8 x pp 8 x dp 1" in out and "meta-device check passed" in out
    assert "MISMATCH" not in out and "implied MFU" in out


@pytest.mark.parametrize("args,msg", [(("--tp", "3"), "--tp 3 does not divide the 32 attention heads"),
                                      (("--pp", "40"), "--pp 40 is larger than the 32 layers"),
                                      (("--tp", "8", "--pp", "3"), "does not divide the 8 GPUs")])
def test_cli_bad_layout_is_one_line(capsys, args, msg):
    code, out, err = _cli(capsys, "plan", "--size", "7b", "--gpus", "8", *args)
    assert code == 1
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], err


def test_run_plan_for_a_dry_run(capsys):
    """What `pretrain --size 70b --tp 8 --pp 8 --dry-run` shows: the plan of exactly that layout."""
    from llamactl.plan import print_run_plan

    plan = print_run_plan("70b", preset("70b"), "pretrain", tp=8, pp=8, gpus=1, seq_len=4096)
    assert (plan.chosen.tp, plan.chosen.pp, plan.chosen.dp, plan.gpus) == (8, 8, 1, 64)
    assert plan.check_ok and len(plan.checks) == 8
    out = capsys.readouterr().out
    assert "meta-device check passed" in out and "tp 8 x pp 8 x dp 1" in out
    from llamactl.errors import LlamactlError

    with pytest.raises(LlamactlError, match="--tp 3 does not divide the 64 attention heads"):
        print_run_plan("70b", preset("70b"), "pretrain", tp=3, pp=8, gpus=1, seq_len=4096)


def test_run_plan_takes_the_runs_global_batch_in_sequences(capsys):
    """A stage's dry run plans its own global batch, given in sequences (64 x 256 = 16,384 tokens), not the
    paper's 4M tokens and not its token count read as sequences."""
    from llamactl.errors import LlamactlError
    from llamactl.plan import print_run_plan

    plan = print_run_plan("tiny", preset("tiny"), "pretrain", tp=1, pp=1, gpus=1, seq_len=256, rows=64)
    assert (plan.rows, plan.tokens_per_step) == (64, 16384)
    assert plan.chosen.n_micro == 64  # micro-batch 1 on dp 1
    out = " ".join(capsys.readouterr().out.split())
    assert "global batch │ 64 sequences (16,384 tokens)" in out
    for kw, flag in (({"seq_len": 0}, "--seq-len"), ({"tp": 0}, "--tp")):
        with pytest.raises(LlamactlError, match=flag):
            make_plan("tiny", **kw)
