"""Megatron sequence parallelism (parallel/sequence.py, model.sequence_parallel) against one process, on gloo.

Layer level (fp32, 1e-6): the four sequence ops and the layers' SP paths (embedding, column / row linears,
RMSNorm with its gain's gradient summed over tp) forward and backward against plain torch on the same global
tensors; the model's forward and every gradient with SP at tp 2, with the sequence divisible by tp (split:
checked by the norms seeing T/tp rows) and not (the plain path), with recomputation, with packed-sample
masks and RoPE positions, micro-batches of both kinds in one step. Whole steps (1e-5): `trainer.fit` with
`TrainConfig.sequence_parallel` at tp 2, tp 2 x pp 2 (also interleaved, V 2) and tp 2 x dp 2 (ZeRO-1) against
the 1-process run: losses, global grad norms (clipping active) and every updated weight. The default (None)
is off on gloo (slower there, bench/sequence_parallel.py) and on as asked.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from dist_utils import spawn
from test_parallel_steps import STEPS, _Batches, assert_equals_one_process

TOL, LOSS_RTOL, WEIGHT_ATOL = 1e-6, 1e-5, 1e-5


def _cfg_model(n_layers: int = 2):
    from llamactl.config import preset

    # dim 48 over 4 heads (2 kv heads: GQA split at tp 2), vocab 256: small enough for a few seconds per layout
    return preset("tiny", dim=48, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=16)


def _close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = TOL) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got.detach().double() - want.detach().double()).abs().max().item()
    tol = tol * max(1.0, want.detach().abs().max().item())
    assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g}"


def _grads_close(tag, model, ref, specs) -> None:
    """Each gradient of this rank's model equals the 1-process reference's, its tp slice for sharded tensors."""
    ref_p = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        w = ref_p[name].grad
        s = specs.get(name)
        if s is not None:
            w = w.narrow(s.dim, s.start, s.length)
        _close(f"{tag} grad {name}", p.grad, w)


# ---- the ops --------------------------------------------------------------------------------------
def _ops(ctx):
    """Each op forward and backward against plain torch; every rank builds all ranks' tensors (same seed)."""
    from llamactl.parallel.sequence import (gather_from_sequence, gather_sequence, reduce_scatter_to_sequence,
                                            sequence_split, split_to_sequence)

    tp, r = ctx.tp, ctx.tp_rank
    g = torch.Generator().manual_seed(11)
    b, n, d = 3, 3, 7  # odd sizes: 3 positions per rank
    t = n * tp
    mine = slice(r * n, (r + 1) * n)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    # split: replicated in, slice out; backward all-gathers the slices' gradients
    x, gy = rnd(b, t, d), rnd(b, t, d)
    xl = x.clone().requires_grad_()
    y = split_to_sequence(xl, ctx)
    _close("split fwd", y, x[:, mine])
    (y * gy[:, mine]).sum().backward()
    _close("split bwd", xl.grad, gy)
    # gather before the column-parallel linears: each rank's consumer gives its own gradient, summed
    x, gys = rnd(b, t, d), [rnd(b, t, d) for _ in range(tp)]
    xl = x[:, mine].clone().requires_grad_()
    y = gather_from_sequence(xl, ctx)
    _close("gather_from fwd", y, x)
    (y * gys[r]).sum().backward()
    _close("gather_from bwd (reduce-scatter)", xl.grad, sum(gys)[:, mine])
    # gather for replicated computation: the same gradient on every rank, each keeps its slice
    x, gy = rnd(b, t, d), rnd(b, t, d)
    xl = x[:, mine].clone().requires_grad_()
    y = gather_sequence(xl, ctx)
    _close("gather fwd", y, x)
    (y * gy).sum().backward()
    _close("gather bwd (split)", xl.grad, gy[:, mine])
    # reduce-scatter after the row-parallel linears: partial sums in, this rank's slice of the sum out
    parts, gy = [rnd(b, t, d) for _ in range(tp)], rnd(b, t, d)
    xl = parts[r].clone().requires_grad_()
    y = reduce_scatter_to_sequence(xl, ctx)
    _close("reduce_scatter fwd", y, sum(parts)[:, mine])
    (y * gy[:, mine]).sum().backward()
    _close("reduce_scatter bwd (all-gather)", xl.grad, gy)
    assert sequence_split(ctx, t) and not sequence_split(ctx, t + 1)
    with pytest.raises(ValueError, match="does not split"):
        split_to_sequence(rnd(b, t + 1, d), ctx)


