"""The planner: per-rank parameter counts agree with the model built on the meta device, memory terms
follow their formulas, the recommended layouts fit, and bad layouts are one-line errors."""
from __future__ import annotations

import pytest

from llamactl.config import preset
from llamactl.parallel.context import ParallelContext
from llamactl.plan import (GIB, PAPER_GPU_HOURS, bubble, count_on_meta, layers_in_flight, make_plan, memory_for,
                           paper_mfu, param_report, stage_param_count)


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
    """Before sequence parallelism only tp 8 x pp 8 with full recomputation fitted; now the same layout fits
    with SP and the attention kernels' selective recomputation, and no smaller one without full recomputation."""
    plan = make_plan("70b", "ppo", gpus=64, gpu_mem=80)
    o = plan.chosen
    assert o is not None and o.fits
    assert (o.tp, o.pp, o.dp, o.recompute, o.sp, o.zero, o.virtual) == (8, 8, 1, "selective", True, False, 1)
    assert o.memory.total <= 0.9 * 80 * GIB
    assert plan.check_ok and len(plan.checks) == 3 * 8  # lm, reward, value heads x 8 stages
    assert not any(x.fits for x in plan.options if x.tp * x.pp < 64 and x.recompute != "full")
    # without SP the same layout needs full recomputation, as before
    no_sp = [x for x in plan.options if (x.tp, x.pp, x.sp) == (8, 8, False)]
    assert [x.recompute for x in no_sp if x.fits] == ["full"]
    # tp 8 x pp 4 x dp 2 fits with full recomputation + SP + ZeRO-1, and only so
    half = [x for x in plan.options if (x.tp, x.pp) == (8, 4) and x.fits]
    assert [(x.recompute, x.sp, x.zero) for x in half] == [("full", True, True)]


