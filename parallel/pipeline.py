"""Pipeline parallelism: stage partitioning, p2p of activations / gradients, and the 1F1B schedule.

Every stage holds `layers.{i}` for its own global indices i (embedding on the first stage, norm + head
on the last). One optimizer step runs the micro-batches through the non-interleaved 1F1B schedule
(PipeDream-flush, as in Megatron-LM): stage s first runs min(P-s-1, M) warm-up forwards, then
alternates one forward and one backward, then drains the remaining backwards. It needs no more
micro-batches than stages (M < P simply leaves stages idle for longer), and at P == 1 it is plain
gradient accumulation.

The loss of every micro-batch is its *summed* loss divided by `denom`, the number of valid tokens of
the whole global batch (all micro-batches on all data-parallel ranks), so any split of the batch gives
the gradient of one big batch and the data-parallel reduction is a sum.

One loss signature serves every layout: `loss_fn(output, batch)` returns the summed loss over the batch's
valid units, or (summed loss, {metric: summed value}). The step runs the model; the loss only scores its
output. `loss_fn.needs_hidden = True` asks for the final hidden states instead of the head's output (the
loss applies the head itself: the fused LM head loss). Per-batch model inputs beyond the token ids come
from `inputs(batch) -> (token ids, {keyword: tensor})`: the ids feed the first stage, the keywords go to
every stage's forward (per-document positions of packed SFT samples, key masks, ...). By default a
batch with a `model_inputs()` method supplies the keywords.

Activations are sent with isend/irecv on the tensor's device (gloo and NCCL alike); their shape is
(micro_batch, seq, dim), known from the micro-batch on every rank, so no shape exchange is needed
(micro-batches of one step may differ in length).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from llamactl.parallel.context import ParallelContext


def stage_layers(n_layers: int, pp: int, pp_rank: int) -> range:
    """Global indices of the layers held by pipeline stage `pp_rank`, balanced (earlier stages take the
    remainder last, since the first stage also holds the embedding and the last the norm + head)."""
    base, extra = divmod(n_layers, pp)
    # give the extra layers to the middle stages first: the ends carry embedding / head
    counts = [base] * pp
    order = sorted(range(pp), key=lambda s: (s in (0, pp - 1), s))
    for s in order[:extra]:
        counts[s] += 1
    start = sum(counts[:pp_rank])
    return range(start, start + counts[pp_rank])


@dataclass
class StepOutput:
    """One global batch's result: the mean loss over its valid units and each summed metric / denom, the same
    on every rank. The trainer fills the optimizer's part (grad norm, lr, tokens) after the update."""

    loss: float
    extras: dict[str, float] = field(default_factory=dict)
    grad_norm: float | None = None
    lr: float | None = None
    tokens: int = 0                 # tokens of this global batch (all dp ranks)


def batch_inputs(batch) -> tuple[torch.Tensor, dict[str, Any]]:
    """(token ids for the first stage, keyword inputs for every stage's forward) of a micro-batch."""
    more = getattr(batch, "model_inputs", None)
    return batch.tokens, (more() if more is not None else {})


def _sum_loss(res, total: torch.Tensor, extras: dict[str, torch.Tensor]) -> torch.Tensor:
    """Add one micro-batch's loss_fn result to the running sums; return its summed loss (with grad)."""
    loss_sum, more = res if isinstance(res, tuple) else (res, {})
    total += loss_sum.detach().to(torch.float64)
    for k, v in more.items():
        v = torch.as_tensor(v, dtype=torch.float64).detach().to(total.device)
        extras[k] = extras.get(k, torch.zeros((), dtype=torch.float64, device=total.device)) + v
    return loss_sum