def _layers(ctx):
    """The layers' SP paths against plain torch: embedding (reduce-scatter), two column-parallel linears reading
    one split input (gathered once, input gradients summed and reduce-scatterd), row linear (reduce-scatter),
    RMSNorm over this rank's rows with its gain's gradient summed over tp."""
    import torch.nn.functional as F

    from llamactl.model import RMSNorm
    from llamactl.parallel.tensor import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                          column_parallel_on_sequence)

    tp, r = ctx.tp, ctx.tp_rank
    g = torch.Generator().manual_seed(13)
    b, n = 3, 5
    t, mine = n * tp, slice(r * n, (r + 1) * n)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    # vocab-parallel embedding -> this rank's positions
    vocab, dim = 7 * tp, 9
    ids = torch.randint(0, vocab, (b, t), generator=g)
    ids[0, :tp] = torch.arange(tp) * 7  # the first id of every shard
    w, gy = rnd(vocab, dim), rnd(b, t, dim)
    wr = w.clone().requires_grad_()
    (F.embedding(ids, wr) * gy).sum().backward()
    emb = VocabParallelEmbedding(vocab, dim, ctx)
    with torch.no_grad():
        emb.weight.copy_(w[r * 7:(r + 1) * 7])
    y = emb(ids, sequence_parallel=True)
    _close("embedding SP out", y, F.embedding(ids, w)[:, mine])
    (y * gy[:, mine]).sum().backward()
    _close("embedding SP grad w", emb.weight.grad, wr.grad[r * 7:(r + 1) * 7])
    # two column-parallel linears on one split input (3 and 2 features per rank): gathered once; backward sums
    # their input gradients and reduce-scatters them (no f op)
    n_in = 11
    x = rnd(b, t, n_in)
    ws, gys = [rnd(3 * tp, n_in), rnd(2 * tp, n_in)], [rnd(b, t, 3 * tp), rnd(b, t, 2 * tp)]
    xr, wrs = x.clone().requires_grad_(), [w.clone().requires_grad_() for w in ws]
    sum((F.linear(xr, w) * gy).sum() for w, gy in zip(wrs, gys)).backward()
    cols = [ColumnParallelLinear(n_in, w.shape[0], ctx) for w in ws]
    for col, w in zip(cols, ws):
        n = w.shape[0] // tp
        with torch.no_grad():
            col.weight.copy_(w[r * n:(r + 1) * n])
    xl = x[:, mine].clone().requires_grad_()
    ys = column_parallel_on_sequence(xl, cols, ctx)
    loss = 0
    for i, (y, w, gy) in enumerate(zip(ys, ws, gys)):
        n = w.shape[0] // tp
        _close(f"column {i} SP out", y, F.linear(x, w)[..., r * n:(r + 1) * n])
        loss = loss + (y * gy[..., r * n:(r + 1) * n]).sum()
    loss.backward()
    _close("columns SP grad x (summed, reduce-scattered)", xl.grad, xr.grad[:, mine])
    for i, (col, wr) in enumerate(zip(cols, wrs)):
        n = wr.shape[0] // tp
        _close(f"column {i} SP grad w", col.weight.grad, wr.grad[r * n:(r + 1) * n])
    # row-parallel linear -> this rank's positions of the summed output
    n_in, n_out = 5 * tp, 7
    x, w, gy = rnd(b, t, n_in), rnd(n_out, n_in), rnd(b, t, n_out)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    (F.linear(xr, wr) * gy).sum().backward()
    row = RowParallelLinear(n_in, n_out, ctx)
    with torch.no_grad():
        row.weight.copy_(w[:, r * 5:(r + 1) * 5])
    xl = x[..., r * 5:(r + 1) * 5].clone().requires_grad_()
    y = row(xl, sequence_parallel=True)
    _close("row SP out", y, F.linear(x, w)[:, mine])
    (y * gy[:, mine]).sum().backward()
    _close("row SP grad x", xl.grad, xr.grad[..., r * 5:(r + 1) * 5])
    _close("row SP grad w", row.weight.grad, wr.grad[:, r * 5:(r + 1) * 5])
    # RMSNorm over this rank's rows: the gain's gradient summed over tp equals the whole sequence's
    x, w, gy = rnd(b, t, 9), rnd(9), rnd(b, t, 9)
    ref = RMSNorm(9, 1e-5)
    with torch.no_grad():
        ref.weight.copy_(w)
    xr = x.clone().requires_grad_()
    (ref(xr) * gy).sum().backward()
    norm = RMSNorm(9, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(w)
    xl = x[:, mine].clone().requires_grad_()
    y = norm(xl, ctx.tp_group)
    _close("norm SP out", y, ref(x)[:, mine])
    (y * gy[:, mine]).sum().backward()
    _close("norm SP grad x", xl.grad, xr.grad[:, mine])
    _close("norm SP grad gain (summed over tp)", norm.weight.grad, ref.weight.grad)
    local = RMSNorm(9, 1e-5)  # without the sum a rank holds only its rows' part: the test above can fail
    with torch.no_grad():
        local.weight.copy_(w)
    (local(x[:, mine]) * gy[:, mine]).sum().backward()
    assert (local.weight.grad - ref.weight.grad).abs().max() > 1e-3


# ---- the model's forward and gradients ------------------------------------------------------------
def _model_grads(ctx):
    """SP against one process: outputs and every gradient, for sequence lengths divisible by tp and not."""
    from llamactl.model import build_model
    from llamactl.parallel.context import ParallelContext
    from llamactl.parallel.tensor import shard_specs

    cfg = _cfg_model()
    single = ParallelContext.single()
    ref = build_model(cfg, single, seed=1)
    model = build_model(cfg, ctx, seed=1)
    model.sequence_parallel = True
    specs = shard_specs(model)
    rows = []
    model.layers["0"].attention_norm.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[1]))
    g = torch.Generator().manual_seed(2)
    for t, recompute in ((12, False), (9, False), (8, True)):
        ids = torch.randint(0, cfg.vocab_size, (2, t), generator=g)
        split = t % ctx.tp == 0
        assert model.uses_sequence_parallel(t) == split
        for m in (ref, model):
            m.zero_grad(set_to_none=True)
            m.recompute = recompute
        want = ref(ids)
        rows.clear()
        got = model(ids)
        assert rows[0] == (t // ctx.tp if split else t), f"T={t}: the norm saw {rows[0]} rows"
        n = got.shape[-1]
        _close(f"T={t} logits", got, want.narrow(-1, ctx.tp_rank * n, n))
        gy = torch.randn(want.shape, generator=g)
        (want * gy).sum().backward()
        (got * gy.narrow(-1, ctx.tp_rank * n, n)).sum().backward()
        _grads_close(f"T={t} recompute={recompute}", model, ref, specs)
    # memory: a block under SP keeps no whole-sequence activation of the model's width between forward and
    # backward (the gathered input of q|k|v and w1|w3 is gathered again in backward); the plain path keeps some
    t = 4 * ctx.tp
    blk, mine = model.layers["0"], slice(ctx.tp_rank * 4, (ctx.tp_rank + 1) * 4)
    cos, sin = (z.narrow(0, 0, t) for z in model._rope(t, "cpu"))
    x = torch.randn(2, t, cfg.dim, generator=g, requires_grad=True)

    def whole_width(sp: bool) -> list:
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda z: (shapes.append(tuple(z.shape)), z)[1], lambda z: z):
            blk(x[:, mine] if sp else x, cos, sin, sp=sp)
        return [z for z in shapes if len(z) == 3 and z[1] == t and z[2] == cfg.dim]

    assert whole_width(False), "the plain path should keep (B, T, dim) tensors, or this check proves nothing"
    assert not whole_width(True), f"SP kept whole-sequence activations {whole_width(True)}"
    # the norm gains are replicated: every tp rank holds the whole summed gradient (GradNorm counts it once)
    gain = model.layers["1"].ffn_norm.weight.grad
    both = [torch.empty_like(gain) for _ in range(ctx.tp)]
    torch.distributed.all_gather(both, gain, group=ctx.tp_group)
    assert all(torch.equal(x, both[0]) for x in both)
    model.eval()  # evaluation and generation run the plain path
    assert not model.uses_sequence_parallel(12)
    with torch.no_grad():
        model.train()
        assert not model.uses_sequence_parallel(12), "no grad: no SP"


