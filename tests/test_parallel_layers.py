"""Tensor-parallel layers against a single-device reference (Megatron-style), gloo world sizes 2 and 4.

Each spawn runs every check (process start-up is the expensive part). Sizes are odd where the layout
allows it; fp32 max error <= 1e-6 against the plain torch computation with the same global tensors
(absolute for tensors of magnitude <= 1, relative to the largest magnitude above that: a sum of products
of unit normals carries fp32 rounding proportional to its size, whatever the summation order).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_utils import spawn

TOL = 1e-6


def _close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = TOL) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got.detach().double() - want.detach().double()).abs().max().item()
    tol = tol * max(1.0, want.detach().abs().max().item()) if want.numel() else tol
    assert err <= tol, f"{name}: max error {err:.3g} > {tol}"


def _column(ctx, rnd, world):
    from llamactl.parallel.tensor import ColumnParallelLinear, TPShard

    b, t, n_in, n_out = 3, 5, 13, 3 * world
    for gather in (False, True):
        x, w, gy = rnd(b, t, n_in), rnd(n_out, n_in), rnd(b, t, n_out)
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        yr = F.linear(xr, wr)
        (yr * gy).sum().backward()
        layer = ColumnParallelLinear(n_in, n_out, ctx, gather_output=gather)
        s = layer.tp_shards.get("weight", TPShard(0, 0, n_out, n_out))
        assert (s.dim, s.start, s.length, s.full) == (0, ctx.tp_rank * 3, 3, n_out)
        with torch.no_grad():
            layer.weight.copy_(w.narrow(0, s.start, s.length))
        xl = x.clone().requires_grad_()
        y = layer(xl)
        if gather:
            _close("column(gather) out", y, yr)
            (y * gy).sum().backward()
        else:
            _close("column out", y, yr.narrow(-1, s.start, s.length))
            (y * gy.narrow(-1, s.start, s.length)).sum().backward()
        _close(f"column(gather={gather}) grad x", xl.grad, xr.grad)
        _close(f"column(gather={gather}) grad w", layer.weight.grad, wr.grad.narrow(0, s.start, s.length))


def _row(ctx, rnd, world):
    from llamactl.parallel.tensor import RowParallelLinear, TPShard

    b, t, n_in, n_out = 3, 5, 5 * world, 7
    for parallel_in in (True, False):
        x, w, gy = rnd(b, t, n_in), rnd(n_out, n_in), rnd(b, t, n_out)
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        yr = F.linear(xr, wr)
        (yr * gy).sum().backward()
        layer = RowParallelLinear(n_in, n_out, ctx, input_is_parallel=parallel_in)
        s = layer.tp_shards.get("weight", TPShard(1, 0, n_in, n_in))
        assert (s.dim, s.start, s.length, s.full) == (1, ctx.tp_rank * 5, 5, n_in)
        with torch.no_grad():
            layer.weight.copy_(w.narrow(1, s.start, s.length))
        xl = (x.narrow(-1, s.start, s.length) if parallel_in else x).clone().requires_grad_()
        y = layer(xl)
        _close("row out", y, yr)
        (y * gy).sum().backward()
        want_gx = xr.grad.narrow(-1, s.start, s.length) if parallel_in else xr.grad
        _close(f"row(parallel_in={parallel_in}) grad x", xl.grad, want_gx)
        _close(f"row(parallel_in={parallel_in}) grad w", layer.weight.grad, wr.grad.narrow(1, s.start, s.length))


def _embedding(ctx, rnd, world):
    from llamactl.parallel.tensor import TPShard, VocabParallelEmbedding

    vocab, dim = 7 * world, 9
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (3, 5), generator=g)
    ids[0, :world] = torch.arange(world) * 7  # the first id of every shard
    ids[1, :world] = torch.arange(world) * 7 + 6  # and the last
    w, gy = rnd(vocab, dim), rnd(3, 5, dim)
    wr = w.clone().requires_grad_()
    yr = F.embedding(ids, wr)
    (yr * gy).sum().backward()
    emb = VocabParallelEmbedding(vocab, dim, ctx)
    s = emb.tp_shards.get("weight", TPShard(0, 0, vocab, vocab))
    with torch.no_grad():
        emb.weight.copy_(w.narrow(0, s.start, s.length))
    y = emb(ids)
    _close("embedding out", y, yr)
    (y * gy).sum().backward()
    _close("embedding grad w", emb.weight.grad, wr.grad.narrow(0, s.start, s.length))


def _cross_entropy(ctx, rnd, world):
    from llamactl.parallel.tensor import vocab_parallel_cross_entropy

    vocab = 11 * world
    n = vocab // world
    lo = ctx.tp_rank * n
    g = torch.Generator().manual_seed(11)
    for ignore in (-100, 3):
        logits = rnd(3, 5, vocab) * 3
        target = torch.randint(0, vocab, (3, 5), generator=g)
        target[0, 0], target[1, 2], target[2, 4] = ignore, ignore, ignore
        target[0, 1], target[0, 2] = 0, vocab - 1  # first and last id of the vocab
        valid = target != ignore
        for reduction in ("none", "sum", "mean"):
            lr_ = logits.clone().requires_grad_()
            ref = F.cross_entropy(lr_.view(-1, vocab), target.view(-1), reduction=reduction,
                                  ignore_index=ignore)
            gy = rnd(3, 5) if reduction == "none" else torch.tensor(1.7)
            ref = ref.view(3, 5) if reduction == "none" else ref
            (ref * gy).sum().backward()
            ll = logits.narrow(-1, lo, n).clone().requires_grad_()
            got = vocab_parallel_cross_entropy(ll, target, ctx, reduction=reduction, ignore_index=ignore)
            _close(f"CE {reduction} ignore={ignore}", got, ref)
            (got * gy).sum().backward()
            _close(f"CE {reduction} ignore={ignore} grad", ll.grad, lr_.grad.narrow(-1, lo, n))
            if reduction == "none":
                logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                _close("per-token log-probs", (-got)[valid], logp[valid])
                assert bool((got[~valid] == 0).all()), "ignored positions must have zero loss"


def _head_loss(ctx, rnd, world):
    """Fused lm head + cross-entropy on a vocab-sharded head vs full logits on one device."""
    from llamactl.parallel.head_loss import lm_head_cross_entropy
    from llamactl.parallel.tensor import ColumnParallelLinear

    vocab, dim = 13 * world, 7
    n = vocab // world
    g = torch.Generator().manual_seed(13)
    for reduction, block_rows in (("sum", 4), ("mean", None)):
        w, h = rnd(vocab, dim), rnd(3, 5, dim)
        target = torch.randint(0, vocab, (3, 5), generator=g)
        target[0, 0], target[2, 3] = -100, -100
        target[0, 1], target[0, 2] = 0, vocab - 1
        hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
        ref = F.cross_entropy(F.linear(hr, wr).view(-1, vocab), target.view(-1), reduction=reduction)
        (ref * 1.7).backward()
        head = ColumnParallelLinear(dim, vocab, ctx)
        with torch.no_grad():
            head.weight.copy_(w.narrow(0, ctx.tp_rank * n, n))
        hp = h.clone().requires_grad_()
        got = lm_head_cross_entropy(hp, head, target, ctx, reduction=reduction, block_rows=block_rows)
        _close(f"head CE {reduction}", got, ref)
        (got * 1.7).backward()
        _close(f"head CE {reduction} grad h", hp.grad, hr.grad)
        _close(f"head CE {reduction} grad w", head.weight.grad, wr.grad.narrow(0, ctx.tp_rank * n, n))


def _model_configs(world):
    """(n_heads, n_kv_heads) covering kv heads split over tp and replicated on query groups."""
    from llamactl.config import ModelConfig

    shapes = [(2 * world, world), (2 * world, world // 2 or 1), (world, 1)]
    if world == 4:
        shapes.append((4, 4))  # plain multi-head attention, one head per rank
    for heads, kv in shapes:
        yield ModelConfig(dim=heads * 6, n_layers=2, n_heads=heads, n_kv_heads=kv, vocab_size=17 * 4,
                          multiple_of=4, max_seq_len=16)


def _transformer(ctx, world):
    """Whole model (embedding, GQA attention, SwiGLU, norm, vocab-parallel head) at tp vs tp=1."""
    from llamactl.model import build_model
    from llamactl.parallel.tensor import shard_specs, vocab_parallel_cross_entropy
    from llamactl.parallel.context import ParallelContext

    single = ParallelContext.single()
    g = torch.Generator().manual_seed(3)
    for cfg in _model_configs(world):
        for head in ("lm", "value"):
            ids = torch.randint(0, cfg.vocab_size, (3, 7), generator=g)
            target = torch.randint(0, cfg.vocab_size, (3, 7), generator=g)
            target[1, :3] = -100
            ref = build_model(cfg, single, head, seed=5)
            par = build_model(cfg, ctx, head, seed=5)
            if cfg.kv_heads < world:
                assert par.layers["0"].attention.wk.grad_group is not None, "replicated kv needs a grad group"
            out_r, out_p = ref(ids), par(ids)
            tag = f"heads={cfg.n_heads} kv={cfg.kv_heads} {head}"
            if head == "lm":
                n = cfg.vocab_size // world
                _close(f"{tag} logits", out_p, out_r.narrow(-1, ctx.tp_rank * n, n))
                loss_r = vocab_parallel_cross_entropy(out_r, target, single)
                loss_p = vocab_parallel_cross_entropy(out_p, target, ctx)
            else:
                _close(f"{tag} values", out_p, out_r)
                loss_r, loss_p = (out_r ** 2).mean(), (out_p ** 2).mean()
            _close(f"{tag} loss", loss_p, loss_r)
            loss_r.backward()
            loss_p.backward()
            ref_p = dict(ref.named_parameters())
            specs = shard_specs(par)
            assert set(ref_p) == {k for k, _ in par.named_parameters()}
            for name, p in par.named_parameters():
                want = ref_p[name].grad
                s = specs.get(name)
                if s is not None:
                    want = want.narrow(s.dim, s.start, s.length)
                    _close(f"{tag} weight {name}", p, ref_p[name].detach().narrow(s.dim, s.start, s.length))
                _close(f"{tag} grad {name}", p.grad, want)


def _all_checks(rank, world):
    from llamactl.parallel.context import ParallelContext

    ctx = ParallelContext.from_world(tp=world)
    assert (ctx.tp, ctx.dp, ctx.pp, ctx.tp_rank) == (world, 1, 1, rank)
    gen = torch.Generator().manual_seed(1234)  # same stream on every rank: same global tensors

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    _column(ctx, rnd, world)
    _row(ctx, rnd, world)
    _embedding(ctx, rnd, world)
    _cross_entropy(ctx, rnd, world)
    _head_loss(ctx, rnd, world)
    _transformer(ctx, world)


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_layers_match_single_device(world):
    spawn(_all_checks, world)


def test_single_process_layers_need_no_group():
    """tp == 1 degenerates to plain layers, and CE matches torch at odd vocab."""
    from llamactl.parallel.context import ParallelContext

    ctx = ParallelContext.single()
    gen = torch.Generator().manual_seed(0)
    _column(ctx, lambda *s: torch.randn(*s, generator=gen), 1)
    _row(ctx, lambda *s: torch.randn(*s, generator=gen), 1)
    _embedding(ctx, lambda *s: torch.randn(*s, generator=gen), 1)
    _cross_entropy(ctx, lambda *s: torch.randn(*s, generator=gen), 1)
    _head_loss(ctx, lambda *s: torch.randn(*s, generator=gen), 1)


def test_bad_layouts_are_one_line_errors():
    from llamactl.config import preset
    from llamactl.parallel.context import LayoutError, ParallelContext

    tiny = preset("tiny")
    args = (tiny.n_heads, tiny.kv_heads, tiny.n_layers, tiny.vocab_size, tiny.ffn_dim)
    with pytest.raises(LayoutError, match="--tp 3 does not divide the 4 attention heads"):
        ParallelContext(tp=3).validate(*args)
    with pytest.raises(LayoutError, match="--pp 5 is larger than the 4 layers"):
        ParallelContext(pp=5).validate(*args)
    with pytest.raises(LayoutError, match="needs 4 processes"):
        ParallelContext.from_world(tp=2, pp=2)
