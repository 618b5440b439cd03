"""Data-parallel communication (parallel/data.py): buckets all-reduced from backward hooks (overlap), ZeRO-1 as a
distributed optimizer (reduce-scatter, sharded AdamW, all-gather), and the bytes each rank sends.

Whole training steps (Trainer.step) at dp 2 and tp 2 x dp 2 against one process; overlap on and off issue the
same collectives on the same buckets, so they agree bit for bit. Bytes are counted by wrapping the
torch.distributed collectives in the spawned ranks, with the ring algorithms' traffic per rank: all-reduce
2 (p-1)/p of the tensor, reduce-scatter and all-gather (p-1)/p of the full (input / output) tensor each.
"""
from __future__ import annotations

import torch

from dist_utils import spawn

STEPS, VOCAB = 2, 256
TOL = 1e-5


def _model(ctx, seed=0):
    from llamactl.config import preset
    from llamactl.model import build_model

    return build_model(preset("tiny", dim=64, n_layers=2, vocab_size=VOCAB), ctx, seed=seed)


def _cfg(**kw):
    from llamactl.trainer import TrainConfig

    # small buckets: the model's gradients go in several; clip 1.0 is active (norms ~1.4)
    return TrainConfig(steps=STEPS, lr=3e-3, warmup=1, weight_decay=0.1, clip=1.0, bucket_mb=0.02,
                       save_dtype="float32", **kw)


def _batches(step, ctx, micro):
    from test_parallel_steps import _micro_batches

    return _micro_batches(step, VOCAB, ctx.dp, ctx.dp_rank, micro)


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _train(ctx, micro=2, loss_fn=None, **kw):
    """STEPS Trainer.steps; returns [(loss, grad norm)], the weights, the trainer."""
    from llamactl.trainer import Trainer

    model = _model(ctx)
    tr = Trainer(model, ctx, _cfg(**kw), loss_fn)
    out = [tr.step(_batches(s, ctx, micro)) for s in range(STEPS)]
    return [(o.loss, o.grad_norm) for o in out], _weights(model), tr


def _same_as_reference(got, ref, ctx, tag):
    from llamactl.parallel.tensor import shard_specs

    (curve, w, tr), (ref_curve, ref_w) = got, ref
    for i, ((loss, norm), (rl, rn)) in enumerate(zip(curve, ref_curve)):
        assert abs(loss - rl) <= TOL * rl, f"{tag}: loss of step {i + 1} {loss!r} != {rl!r}"
        assert abs(norm - rn) <= TOL * rn, f"{tag}: grad norm of step {i + 1} {norm!r} != {rn!r}"
    specs = shard_specs(tr.model)
    for name, p in w.items():
        want, s = ref_w[name], specs.get(name)
        if s is not None:
            want = want.narrow(s.dim, s.start, s.length)
        err = (p - want).abs().max().item()
        assert err <= TOL, f"{tag}: {name} differs from 1 process by {err:.3g} after {STEPS} steps"


def _bitwise(a, b, tag):
    assert a[0] == b[0], f"{tag}: losses / grad norms {a[0]} != {b[0]}"
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]), f"{tag}: {k} differs"


def _reference(rank):
    """The 1-process run, trained on rank 0 and sent to the others (CPU is scarce)."""
    import torch.distributed as dist

    from llamactl.parallel.context import ParallelContext

    box = [None]
    if rank == 0:
        curve, w, _ = _train(ParallelContext.single(), micro=2)
        assert min(n for _, n in curve) > 1.0, "clipping must be active, or the global norm goes untested"
        box = [(curve, w)]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---- counting the bytes on the wire --------------------------------------------------------------------