def test_memory_terms_follow_their_formulas():
    """Korthikanti et al. 2022 per layer, for 7b (s 4096, b 1, h 4096, a 32) at tp 8: s*b*h = 16,777,216."""
    cfg = preset("7b")
    sbh, L = 16_777_216, 32

    def mem(**kw):
        args = dict(zero=False, recompute="selective", seq=4096, micro_batch=1, n_micro=16, gen_batch=0)
        return memory_for(cfg, "pretrain", 8, 1, 4, **{**args, **kw})

    n = stage_param_count(cfg, 8, 1, 0)
    sel = mem()
    assert sel.weights == 6 * n and sel.grads == 4 * n and sel.optimizer == 8 * n
    # per layer: stored 10 + 24/8 + 5*32*4096/(4096*8) = 33; with SP (34 + 160)/8 = 24.25;
    # selective 10 + 24/8 = 13; with SP 34/8 = 4.25
    assert mem(recompute="none").activations == pytest.approx(L * 33 * sbh)
    assert mem(recompute="none", sp=True).activations == pytest.approx(L * 24.25 * sbh)
    assert sel.activations == pytest.approx(L * 13 * sbh)
    assert mem(sp=True).activations == pytest.approx(L * 4.25 * sbh)
    # full: layer inputs 2*s*b*h per layer (/8 with SP) + one layer recomputed (selective)
    assert mem(recompute="full").activations == pytest.approx((L * 2 + 13) * sbh)
    assert mem(recompute="full", sp=True).activations == pytest.approx((L * 2 / 8 + 4.25) * sbh)
    assert sel.logits == pytest.approx(2 * 4 * 4096 * cfg.vocab_size / 8)
    # ZeRO-1: AdamW state / dp; the fp32 gradient / dp only without accumulation (16 micro-batches hold it whole)
    z16, z1 = mem(zero=True), mem(zero=True, n_micro=1)
    assert z16.optimizer == pytest.approx(8 * n / 4) and z16.grads == 4 * n
    assert z1.optimizer == pytest.approx(8 * n / 4) and z1.grads == pytest.approx(4 * n / 4)
    # 1F1B: the first stage keeps min(pp, micro-batches) micro-batches in flight
    p4 = memory_for(cfg, "pretrain", 1, 4, 1, zero=False, recompute="selective", seq=4096, micro_batch=1, n_micro=2,
                    gen_batch=0)
    assert p4.activations == pytest.approx(2 * (L // 4) * sbh * 34)
    with pytest.raises(ValueError, match="recompute"):
        mem(recompute=True)


def test_interleaved_pipeline_in_flight_and_bubble():
    """Megatron's interleaved warm-up: stage r holds (p-r-1)*2 + (V-1)*p + 1 chunks of layers/(p*V) layers."""
    assert layers_in_flight(80, 8, 0, 512) == 80                      # plain 1F1B: p micro-batches of L/p
    assert layers_in_flight(80, 8, 0, 512, 5) == 94                   # L * (1 + (p-1)/(p*V)) = 80 * 47/40
    assert layers_in_flight(80, 8, 7, 512, 5) == 66                   # last stage: 33 chunks of 2 layers
    assert layers_in_flight(80, 8, 7, 512) == 10
    assert layers_in_flight(8, 4, 0, 2, 2) == 4                       # 2 micro-batches: at most m*V chunks
    assert bubble(8, 512) == pytest.approx(7 / 519)
    assert bubble(4, 8, 2) == pytest.approx(3 / 19)
    assert bubble(1, 8, 1) == 0
    plan = make_plan("70b", "ppo", gpus=64, gpu_mem=80, virtual_stages=5)
    assert (plan.chosen.tp, plan.chosen.pp, plan.chosen.virtual) == (8, 8, 5)
    assert plan.chosen.bubble == pytest.approx(7 / (5 * 512 + 7))
    assert {x.virtual for x in plan.options if x.pp == 32} == {1}    # 80 layers do not split into 32 x 5 chunks
    from llamactl.errors import LlamactlError

    with pytest.raises(LlamactlError, match="--virtual-stages"):
        make_plan("7b", virtual_stages=0)


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
    assert "plan: tp 8 x pp 8 x dp 1, selective recomputation, SP; meta-device check passed" in out
    assert "MISMATCH" not in out and "implied MFU" in out
    assert "interleaved" in out and "0.27%" in out                 # the bubble --virtual-stages 5 would give
    code, out, _ = _cli(capsys, "plan", "--size", "70b", "--stage", "ppo", "--gpus", "64", "--virtual-stages", "5")
    assert code in (0, None) and "plan: tp 8 x pp 8 x dp 1 x V 5, selective recomputation, SP" in out


def test_dry_run_plans_without_the_local_world(capsys):
    """`pretrain --size 70b --dry-run --tp 8 --pp 8` plans 64 GPUs; it does not check this machine's 1 process."""
    code, out, err = _cli(capsys, "pretrain", "--size", "70b", "--dry-run", "--tp", "8", "--pp", "8")
    assert code in (0, None), err
    assert "tp 8 x pp 8 x dp 1" in out and "meta-device check passed" in out
    code, out, err = _cli(capsys, "pretrain", "--size", "70b", "--dry-run", "--tp", "8", "--pp", "8",
                          "--virtual-stages", "5")
    assert code in (0, None), err
    assert "plan: tp 8 x pp 8 x dp 1 x V 5" in out and "0.14%" in out   # 7 / (5 x 1024 + 7): the run's own V


def test_dry_run_with_data_plans_without_the_local_world(capsys, tiny_corpus, tiny_tokenizer, tmp_path):
    """With data (or a [parallel] config file) a dry run resolves the whole run, and still plans tp x pp
    processes when --nproc is not given; a given --nproc is checked."""
    from llamactl.data import prepare

    src = tmp_path / "text.txt"
    src.write_text("\n\n".join(tiny_corpus.read_text().split("\n\n")[:50]))
    prepare([src], tiny_tokenizer, tmp_path / "data", val_fraction=0.0, workers=1, show_progress=False)
    base = ("pretrain", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--dry-run")
    code, out, err = _cli(capsys, *base, "--tp", "2", "--pp", "2", "--virtual-stages", "2")
    assert code in (0, None), err
    assert "plan: tp 2 x pp 2 x dp 1 x V 2" in out
    (tmp_path / "p.toml").write_text("[parallel]\ntp = 2\npp = 2\n")
    code, out, err = _cli(capsys, *base, "--config", str(tmp_path / "p.toml"))
    assert code in (0, None) and "plan: tp 2 x pp 2 x dp 1" in out, err
    code, out, err = _cli(capsys, *base, "--tp", "2", "--pp", "2", "--nproc", "3")
    assert code == 1 and "does not divide the 3 processes" in err
    assert not (tmp_path / "run").exists()


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
