"""Interleaved 1F1B (virtual pipeline stages) against one process, on gloo; eval at pp > 1 inside pretrain.

The schedule itself is checked without processes: every chunk-forward and -backward once and in dependency
order, lockstep rounds whose sends and receives meet in the same round, and a timed run of the order whose
idle fraction is (p-1)/(V*m+p-1). Then 2 gloo ranks (pp 2, V 2, a 6-layer model whose chunks are uneven:
rank 0 holds layers {0} and {3, 4}) train 3 whole steps with 2, 4 and 6 micro-batches through `trainer.fit`
and match the 1-process losses, gradient norms and updated weights to 1e-5; checkpoints move between
pp 2 x V 2, pp 2 x V 1 and 1 process unchanged; forward-only evaluation and inference forwards run at V 2.
Finally `llamactl pretrain --pp 2 --nproc 2 --virtual-stages 2 --eval-every 2` logs the train and val rows of
the 1-process run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_token_data
from dist_utils import spawn
from test_parallel_steps import _cfg as _steps_cfg

ROWS, SEQ, VOCAB = 12, 16, 256
MICRO_COUNTS = (2, 4, 6)     # micro-batches per step (rows per micro-batch: 6, 3, 2)
TOL = 1e-5


def _cfg():
    """test_parallel_steps' optimizer settings (warmup 2, clip 1.0, weight decay), for 3 steps."""
    import dataclasses

    return dataclasses.replace(_steps_cfg(), steps=3)


def _model_cfg():
    from llamactl.config import preset

    return preset("tiny", dim=64, n_layers=6, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=32,
                  max_seq_len=64)


# ---- the schedule, without processes ------------------------------------------------------------------
GRID = [(p, v, m) for p in (2, 3, 4) for v in (1, 2, 3) for m in range(1, 3 * p + 1) if v == 1 or m % p == 0]


@pytest.mark.parametrize("pp,virtual,micro", GRID)
def test_schedule_covers_every_chunk_in_order_and_its_rounds_meet(pp, virtual, micro):
    from llamactl.parallel.pipeline import bubble_fraction, rounds, schedule, schedule_makespan

    plan = rounds(pp, virtual, micro)
    assert len({len(r) for r in plan}) == 1, "every rank walks the same rounds"
    for r in range(pp):
        ops = schedule(pp, r, virtual, micro)
        want = {(c, m) for c in range(virtual) for m in range(micro)}
        fwd = [(o.chunk, o.mb) for o in ops if o.kind == "F"]
        bwd = [(o.chunk, o.mb) for o in ops if o.kind == "B"]
        assert sorted(fwd) == sorted(want) and sorted(bwd) == sorted(want)
        assert all(ops.index(type(o)("F", o.chunk, o.mb)) < i for i, o in enumerate(ops) if o.kind == "B")
        assert [x.op for x in plan[r] if x.op is not None] == list(ops)
    for t in range(len(plan[0])):  # what rank r sends in round t, its peer receives in round t
        sent = sorted((k, r, peer) for r in range(pp) for k, peer in plan[r][t].sends)
        got = sorted((k, peer, r) for r in range(pp) for k, peer in plan[r][t].recvs)
        assert sent == got, (t, sent, got)
    span, busy = schedule_makespan(pp, virtual, micro)
    assert 1 - busy / span == pytest.approx(bubble_fraction(pp, micro, virtual), abs=1e-12)
    fwd_only = rounds(pp, virtual, micro, forward_only=True)
    assert all([x.op.kind for x in ranks if x.op] == ["F"] * virtual * micro for ranks in fwd_only)


def test_micro_batch_count_must_be_a_multiple_of_pp():
    from llamactl.parallel.context import LayoutError
    from llamactl.parallel.pipeline import schedule

    with pytest.raises(LayoutError, match=r"multiple of --pp 2, got 3 \(the global batch over --micro-batch"):
        schedule(2, 0, 2, 3)
    assert schedule(2, 0, 1, 3)  # plain 1F1B takes any count


# ---- whole steps at pp 2 x V 2 ----------------------------------------------------------------------
def _global_batch(step: int):
    """Rows of the global batch of `step`; about a quarter of the targets carry no loss (uneven per row)."""
    from llamactl.data import Batch

    g = torch.Generator().manual_seed(2000 + step)
    w = torch.randint(0, VOCAB, (ROWS, SEQ + 1), generator=g)
    keep = torch.rand(ROWS, SEQ, generator=g) > torch.linspace(0.0, 0.6, ROWS)[:, None]
    return Batch(w[:, :-1].contiguous(), w[:, 1:].masked_fill(~keep, -100).contiguous(), keep)