class Wire:
    """Wraps torch.distributed's collectives: the bytes this rank sends on `group`, by the ring algorithms."""

    def __init__(self, group, size):
        import torch.distributed as dist

        self.dist, self.group, self.size, self.calls, self.saved = dist, group, size, [], {}
        p = size
        full = {  # bytes of the whole tensor the collective works on, and the fraction a rank sends of it
            "all_reduce": (lambda t, **k: t, 2 * (p - 1) / p),
            "reduce_scatter_single": (lambda out, inp, **k: inp, (p - 1) / p),
            "reduce_scatter_tensor": (lambda out, inp, **k: inp, (p - 1) / p),
            "all_gather_single": (lambda out, inp, **k: out, (p - 1) / p),
            "all_gather_into_tensor": (lambda out, inp, **k: out, (p - 1) / p),
        }
        for name, (pick, frac) in full.items():
            self._wrap(name, pick, frac)
        for name in ("all_gather", "reduce_scatter", "broadcast", "reduce", "isend", "send", "batch_isend_irecv"):
            self._wrap(name, None, None)  # anything else on the group fails the count

    def _wrap(self, name, pick, frac):
        real = getattr(self.dist, name, None)
        if real is None:
            return
        self.saved[name] = real

        def wrapped(*args, group=None, **kw):
            if group is self.group:
                if pick is None:
                    raise AssertionError(f"unexpected {name} on the data-parallel group")
                t = pick(*args, **kw)
                self.calls.append((name, t.dtype, t.numel(), frac * t.numel() * t.element_size()))
            return real(*args, group=group, **kw)

        setattr(self.dist, name, wrapped)

    def close(self):
        for name, real in self.saved.items():
            setattr(self.dist, name, real)

    def take(self):
        """(bytes sent in calls of more than 8 elements, the small calls) since the last take."""
        calls, self.calls = self.calls, []
        return sum(b for _, _, n, b in calls if n > 8), [c for c in calls if c[2] <= 8]


def _check_bytes(ctx, zero, micro, tag, steps=STEPS):
    """One step's traffic on the dp group: the gradients' 2 (dp-1)/dp N bytes, plus a few scalars (the batch's
    token count, the loss, the ZeRO-1 norm's partial sum)."""
    from llamactl.parallel.data import chunk_len
    from llamactl.trainer import Trainer

    model = _model(ctx)
    tr = Trainer(model, ctx, _cfg(zero=zero))
    n = sum(p.numel() for p in tr.params)
    padded = sum(ctx.dp * chunk_len(p.numel(), ctx.dp) for p in tr.params)
    assert padded == n, "this model's tensors split evenly over dp; the formula below uses N"
    wire = Wire(ctx.dp_group, ctx.dp)
    try:
        for s in range(steps):
            tr.step(_batches(s, ctx, micro))
            bulk, small = wire.take()
            want = 2 * (ctx.dp - 1) / ctx.dp * n * 4
            assert bulk == want, f"{tag}: step {s + 1} sent {bulk:.0f} bytes of gradients / weights, formula {want:.0f}"
            assert len(small) <= 3 and all(c[0] == "all_reduce" for c in small), f"{tag}: {small}"
    finally:
        wire.close()
    if zero:
        assert tr._reduce.sharded
        held = sum(b.numel() for b in tr._reduce._bufs)
        assert held * ctx.dp == n, f"{tag}: the ZeRO-1 gradient shard holds {held} of {n} elements"
    return tr