# ---- p2p ------------------------------------------------------------------------------------------
class _P2P:
    """Point-to-point with the neighbouring stages (same tp and dp coordinates)."""

    def __init__(self, ctx: ParallelContext, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        s = ctx.pp_rank
        self.prev = ctx.pp_ranks[s - 1] if s > 0 else None
        self.next = ctx.pp_ranks[s + 1] if s < ctx.pp - 1 else None

    def _run(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[tuple, int]]) -> list[torch.Tensor]:
        ops, bufs = [], []
        for t, peer in sends:
            ops.append(dist.P2POp(dist.isend, t.detach().to(self.dtype).contiguous(), peer))
        for shape, peer in recvs:
            buf = torch.empty(shape, dtype=self.dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, buf, peer))
            bufs.append(buf)
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        return bufs

    def recv_forward(self, shape) -> torch.Tensor | None:
        if self.prev is None:
            return None
        return self._run([], [(shape, self.prev)])[0].requires_grad_()

    def send_forward(self, y: torch.Tensor) -> None:
        if self.next is not None:
            self._run([(y, self.next)], [])

    def recv_backward(self, shape) -> torch.Tensor | None:
        if self.next is None:
            return None
        return self._run([], [(shape, self.next)])[0]

    def send_backward(self, gx: torch.Tensor | None) -> None:
        if self.prev is not None:
            self._run([(gx, self.prev)], [])

    def send_forward_recv_backward(self, y: torch.Tensor, shape) -> torch.Tensor | None:
        if self.next is None:
            return None
        return self._run([(y, self.next)], [(shape, self.next)])[0]

    def send_backward_recv_forward(self, gx: torch.Tensor | None, shape) -> torch.Tensor | None:
        if self.prev is None:
            return None
        return self._run([(gx, self.prev)], [(shape, self.prev)])[0].requires_grad_()


# ---- the schedule ---------------------------------------------------------------------------------
def pipeline_step(model: torch.nn.Module, micro_batches: list, ctx: ParallelContext,
                  loss_fn: Callable[[torch.Tensor, Any], Any], denom: float, *,
                  inputs: Callable[[Any], tuple] = batch_inputs,
                  autocast: Callable[[], Any] = contextlib.nullcontext) -> StepOutput:
    """Forward + backward of one global batch through this rank's stage with the 1F1B schedule (at pp 1:
    plain gradient accumulation, one micro-batch at a time).

    Every stage gets the same micro-batches (the data loader runs on every rank): the first stage feeds the
    token ids of `inputs(batch)` to the model, every stage its keyword inputs, the last computes
    loss_fn(output, batch) -- the summed loss of the micro-batch, or (summed loss, {name: summed metric}) --
    and all stages read the activation shape (batch, seq, dim) of each micro-batch from the ids, so
    micro-batches may differ in length. Each loss is divided by `denom` before backward. Returns the global
    mean loss (and metrics) on every rank: pipeline stages and data-parallel ranks agree.
    """
    n = len(micro_batches)
    if n == 0:
        raise ValueError("pipeline_step needs at least one micro-batch")
    p0 = next(model.parameters())
    dim = model.cfg.dim
    fed = [inputs(b) for b in micro_batches]
    shapes = [tuple(ids.shape[:2]) + (dim,) for ids, _ in fed]
    p2p = _P2P(ctx, p0.dtype, p0.device)
    warmup = min(ctx.pp - ctx.pp_rank - 1, n)
    steady = n - warmup
    total = torch.zeros((), dtype=torch.float64, device=p0.device)
    extras: dict[str, torch.Tensor] = {}
    pending: list[tuple[torch.Tensor | None, torch.Tensor]] = []  # (stage input, stage output or loss)
    fwd = bwd = 0  # index of the next micro-batch to run forward / backward
    hidden = getattr(loss_fn, "needs_hidden", False)  # the loss applies the head itself (fused head loss)

    def forward(x: torch.Tensor | None) -> torch.Tensor:
        nonlocal fwd
        b, (ids, kw) = micro_batches[fwd], fed[fwd]
        fwd += 1
        with autocast():
            out = model(ids if x is None else x, return_hidden=hidden, **kw)
            if not ctx.is_last_stage:
                return out
            res = loss_fn(out, b)
        return _sum_loss(res, total, extras) / denom

    def backward(gy: torch.Tensor | None) -> torch.Tensor | None:
        nonlocal bwd
        bwd += 1
        x, y = pending.pop(0)
        if gy is None:
            y.backward()
        else:
            torch.autograd.backward(y, grad_tensors=gy.to(y.dtype))
        return None if x is None else x.grad

    for _ in range(warmup):
        x = p2p.recv_forward(shapes[fwd])
        y = forward(x)
        p2p.send_forward(y)
        pending.append((x, y))
    x = p2p.recv_forward(shapes[fwd]) if steady > 0 else None
    for i in range(steady):
        y = forward(x)
        gy = p2p.send_forward_recv_backward(y, shapes[bwd])
        pending.append((x, y))
        gx = backward(gy)
        if i == steady - 1:
            x = None
            p2p.send_backward(gx)
        else:
            x = p2p.send_backward_recv_forward(gx, shapes[fwd])
    for _ in range(warmup):
        gy = p2p.recv_backward(shapes[bwd])
        p2p.send_backward(backward(gy))
    return _share_results(total, extras, ctx, denom)