def _mixed_step(ctx):
    """One pipeline_step whose micro-batches have divisible and odd lengths (SP and plain in one step), with
    packed samples (block-diagonal attn_mask and per-sample RoPE positions): loss and gradients equal."""
    from llamactl.data import Batch
    from llamactl.model import build_model
    from llamactl.parallel.context import ParallelContext
    from llamactl.parallel.pipeline import lm_output_loss, pipeline_step
    from llamactl.parallel.tensor import shard_specs
    from llamactl.stages.sft import packed_inputs

    cfg = _cfg_model()
    g = torch.Generator().manual_seed(5)
    mbs = []
    for rows, seq in ((2, 10), (1, 7), (3, 6)):
        w = torch.randint(0, cfg.vocab_size, (rows, seq + 1), generator=g)
        docs = (torch.arange(seq)[None] >= torch.randint(1, seq, (rows, 1), generator=g)).long()
        mbs.append(Batch(w[:, :-1], w[:, 1:], torch.ones(rows, seq, dtype=torch.bool), docs))
    denom = sum(b.num_valid for b in mbs)
    inputs = packed_inputs(cross_attention=False)
    single = ParallelContext.single()
    ref = build_model(cfg, single, seed=3)
    want = pipeline_step(ref, mbs, single, lm_output_loss(single), denom, inputs=inputs)
    model = build_model(cfg, ctx, seed=3)
    model.sequence_parallel = True
    got = pipeline_step(model, mbs, ctx, lm_output_loss(ctx, head=model.output), denom, inputs=inputs)
    assert abs(got.loss - want.loss) <= LOSS_RTOL * want.loss, (got.loss, want.loss)
    _grads_close("mixed step", model, ref, shard_specs(model))