class _Batches:
    """The trainer's batch source: each step's global batch in `count` micro-batches (one dp rank)."""

    def __init__(self, count: int):
        self.count, self.step = count, 0

    def next_step(self):
        from llamactl.data import Batch

        b, per = _global_batch(self.step), ROWS // self.count
        self.step += 1
        return [Batch(b.tokens[i:i + per], b.targets[i:i + per], b.loss_mask[i:i + per]) for i in range(0, ROWS, per)]

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, s: dict) -> None:
        self.step = s["step"]


def _train(ctx, count: int, run_dir: Path):
    """_cfg().steps steps of trainer.fit from the seed-0 model; (losses, grad norms, model)."""
    import torch.distributed as dist

    from llamactl.model import build_model
    from llamactl.trainer import fit

    model = build_model(_model_cfg(), ctx, seed=0)
    res = fit(model, ctx, _cfg(), _Batches(count), run_dir=run_dir, show_progress=False)
    if ctx.world_size > 1:
        dist.barrier()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert res.step == len(rows) == _cfg().steps
    return [r["loss"] for r in rows], [r["grad_norm"] for r in rows], model, res


def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _interleaved(rank, world, root):
    import dataclasses

    import torch.distributed as dist

    from llamactl import checkpoint
    from llamactl.errors import LlamactlError
    from llamactl.model import build_model
    from llamactl.parallel.context import ParallelContext
    from llamactl.parallel.pipeline import forward_only, lm_output_loss
    from llamactl.pipe import stage_forward

    root = Path(root)
    single = ParallelContext.single()
    box = [None]
    if rank == 0:  # the 1-process references, trained once and sent over
        refs = {}
        for m in MICRO_COUNTS:
            losses, norms, model, _ = _train(single, m, root / f"ref-m{m}")
            refs[m] = (losses, norms, _weights(model))
        assert min(refs[4][1]) > _cfg().clip, "clipping must be active, or the global norm goes untested"
        checkpoint.save(root / "ref-ckpt", model, single, dtype=torch.float32)  # the M 6 reference, fp32
        box = [refs]
    dist.broadcast_object_list(box, src=0)
    refs = box[0]

    ctx = ParallelContext.from_world(1, 2, virtual_stages=2)
    for m in MICRO_COUNTS:
        tag = f"pp 2 x V 2, {m} micro-batches"
        losses, norms, model, res = _train(ctx, m, root / f"v2-m{m}")
        ref_losses, ref_norms, ref_w = refs[m]
        assert model.chunks == [[0], [3, 4]] if rank == 0 else model.chunks == [[1, 2], [5]]
        for what, got, want in (("loss", losses, ref_losses), ("grad norm", norms, ref_norms)):
            for i, (a, b) in enumerate(zip(got, want)):
                assert abs(a - b) <= TOL * abs(b), f"{tag}: {what} of step {i + 1} {a!r} != {b!r}"
        for name, p in model.named_parameters():
            err = (p.detach() - ref_w[name]).abs().max().item()
            assert err <= TOL, f"{tag}: {name} differs from 1 process by {err:.3g}"

    # checkpoints: saved at pp 2 x V 2 -> 1 process and pp 2 x V 1, identically; 1 process -> pp 2 x V 2
    mine = _weights(model)
    checkpoint.save(root / "v2-ckpt", model, ctx, dtype=torch.float32)
    one, _ = checkpoint.load_model(root / "v2-ckpt", single)
    plain_ctx = ParallelContext.from_world(1, 2)
    plain = build_model(_model_cfg(), plain_ctx)
    checkpoint.load(root / "v2-ckpt", plain, plain_ctx)
    full = dict(one.named_parameters())
    assert sorted(full) == sorted(refs[6][2])
    for name, p in mine.items():
        assert torch.equal(full[name], p), f"{name}: saved at pp 2 x V 2, loaded at 1 process"
    for name, p in plain.named_parameters():
        assert torch.equal(p, full[name]), f"{name}: saved at pp 2 x V 2, loaded at pp 2 x V 1"
    back = build_model(_model_cfg(), ctx)
    checkpoint.load(root / "ref-ckpt", back, ctx)
    for name, p in back.named_parameters():
        assert torch.equal(p, refs[6][2][name]), f"{name}: saved at 1 process, loaded at pp 2 x V 2"
    with pytest.raises(LlamactlError, match="virtual_stages=2"):  # exact resume needs the same chunks
        checkpoint.load_train_state(res.checkpoint, dataclasses.replace(ctx, virtual_stages=1))
    assert checkpoint.load_train_state(res.checkpoint, ctx)["step"] == _cfg().steps

    # forwards only at V 2: evaluation sums (3 micro-batches: not a multiple of pp) and inference outputs
    batches = _Batches(4).next_step()[:3]
    one.eval(), model.eval()
    got = forward_only(model, batches, ctx, lm_output_loss(ctx, head=model.output)).loss
    want = forward_only(one, batches, single, lm_output_loss(single)).loss
    assert abs(got - want) <= TOL * want, (got, want)
    with torch.no_grad():
        out = stage_forward(model, batches[0].tokens, ctx)
        if ctx.is_last_stage:
            torch.testing.assert_close(out, one(batches[0].tokens), rtol=1e-5, atol=1e-5)
        else:
            assert out is None