@torch.no_grad()
def forward_only(model: torch.nn.Module, micro_batches: list, ctx: ParallelContext,
                 loss_fn: Callable[[torch.Tensor, Any], Any], *, inputs: Callable[[Any], tuple] = batch_inputs,
                 autocast: Callable[[], Any] = contextlib.nullcontext) -> StepOutput:
    """Evaluation through the pipeline (any pp, pp 1 included): forwards only, activations flow one way.
    Returns the SUM of loss_fn over the micro-batches (and metrics), summed over dp, on every rank."""
    p0 = next(model.parameters())
    p2p = _P2P(ctx, p0.dtype, p0.device)
    total = torch.zeros((), dtype=torch.float64, device=p0.device)
    extras: dict[str, torch.Tensor] = {}
    hidden = getattr(loss_fn, "needs_hidden", False)
    for b in micro_batches:
        ids, kw = inputs(b)
        x = p2p.recv_forward(tuple(ids.shape[:2]) + (model.cfg.dim,))
        with autocast():
            out = model(ids if x is None else x, return_hidden=hidden, **kw)
            if not ctx.is_last_stage:
                p2p.send_forward(out)
                continue
            _sum_loss(loss_fn(out, b), total, extras)
    return _share_results(total, extras, ctx, 1.0)


def _share_results(total: torch.Tensor, extras: dict[str, torch.Tensor], ctx: ParallelContext,
                   denom: float) -> StepOutput:
    """Loss and metrics live on the last stage: send them to every stage, sum over data parallel."""
    keys = sorted(extras)
    if ctx.pp > 1:
        box = [keys]
        dist.broadcast_object_list(box, src=ctx.pp_ranks[-1], group=ctx.pp_group, device=total.device)
        keys = box[0]
    vals = torch.stack([total] + [extras.get(k, torch.zeros_like(total)) for k in keys])
    if ctx.pp > 1:
        if not ctx.is_last_stage:
            vals.zero_()
        dist.all_reduce(vals, group=ctx.pp_group)
    if ctx.dp > 1:
        dist.all_reduce(vals, group=ctx.dp_group)
    vals = (vals / float(denom)).tolist()
    return StepOutput(vals[0], dict(zip(keys, vals[1:])))


def lm_output_loss(ctx: ParallelContext, target: Callable[[Any], torch.Tensor] = lambda b: b.targets, *,
                   head: torch.nn.Module | None = None):
    """loss_fn for language modelling: summed vocab-parallel cross-entropy of the stage output.

    With `head` (the last stage's lm head) the stage returns hidden states and the loss applies the head
    block by block (lm_head_cross_entropy: no full logits); without it, the stage returns logits."""
    from llamactl.parallel.head_loss import lm_head_cross_entropy
    from llamactl.parallel.tensor import vocab_parallel_cross_entropy

    if head is not None:
        def fused(h: torch.Tensor, batch) -> torch.Tensor:
            return lm_head_cross_entropy(h, head, target(batch), ctx, reduction="sum")

        fused.needs_hidden = True
        return fused

    def loss_fn(logits: torch.Tensor, batch) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, target(batch), ctx, reduction="sum")

    return loss_fn