# ---- whole training steps ---------------------------------------------------------------------------
def _train_cfg(zero: bool = False):
    from llamactl.trainer import TrainConfig

    return TrainConfig(steps=STEPS, lr=3e-3, warmup=2, weight_decay=0.1, clip=0.5, zero=zero, bucket_mb=0.02,
                       sequence_parallel=True)


def _train(model, ctx, micro, run_dir, zero=False):
    import json

    import torch.distributed as dist

    from llamactl.trainer import fit

    res = fit(model, ctx, _train_cfg(zero), _Batches(model.cfg.vocab_size, ctx.dp, ctx.dp_rank, micro),
              run_dir=run_dir, show_progress=False)
    assert res.step == STEPS and model.sequence_parallel == (ctx.tp > 1)
    if ctx.world_size > 1:
        dist.barrier()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows], [r["grad_norm"] for r in rows]


def _reference(rank, root, n_layers=2):
    """The 1-process run (SP asked for: a no-op at tp 1), trained on rank 0 and sent to the others."""
    import torch.distributed as dist

    from llamactl.model import build_model
    from llamactl.parallel.context import ParallelContext

    box = [None]
    if rank == 0:
        ctx = ParallelContext.single()
        model = build_model(_cfg_model(n_layers), ctx, seed=0)
        init = {k: v.detach().clone() for k, v in model.named_parameters()}
        losses, norms = _train(model, ctx, 2, root / f"reference{n_layers}")
        moved = min((v.detach() - init[k]).abs().max().item() for k, v in model.named_parameters())
        assert moved > 1e-4, "every tensor must change, or the weight comparison proves little"
        assert min(norms) > _train_cfg().clip, "clipping must be active, or the global norm goes untested"
        box = [(losses, norms, {k: v.detach().clone() for k, v in model.named_parameters()})]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _layout(tp, pp, zero, micro, ref, root, virtual=1, n_layers=2):
    from llamactl.model import build_model
    from llamactl.parallel.context import ParallelContext

    ctx = ParallelContext.from_world(tp, pp, virtual_stages=virtual)
    tag = f"SP tp{ctx.tp} pp{ctx.pp} V{virtual} dp{ctx.dp}{' zero1' if zero else ''} micro {micro}"
    model = build_model(_cfg_model(n_layers), ctx, seed=0)
    calls = []
    model.layers[str(model.layer_ids[0])].ffn_norm.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))
    losses, norms = _train(model, ctx, micro, root / tag.replace(" ", "_"), zero)
    assert calls and set(calls) == {16 // tp}, f"{tag}: the norms saw {set(calls)} positions, not a split sequence"
    assert_equals_one_process(tag, model, losses, norms, ref)


def _two(rank, world, root):
    from llamactl.parallel.context import ParallelContext

    root = Path(root)
    ctx = ParallelContext.from_world(2, 1)
    _ops(ctx)
    _layers(ctx)
    _model_grads(ctx)
    _mixed_step(ctx)
    ref = _reference(rank, root)
    _layout(2, 1, False, 2, ref, root)
    _default_by_backend(ctx)


def _default_by_backend(ctx):
    """On gloo the default (None) is off; True / False are taken as asked; the Trainer applies the choice."""
    from llamactl.model import build_model
    from llamactl.parallel.sequence import use_sequence_parallel
    from llamactl.trainer import Trainer

    assert torch.distributed.get_backend(ctx.tp_group) == "gloo"
    assert use_sequence_parallel(None, ctx) is False
    assert use_sequence_parallel(True, ctx) is True and use_sequence_parallel(False, ctx) is False
    for asked, want in ((None, False), (True, True), (False, False)):
        model = build_model(_cfg_model(), ctx, seed=0)
        Trainer(model, ctx, dataclasses.replace(_train_cfg(), sequence_parallel=asked))
        assert model.sequence_parallel is want, asked


def _four(rank, world, root):
    from llamactl.parallel.context import ParallelContext

    root = Path(root)
    _model_grads(ParallelContext.from_world(4, 1))  # tp 4: the 2 kv heads replicated on 2 ranks each (grad_group)
    ref = _reference(rank, root, n_layers=4)  # 4 layers: 2 chunks of one layer per rank at pp 2 x V 2
    _layout(2, 2, False, 1, ref, root, n_layers=4)  # TP=2 x PP=2: stage inputs split, outputs gathered; 8 micro
    _layout(2, 2, False, 1, ref, root, virtual=2, n_layers=4)  # TP=2 x PP=2 x V=2: split / gathered per chunk
    _layout(2, 1, True, 2, ref, root, n_layers=4)  # TP=2 x DP=2 with ZeRO-1


def test_sequence_parallel_ops_model_and_steps_2_ranks(tmp_path):
    """The SP ops, the model's gradients (divisible / odd T, recompute, packed masks) and 5 training steps at
    tp 2 equal one process."""
    spawn(_two, 2, str(tmp_path))


def test_sequence_parallel_steps_4_ranks(tmp_path):
    """The model's gradients with SP at tp 4 (kv heads replicated); 5 training steps with SP at tp 2 x pp 2,
    tp 2 x dp 2 (ZeRO-1) and tp 2 x pp 2 x V 2 equal one process."""
    spawn(_four, 4, str(tmp_path))


def test_one_process_never_splits():
    """tp 1: whatever is asked, the Trainer leaves SP off (there is no tp group to split over)."""
    from llamactl.model import build_model
    from llamactl.parallel.context import ParallelContext
    from llamactl.trainer import Trainer

    for asked in (True, None, False):
        model = build_model(_cfg_model(), None, seed=0)
        Trainer(model, ParallelContext.single(), dataclasses.replace(_train_cfg(), sequence_parallel=asked))
        assert model.sequence_parallel is False and not model.uses_sequence_parallel(16)