def test_interleaved_steps_and_checkpoints_match_one_process(tmp_path):
    spawn(_interleaved, 2, str(tmp_path))


# ---- pretrain: eval at pp 2 (and V 2) through the CLI ------------------------------------------------
ARGS = ["--size", "tiny", "--steps", "4", "--seq-len", "16", "--batch-tokens", "128", "--micro-batch", "2",
        "--save-every", "0", "--eval-tokens", "128", "--eval-every", "2", "--peak-flops", "1e11", "--lr", "3e-3",
        "--warmup", "1"]


@pytest.fixture(scope="module")
def data(tiny_corpus, tiny_tokenizer, tmp_path_factory) -> Path:
    return make_token_data(tiny_corpus, tiny_tokenizer, tmp_path_factory, 600, 0.05)


def _pretrain(data, out, *more):
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    p = subprocess.run([sys.executable, "-m", "llamactl", "pretrain", "--data", str(data), "--out", str(out), *ARGS,
                        *more], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_eval_at_pp2_virtual2_equals_one_process(data, tmp_path):
    """Validation rows (--eval-every) at pp 2 x V 2 (forward_only through the interleaved pipeline) and the
    training rows equal the 1-process run's."""
    ref = _pretrain(data, tmp_path / "one")
    got = _pretrain(data, tmp_path / "pp2", "--pp", "2", "--nproc", "2", "--virtual-stages", "2")
    assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in ref]
    assert [r["step"] for r in ref if r["split"] == "val"] == [2, 4]
    for a, b in zip(got, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=TOL, abs=0), (a, b)
    import tomllib

    assert tomllib.loads((tmp_path / "pp2" / "config.toml").read_text())["parallel"]["virtual_stages"] == 2
    meta = json.loads((tmp_path / "pp2" / "step-000004" / "llamactl.json").read_text())
    assert meta["parallel"]["virtual_stages"] == 2


def test_pretrain_refuses_a_micro_batch_count_the_interleaved_schedule_cannot_group(data):
    from llamactl.errors import LlamactlError
    from llamactl.stages.pretrain import resolve

    flags = {"data": str(data), "size": "tiny", "seq_len": 16, "micro_batch": 2, "batch_tokens": 96}  # 3 micro-batches
    with pytest.raises(LlamactlError, match=r"multiple of --pp 2, got 3 .*--batch-tokens multiple of 64"):
        resolve(flags, None, {"pp": 2, "nproc": 2, "virtual_stages": 2})
    assert resolve(dict(flags, batch_tokens=128), None, {"pp": 2, "nproc": 2, "virtual_stages": 2}).accum == 4


def test_a_stage_with_a_fixed_micro_batch_count_is_refused_before_anything_runs():
    """run_stage checks any plan's `accum` (sft, rm train) against the interleaved schedule, also for a dry
    run: the one-line error comes before a run dir, a config.toml or a launch exists."""
    from types import SimpleNamespace

    from llamactl.config import ParallelConfig, preset
    from llamactl.parallel.context import LayoutError
    from llamactl.stages.runner import LaunchOptions, run_stage

    did = []
    for accum, dry in ((3, True), (3, False)):
        plan = SimpleNamespace(parallel=ParallelConfig(pp=2, nproc=2, virtual_stages=2), model=preset("tiny"),
                               accum=accum)
        with pytest.raises(LayoutError, match="multiple of --pp 2, got 3"):
            run_stage(lambda *a: plan, lambda p: did.append("describe"), lambda *a, **k: did.append("run"),
                      flags={}, launch=LaunchOptions(), dry_run=dry)
    assert did == []
    plan = SimpleNamespace(parallel=ParallelConfig(pp=2, nproc=2, virtual_stages=2), model=preset("tiny"), accum=4)
    run_stage(lambda *a: plan, lambda p: did.append("describe"), None, flags={}, launch=LaunchOptions(), dry_run=True)
    assert did == ["describe"]