# ---- overlap: launched from the hooks of the last micro-batch --------------------------------------------
def _overlap_timeline(ctx, overlap):
    """Where each bucket launches: never before the last micro-batch's backward; with overlap, during it
    (the first launch while earlier layers still wait for their gradients), without it, all in __call__."""
    from llamactl.trainer import Trainer, lm_loss

    model = _model(ctx)
    real = lm_loss(model, ctx)
    seen = []

    def loss_fn(h, batch):  # every forward precedes the last backward at pp 1
        seen.append(tr._reduce._next)
        return real(h, batch)

    loss_fn.needs_hidden = real.needs_hidden
    tr = Trainer(model, ctx, _cfg(overlap_grad_reduce=overlap), loss_fn)
    red = tr._reduce
    launches = []
    launch = red._launch

    def spy_launch():
        done = sum(red._count.get(id(p), 0) == red._micro for p in red.params)
        launches.append((red._micro > 0, done))
        launch()

    red._launch = spy_launch
    micro = 1
    tr.step(_batches(0, ctx, micro))
    n_micro = len(_batches(0, ctx, micro))
    assert n_micro == 4 and seen == [0] * n_micro, seen
    assert len(launches) == len(red.buckets) > 2
    if overlap:
        assert all(armed for armed, _ in launches), "every bucket should launch from a hook"
        assert launches[0][1] < len(red.params), "the first bucket launched after backward had finished"
    else:
        assert not red._hooks and all(not armed for armed, _ in launches)


def _unused_parameter(rank, world):
    """A parameter without gradient counts as zeros (its bucket launches in __call__); ZeRO-1 with odd tensor
    sizes (padded chunks) steps like AdamW on the summed gradient; 3 micro-batches, launches after the 3rd."""
    import torch.distributed as dist

    from llamactl.parallel.context import ParallelContext
    from llamactl.parallel.data import GradReducer, ZeroOptimizer, adamw

    ctx = ParallelContext.from_world()

    def net():
        torch.manual_seed(0)
        m = torch.nn.Module()
        m.unused = torch.nn.Parameter(torch.randn(3))  # created first: last in the reverse bucket order
        m.l1, m.l2 = torch.nn.Linear(7, 5), torch.nn.Linear(5, 3)
        return m

    def backward(m, r, i):
        x = torch.randn(4, 7, generator=torch.Generator().manual_seed(100 * r + i))
        (m.l2(torch.tanh(m.l1(x))) ** 2).sum().backward()

    ref = net()
    for r in range(world):
        for i in range(3):
            backward(ref, r, i)
    want = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in ref.named_parameters()}
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-5)
    for zero in (False, True):
        m = net()
        opt = ZeroOptimizer([{"params": list(m.parameters())}], ctx, **kw) if zero else None
        red = GradReducer(m.parameters(), ctx, bucket_mb=1e-6, overlap=True, optimizer=opt)
        assert len(red.buckets) == 5 and red.buckets[-1] == [m.unused]
        red.begin(3)
        for i in range(3):
            assert red._next == 0, "a bucket launched before the last micro-batch's backward"
            backward(m, rank, i)
        assert red._next == len(red.buckets) - 1, "the filled buckets launch during backward"
        if not zero:  # backward accumulated straight into the buckets (gradients are views of them)
            storages = {b.untyped_storage().data_ptr() for b in red._bufs}
            assert all(p.grad.untyped_storage().data_ptr() in storages for p in m.parameters())
        grads = red()
        if not zero:
            for n, p in m.named_parameters():
                torch.testing.assert_close(p.grad, want[n], rtol=1e-6, atol=1e-7, msg=n)
            continue
        assert all(p.grad is None for p in m.parameters()), "ZeRO-1 keeps only the shard's gradient"
        for p, a, b, master in opt.slices:
            name = next(n for n, q in m.named_parameters() if q is p)
            torch.testing.assert_close(master.grad, want[name].reshape(-1)[a:b], rtol=1e-6, atol=1e-7)
        assert [id(g) for g in grads] == [id(g) for g in opt.masters]
        opt.step()
        plain = adamw([{"params": list(ref.parameters())}], **kw)
        for n, p in ref.named_parameters():
            p.grad = want[n].clone()
        plain.step()
        for (n, p), q in zip(m.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7, msg=n)
    dist.barrier()


