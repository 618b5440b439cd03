"""The fused lm head + cross-entropy against the plain path (full logits, then F.cross_entropy)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llamactl.parallel.context import ParallelContext
from llamactl.parallel.head_loss import lm_head_cross_entropy
from llamactl.parallel.tensor import ColumnParallelLinear

CTX = ParallelContext.single()


def _setup(tokens=(3, 7), dim=9, vocab=37, ignore=-100, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = ColumnParallelLinear(dim, vocab, CTX)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, dim, generator=g) * 0.5)
    h = torch.randn(*tokens, dim, generator=g)
    target = torch.randint(0, vocab, tokens, generator=g)
    target.view(-1)[::5] = ignore
    target.view(-1)[1], target.view(-1)[2] = 0, vocab - 1
    return head, h, target


def _plain(head, h, target, reduction, ignore=-100):
    hr = h.clone().requires_grad_()
    wr = head.weight.detach().clone().requires_grad_()
    logits = F.linear(hr, wr)
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), target.view(-1), reduction=reduction,
                           ignore_index=ignore)
    (loss * 1.3).backward()
    return loss, hr.grad, wr.grad


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("block_rows", [None, 1, 3, 8])
@pytest.mark.parametrize("ignore", [-100, 4])
def test_matches_full_logits_path(reduction, block_rows, ignore):
    head, h, target = _setup(ignore=ignore)
    want, want_dh, want_dw = _plain(head, h, target, reduction, ignore)
    hg = h.clone().requires_grad_()
    got = lm_head_cross_entropy(hg, head, target, CTX, reduction=reduction, ignore_index=ignore,
                                block_rows=block_rows)
    (got * 1.3).backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hg.grad, want_dh, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, want_dw, rtol=1e-6, atol=1e-6)


def test_grads_accumulate_over_micro_batches():
    head, h, target = _setup()
    for half in (slice(0, 2), slice(2, 3)):
        lm_head_cross_entropy(h[half], head, target[half], CTX, block_rows=4).backward()
    _, _, want_dw = _plain(head, h, target, "sum")
    torch.testing.assert_close(head.weight.grad * 1.3, want_dw, rtol=1e-6, atol=1e-6)


def test_no_grad_evaluation_computes_only_the_loss():
    head, h, target = _setup()
    want, _, _ = _plain(head, h, target, "sum")
    with torch.no_grad():
        got = lm_head_cross_entropy(h, head, target, CTX, block_rows=2)
    torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-6)
    assert head.weight.grad is None


def test_frozen_head_gives_only_hidden_grad():
    head, h, target = _setup()
    head.weight.requires_grad_(False)
    hg = h.clone().requires_grad_()
    lm_head_cross_entropy(hg, head, target, CTX).backward()
    _, want_dh, _ = _plain(head, h, target, "sum")
    torch.testing.assert_close(hg.grad * 1.3, want_dh, rtol=1e-6, atol=1e-6)
    assert head.weight.grad is None


def test_bf16_autocast_within_bf16_tolerance():
    head, h, target = _setup(dim=32, vocab=64)
    hr = h.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(hr)
        want = F.cross_entropy(logits.float().view(-1, 64), target.view(-1), reduction="sum")
    want.backward()
    want_dw = head.weight.grad.clone()
    head.weight.grad = None
    hg = h.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lm_head_cross_entropy(hg, head, target, CTX, block_rows=5)
    got.backward()
    assert got.dtype == torch.float32 and head.weight.grad.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(hg.grad, hr.grad, rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(head.weight.grad, want_dw, rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("block_rows", [None, 1, 4])
@pytest.mark.parametrize("ignore", [-100, 4])
def test_per_token_mode_matches_full_logits_path(block_rows, ignore):
    """reduction="none": per-token values and, for per-token incoming gradients, d hidden and d weight."""
    head, h, target = _setup(ignore=ignore)
    gw = torch.randn(target.shape, generator=torch.Generator().manual_seed(9))  # e.g. PPO advantages
    hr = h.clone().requires_grad_()
    wr = head.weight.detach().clone().requires_grad_()
    logits = F.linear(hr, wr)
    want = F.cross_entropy(logits.view(-1, logits.shape[-1]), target.view(-1), reduction="none",
                           ignore_index=ignore).view(target.shape)
    (want * gw).sum().backward()
    hg = h.clone().requires_grad_()
    got = lm_head_cross_entropy(hg, head, target, CTX, reduction="none", ignore_index=ignore,
                                block_rows=block_rows)
    assert got.shape == target.shape and bool((got[target == ignore] == 0).all())
    (got * gw).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hg.grad, hr.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, wr.grad, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # no-grad scoring: values only, nothing kept for a backward
        again = lm_head_cross_entropy(h, head, target, CTX, reduction="none", ignore_index=ignore)
    torch.testing.assert_close(again, want.detach(), rtol=1e-6, atol=1e-6)


def test_bad_arguments_are_clear_errors():
    head, h, target = _setup()
    with pytest.raises(ValueError, match="reduction"):
        lm_head_cross_entropy(h, head, target, CTX, reduction="max")
    with pytest.raises(ValueError, match="does not match"):
        lm_head_cross_entropy(h, head, target[:, :3], CTX)


def test_second_backward_raises_instead_of_reusing_scaled_grads():
    head, h, target = _setup()
    hg = h.clone().requires_grad_()
    loss = lm_head_cross_entropy(hg, head, target, CTX)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_empty_batch_gives_zero_loss_and_grads():
    head, h, target = _setup()
    hg = h[:0].clone().requires_grad_()
    loss = lm_head_cross_entropy(hg, head, target[:0], CTX, reduction="mean")
    loss.backward()
    assert float(loss.detach()) == 0.0 and bool((head.weight.grad == 0).all())


# ---- the native CPU cross-entropy (kernels/csrc/cpu: softmax_xent) --------------------------------------
def _xent_case(rows, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * 4
    t = torch.randint(0, vocab, (rows,), generator=g)
    t[0], t[-1] = 0, vocab - 1
    in_range = torch.ones(rows, dtype=torch.bool)
    in_range[1::4] = False  # ignored targets: no one-hot, loss log(sum exp(x - max)) (the caller drops it)
    return x, t.masked_fill(~in_range, 0).unsqueeze(-1), in_range


@pytest.mark.parametrize("rows,vocab", [(13, 1), (13, 7), (9, 37), (5, 1000), (4, 32000), (3, 4097)])
def test_native_xent_equals_torch_ops(fused_cpu, monkeypatch, rows, vocab):
    """Same results as the chunked torch-op path (and a float64 reference), in place and out of place."""
    from llamactl.parallel import tensor as tp_mod

    x, lt, in_range = _xent_case(rows, vocab)
    assert tp_mod._native_xent(x, x)  # fp32 CPU rows take the native path once the kernels are built
    got = x.clone()
    loss = tp_mod.softmax_xent_(got, got, lt, in_range, None)
    out = torch.empty_like(x)
    loss2 = tp_mod.softmax_xent_(x, out, lt, in_range, None)
    assert torch.equal(out, got) and torch.equal(loss2, loss)
    monkeypatch.setattr(tp_mod, "_native_xent", lambda a, b: False)
    want = x.clone()
    want_loss = tp_mod.softmax_xent_(want, want, lt, in_range, None)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    x64 = x.double()
    lse = torch.logsumexp(x64, -1)
    ref_loss = torch.where(in_range, lse - x64.gather(-1, lt).squeeze(-1), lse - x64.amax(-1))
    ref_grad = torch.softmax(x64, -1)
    ref_grad[in_range.nonzero().squeeze(-1), lt[in_range].squeeze(-1)] -= 1
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.double(), ref_grad, rtol=0, atol=3e-7)


def test_native_xent_runs_in_the_fused_head(fused_cpu, monkeypatch):
    """On CPU with the fused kernels the head's cross-entropy goes through the native op."""
    from llamactl.parallel import tensor as tp_mod

    head, h, target = _setup(vocab=37)
    assert tp_mod._native_xent(h, h)  # fp32 CPU rows take the native path once the kernels are built
    calls = []
    real = torch.ops.llamactl_cpu.softmax_xent_

    class Spy:
        def softmax_xent_(self, *a):
            calls.append(a[0].shape)
            return real(*a)

    monkeypatch.setattr(torch.ops, "llamactl_cpu", Spy())
    lm_head_cross_entropy(h.clone().requires_grad_(), head, target, CTX, reduction="sum").backward()
    assert calls


def test_native_xent_rejects_bad_input(fused_cpu):
    from llamactl.parallel import tensor as tp_mod

    x, lt, in_range = _xent_case(3, 11)
    assert tp_mod._native_xent(x, x)  # fp32 CPU rows take the native path once the kernels are built
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.llamactl_cpu.softmax_xent_(x, x.clone(), torch.full_like(lt, 11), in_range)
    with pytest.raises(RuntimeError, match="one entry per row"):
        torch.ops.llamactl_cpu.softmax_xent_(x, x.clone(), lt[:2], in_range)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.llamactl_cpu.softmax_xent_(x.double(), x.double(), lt, in_range)
