"""Reused CPU blocks for per-step tensors (parallel/buffers.py): reused only when nobody holds them."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llamactl.parallel import buffers
from llamactl.parallel.context import ParallelContext
from llamactl.parallel.head_loss import lm_head_cross_entropy
from llamactl.parallel.tensor import ColumnParallelLinear, VocabParallelEmbedding


def test_block_is_reused_only_when_released():
    buffers.clear()
    a = buffers.reusable("t", (4, 5), torch.float32, "cpu")
    b = buffers.reusable("t", (4, 5), torch.float32, "cpu")  # a is still held: a second block
    assert a.data_ptr() != b.data_ptr()
    ptr_a, ptr_b = a.data_ptr(), b.data_ptr()
    del a
    c = buffers.reusable("t", (4, 5), torch.float32, "cpu")  # a's block is free again: reused
    assert c.data_ptr() == ptr_a
    c.fill_(1.0)
    view_of_b = b[1:]
    del b
    d = buffers.reusable("t", (4, 5), torch.float32, "cpu")  # c held, b's block held through a view
    assert d.data_ptr() not in (ptr_a, ptr_b) and torch.equal(c, torch.ones(4, 5))
    assert view_of_b.data_ptr() == ptr_b + 5 * 4
    assert buffers.reusable("t", (2, 3), torch.float32, "meta").device.type == "meta"  # plain empty elsewhere
    buffers.clear()


def _tiny(seed=0):
    torch.manual_seed(seed)
    ctx = ParallelContext.single()
    emb, head = VocabParallelEmbedding(50, 8, ctx), ColumnParallelLinear(8, 50, ctx)
    for p in (emb.weight, head.weight):
        torch.nn.init.normal_(p)
    return emb, head, ctx


def _loss(emb, head, ctx, ids, y):
    return lm_head_cross_entropy(emb(ids).tanh(), head, y, ctx, reduction="mean")


def test_gradients_match_plain_autograd_and_reuse_blocks():
    buffers.clear()
    emb, head, ctx = _tiny()
    ids = torch.randint(0, 50, (3, 11), generator=torch.Generator().manual_seed(1))
    ids[0, :4] = 7  # repeated ids: their rows are summed
    y = torch.randint(0, 50, (3, 11), generator=torch.Generator().manual_seed(2))
    ref_w, ref_h = emb.weight.detach().clone().requires_grad_(), head.weight.detach().clone().requires_grad_()
    ref = F.cross_entropy(F.linear(F.embedding(ids, ref_w).tanh(), ref_h).view(-1, 50), y.view(-1))
    ref.backward()
    ptrs = None
    for _ in range(3):
        _loss(emb, head, ctx, ids, y).backward()
        torch.testing.assert_close(emb.weight.grad, ref_w.grad, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(head.weight.grad, ref_h.grad, rtol=1e-6, atol=1e-7)
        assert buffers.pooled(emb.weight.grad) and buffers.pooled(head.weight.grad)  # kept as .grad, no copy
        now = (emb.weight.grad.data_ptr(), head.weight.grad.data_ptr())
        assert ptrs is None or now == ptrs  # the same blocks every step once zero_grad released them
        ptrs = now
        emb.weight.grad = head.weight.grad = None
    buffers.clear()


def test_held_gradients_are_never_overwritten_and_accumulation_sums():
    buffers.clear()
    emb, head, ctx = _tiny()
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randint(0, 50, (2, 9), generator=gen), torch.randint(0, 50, (2, 9), generator=gen)) for _ in range(2)]
    _loss(emb, head, ctx, *batches[0]).backward()
    kept = (emb.weight.grad, head.weight.grad)  # a user keeps the gradients past zero_grad
    copies = [g.clone() for g in kept]
    emb.weight.grad = head.weight.grad = None
    _loss(emb, head, ctx, *batches[1]).backward()  # must not write into the kept tensors
    assert all(torch.equal(k, c) for k, c in zip(kept, copies))
    second = [g.clone() for g in (emb.weight.grad, head.weight.grad)]
    emb.weight.grad = head.weight.grad = None
    for ids, y in batches:  # two micro-batches accumulate into the same .grad
        _loss(emb, head, ctx, ids, y).backward()
    for g, a, b in zip((emb.weight.grad, head.weight.grad), copies, second):
        torch.testing.assert_close(g, a + b, rtol=1e-6, atol=1e-7)
    buffers.clear()