def _resume(ctx, root):
    """ZeRO-1 + overlap: 1 step, checkpoint, a fresh trainer loads it, 1 more step == 2 steps straight."""
    from llamactl.trainer import Trainer

    _, straight, _ = _train(ctx, zero=True)
    tr = Trainer(_model(ctx), ctx, _cfg(zero=True))
    tr.step(_batches(0, ctx, 2))
    path = tr.save(root / "ckpt")
    again = Trainer(_model(ctx, seed=5), ctx, _cfg(zero=True))
    again.load(path)
    again.step(_batches(1, ctx, 2))
    for k, v in _weights(again.model).items():
        assert torch.equal(v, straight[k]), f"resumed ZeRO-1: {k} differs from the straight run"


def _two(rank, world, root):
    from pathlib import Path

    from llamactl.parallel.context import ParallelContext

    ref = _reference(rank)
    ctx = ParallelContext.from_world()
    assert ctx.dp == 2
    runs = {}
    for zero in (False, True):
        for overlap in (True, False):
            tag = f"dp2{' zero1' if zero else ''} overlap {overlap}"
            runs[tag] = got = _train(ctx, micro=1, zero=zero, overlap_grad_reduce=overlap)
            assert got[2]._reduce.sharded == zero and len(got[2]._reduce.buckets) > 2
            _same_as_reference(got, ref, ctx, tag)
    _bitwise(runs["dp2 overlap True"], runs["dp2 overlap False"], "dp2 overlap on / off")
    _bitwise(runs["dp2 zero1 overlap True"], runs["dp2 zero1 overlap False"], "dp2 zero1 overlap on / off")
    _overlap_timeline(ctx, True)
    _overlap_timeline(ctx, False)
    _check_bytes(ctx, False, 2, "dp2 all-reduce")
    _check_bytes(ctx, True, 2, "dp2 zero1")
    _resume(ctx, Path(root))
    _unused_parameter(rank, world)


def _four(rank, world):
    """tp 2 x dp 2: ZeRO-1 with overlap equals one process; each rank's bytes follow its tp shard's N."""
    from llamactl.parallel.context import ParallelContext

    ref = _reference(rank)
    ctx = ParallelContext.from_world(tp=2)
    assert ctx.dp == 2
    _same_as_reference(_train(ctx, micro=1, zero=True), ref, ctx, "tp2 x dp2 zero1 overlap")
    _same_as_reference(_train(ctx, micro=2), ref, ctx, "tp2 x dp2 overlap")
    _check_bytes(ctx, True, 2, "tp2 x dp2 zero1")
    _check_bytes(ctx, False, 1, "tp2 x dp2 all-reduce", steps=1)


def test_dp2_overlap_zero1_bytes_and_resume(tmp_path):
    """dp 2: overlap on / off and ZeRO-1 equal one process (on / off bit for bit), launch timeline, bytes per step
    against the ring formula, ZeRO-1 exact resume, a parameter without gradient."""
    spawn(_two, 2, str(tmp_path))


def test_tp2_dp2_zero1_overlap():
    """tp 2 x dp 2: ZeRO-1 and plain dp with overlap equal one process; bytes per rank of its tp shard."""
    spawn(_four, 4)


def test_pack_unpack_rank_major():
    """The ZeRO-1 chunk layout: rank r's columns hold flat elements [r*c, (r+1)*c), zero padded; unpack inverts."""
    from llamactl.parallel.data import _pack, _unpack, chunk_len

    for n in (1, 5, 12, 35):
        for dp in (1, 2, 3, 4, 7):
            c = chunk_len(n, dp)
            x = torch.arange(1, n + 1, dtype=torch.float32)
            buf = torch.full((dp, c + 3), -1.0)
            _pack(buf[:, 1:1 + c], x)
            want = torch.cat([x, torch.zeros(dp * c - n)]).view(dp, c)
            assert torch.equal(buf[:, 1:1 + c], want), (n, dp)
            assert bool((buf[:, 0] == -1).all() and (buf[:, 1 + c:] == -1).all()), "wrote outside its columns"
            y = torch.zeros(n)
            _unpack(y, buf[:, 1:1 + c])
            assert torch.equal(y, x), (n, dp)
