"""Pipeline parallelism: stage partitioning, the (interleaved) 1F1B schedule, and p2p of activations / gradients.

Every rank holds `layers.{i}` for its own global indices i (embedding on the first stage, norm + head on the
last). With V virtual stages (`ctx.virtual_stages`, Megatron-LM's interleaved schedule, Narayanan et al.
2021) pipeline rank r holds V chunks of layers: chunk v is virtual stage v*P + r of P*V, so activations go
round the ring of ranks V times (chunk v on rank P-1 feeds chunk v+1 on rank 0); the embedding is in chunk
0 of rank 0 and the norm + head in chunk V-1 of rank P-1.

One optimizer step runs the M micro-batches as V*M chunk-forwards and chunk-backwards in the order of
`schedule` (PipeDream-flush, as in Megatron-LM): warm-up forwards, then one forward and one backward in
turn, then the remaining backwards. At V 1 rank r warms up with min(P-r-1, M) forwards (M < P leaves
ranks idle longer; at P 1 it is plain gradient accumulation); at V > 1 with 2(P-r-1) + (V-1)P, in groups of
P micro-batches per chunk, so M must be a multiple of P. The idle fraction (bubble) falls from
(P-1)/(M+P-1) to (P-1)/(V*M+P-1) (`bubble_fraction`; `schedule_makespan` times the order).

Communication runs in lockstep rounds (`rounds`): every rank steps through the same numbered rounds, runs
at most one chunk-forward or -backward in each (as soon as its input arrived in an earlier round) and then
exchanges, in one batch_isend_irecv with its two ring neighbours, exactly what the neighbours' rounds of the
same number produced for it. Matching sends and receives are therefore always in flight together, which is
what NCCL needs (a send may wait for its receive) and gloo allows.

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

Activations are sent on the tensor's device (gloo and NCCL alike); their shape is (micro_batch, seq, dim),
known from the micro-batch on every rank, so no shape exchange is needed (micro-batches of one step may
differ in length).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from llamactl.parallel.context import LayoutError, ParallelContext


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


# ---- the schedule ---------------------------------------------------------------------------------
def chunk_layers(n_layers: int, pp: int, pp_rank: int, virtual: int = 1) -> list[range]:
    """Global layer indices of each of pipeline rank pp_rank's `virtual` chunks: chunk v is virtual stage
    v*pp + pp_rank of pp*virtual (at virtual 1: the one range of stage_layers)."""
    return [stage_layers(n_layers, pp * virtual, v * pp + pp_rank) for v in range(virtual)]


def bubble_fraction(pp: int, micro: int, virtual: int = 1) -> float:
    """Idle fraction of a step under (interleaved) 1F1B: (p-1)/(V*m+p-1) (Narayanan et al. 2021)."""
    return (pp - 1) / (virtual * micro + pp - 1)


def check_microbatches(pp: int, virtual: int, micro: int) -> None:
    """The interleaved schedule runs micro-batches in groups of pp: refuse any other count (one line)."""
    if virtual > 1 and micro % pp:
        raise LayoutError(f"the interleaved schedule (--virtual-stages {virtual}) needs the micro-batches per step to "
                          f"be a multiple of --pp {pp}, got {micro} (the global batch over --micro-batch and data parallelism: --batch-tokens / --batch-size)")


@dataclass(frozen=True)
class Op:
    """One chunk-forward ("F") or chunk-backward ("B") of micro-batch `mb` through this rank's layer chunk."""

    kind: str
    chunk: int
    mb: int


def _op_at(k: int, pp: int, virtual: int, kind: str) -> Op:
    """A rank's k-th forward (backward): groups of pp micro-batches through chunks 0..V-1 (backward: V-1..0)."""
    group, within = divmod(k, pp * virtual)
    chunk = within // pp
    return Op(kind, chunk if kind == "F" else virtual - 1 - chunk, group * pp + within % pp)


def schedule(pp: int, pp_rank: int, virtual: int, micro: int, *, forward_only: bool = False) -> tuple[Op, ...]:
    """This rank's chunk-forwards and -backwards of one step, in order: warm-up forwards, one forward and one
    backward in turn, cool-down backwards (Megatron-LM's 1F1B and interleaved 1F1B; forwards only for eval)."""
    check_microbatches(pp, virtual, micro)
    total = micro * virtual
    if forward_only:
        warm = total
    elif virtual == 1:
        warm = min(pp - pp_rank - 1, micro)
    else:
        warm = min(2 * (pp - pp_rank - 1) + (virtual - 1) * pp, total)
    ops = [_op_at(k, pp, virtual, "F") for k in range(warm)]
    for k in range(total - warm):
        ops += [_op_at(warm + k, pp, virtual, "F"), _op_at(k, pp, virtual, "B")]
    if not forward_only:
        ops += [_op_at(k, pp, virtual, "B") for k in range(total - warm, total)]
    return tuple(ops)


def _needs(op: Op, stage: int, last: int):
    """Message key of the op's input from another rank (None: token ids, or the loss starts backward)."""
    if op.kind == "F":
        return None if stage == 0 else ("act", stage, op.mb)
    return None if stage == last else ("grad", stage, op.mb)


def _makes(op: Op, stage: int, last: int):
    """Message key of what the op hands to the neighbouring virtual stage (None at the ends)."""
    if op.kind == "F":
        return None if stage == last else ("act", stage + 1, op.mb)
    return None if stage == 0 else ("grad", stage - 1, op.mb)


@dataclass(frozen=True)
class Round:
    """One lockstep round of a rank: the op it runs (or None), then the messages (key, peer pp rank) it sends
    and receives in one batch with its ring neighbours."""

    op: Op | None
    sends: tuple = ()
    recvs: tuple = ()


@functools.lru_cache(maxsize=64)
def rounds(pp: int, virtual: int, micro: int, *, forward_only: bool = False) -> tuple[tuple[Round, ...], ...]:
    """Per pipeline rank, the lockstep rounds of one step (module doc). Round t of rank r runs r's next op
    once its input arrived in a round before t; the batch of round t carries what the ops of round t made.
    Every rank walks the same number of rounds, so the two ends of every message meet in the same batch."""
    last = pp * virtual - 1
    todo = [schedule(pp, r, virtual, micro, forward_only=forward_only) for r in range(pp)]
    pos, arrived = [0] * pp, set()
    out: list[list[Round]] = [[] for _ in range(pp)]
    while any(pos[r] < len(todo[r]) for r in range(pp)):
        ran, made = [None] * pp, []
        for r in range(pp):
            if pos[r] == len(todo[r]):
                continue
            op = todo[r][pos[r]]
            need = _needs(op, op.chunk * pp + r, last)
            if need is not None and need not in arrived:
                continue
            ran[r], pos[r] = op, pos[r] + 1
            m = _makes(op, op.chunk * pp + r, last)
            if m is not None:
                made.append((m, r, m[1] % pp))
        if all(op is None for op in ran):
            raise RuntimeError(f"pipeline schedule stalls (pp {pp}, virtual {virtual}, micro {micro})")
        for r in range(pp):
            out[r].append(Round(ran[r], tuple(sorted((k, d) for k, s, d in made if s == r)),
                                tuple(sorted((k, s) for k, s, d in made if d == r))))
        arrived.update(k for k, _, _ in made)
    return tuple(tuple(x) for x in out)


def schedule_makespan(pp: int, virtual: int, micro: int, t_fwd: float = 1.0, t_bwd: float = 2.0) -> tuple[float, float]:
    """(makespan, busy time per rank) of one step when every rank runs its `schedule` as soon as inputs arrive,
    a chunk-forward taking t_fwd and a chunk-backward t_bwd (no communication cost): the bubble is
    1 - busy / makespan."""
    last = pp * virtual - 1
    todo = [schedule(pp, r, virtual, micro) for r in range(pp)]
    ready: dict = {}
    free, pos = [0.0] * pp, [0] * pp
    while any(pos[r] < len(todo[r]) for r in range(pp)):
        for r in range(pp):
            while pos[r] < len(todo[r]):
                op = todo[r][pos[r]]
                need = _needs(op, op.chunk * pp + r, last)
                if need is not None and need not in ready:
                    break
                free[r] = max(free[r], ready[need] if need is not None else 0.0) + (t_fwd if op.kind == "F" else t_bwd)
                m = _makes(op, op.chunk * pp + r, last)
                if m is not None:
                    ready[m] = free[r]
                pos[r] += 1
    return max(free), micro * virtual * (t_fwd + t_bwd)


# ---- running it -----------------------------------------------------------------------------------
def _run_rounds(ctx: ParallelContext, plan: tuple[Round, ...], run_op: Callable[[Op, dict], dict],
                shapes: list[tuple], dtype: torch.dtype, device: torch.device) -> None:
    """Walk this rank's rounds: run_op(op, received) -> {message key: tensor to send}; then one batched exchange."""
    got: dict = {}
    for rnd in plan:
        made = run_op(rnd.op, got) if rnd.op is not None else {}
        if not (rnd.sends or rnd.recvs):
            continue
        ops, bufs = [], []
        for key, peer in rnd.sends:
            ops.append(dist.P2POp(dist.isend, made.pop(key).detach().to(dtype).contiguous(), ctx.pp_ranks[peer]))
        for key, peer in rnd.recvs:
            buf = torch.empty(shapes[key[2]], dtype=dtype, device=device)
            ops.append(dist.P2POp(dist.irecv, buf, ctx.pp_ranks[peer]))
            bufs.append((key, buf))
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        got.update(bufs)


def _chunk_forward(model, ctx: ParallelContext, chunk: int, x, **kw):
    """The model's forward through one of its chunks (the whole stage at virtual 1, without the keyword)."""
    if ctx.virtual_stages > 1:
        kw["chunk"] = chunk
    return model(x, **kw)


def pipeline_step(model: torch.nn.Module, micro_batches: list, ctx: ParallelContext,
                  loss_fn: Callable[[torch.Tensor, Any], Any], denom: float, *,
                  inputs: Callable[[Any], tuple] = batch_inputs,
                  autocast: Callable[[], Any] = contextlib.nullcontext) -> StepOutput:
    """Forward + backward of one global batch through this rank's chunks with the (interleaved) 1F1B schedule
    (at pp 1: plain gradient accumulation, one micro-batch at a time).

    Every stage gets the same micro-batches (the data loader runs on every rank): the first stage feeds the
    token ids of `inputs(batch)` to the model, every stage its keyword inputs, the last computes
    loss_fn(output, batch) -- the summed loss of the micro-batch, or (summed loss, {name: summed metric}) --
    and all stages read the activation shape (batch, seq, dim) of each micro-batch from the ids, so
    micro-batches may differ in length. Each loss is divided by `denom` before backward. Returns the global
    mean loss (and metrics) on every rank: pipeline stages and data-parallel ranks agree. At virtual stages
    > 1 the number of micro-batches must be a multiple of pp (LayoutError otherwise).
    """
    n = len(micro_batches)
    if n == 0:
        raise ValueError("pipeline_step needs at least one micro-batch")
    p0 = next(model.parameters())
    fed = [inputs(b) for b in micro_batches]
    shapes = [tuple(ids.shape[:2]) + (model.cfg.dim,) for ids, _ in fed]
    pp, virtual = ctx.pp, ctx.virtual_stages
    plan = rounds(pp, virtual, n)[ctx.pp_rank]
    last = pp * virtual - 1
    total = torch.zeros((), dtype=torch.float64, device=p0.device)
    extras: dict[str, torch.Tensor] = {}
    pending: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}  # (chunk, mb): (input, output)
    hidden = getattr(loss_fn, "needs_hidden", False)  # the loss applies the head itself (fused head loss)

    def run_op(op: Op, got: dict) -> dict:
        stage = op.chunk * pp + ctx.pp_rank
        if op.kind == "F":
            x = got.pop(_needs(op, stage, last)).requires_grad_() if stage > 0 else None
            ids, kw = fed[op.mb]
            with autocast():
                y = _chunk_forward(model, ctx, op.chunk, ids if x is None else x, return_hidden=hidden, **kw)
                if stage == last:
                    y = _sum_loss(loss_fn(y, micro_batches[op.mb]), total, extras) / denom
            pending[(op.chunk, op.mb)] = (x, y)
            return {} if stage == last else {_makes(op, stage, last): y}
        x, y = pending.pop((op.chunk, op.mb))
        if stage == last:
            y.backward()
        else:
            torch.autograd.backward(y, grad_tensors=got.pop(_needs(op, stage, last)).to(y.dtype))
        return {} if stage == 0 else {_makes(op, stage, last): x.grad}

    _run_rounds(ctx, plan, run_op, shapes, p0.dtype, p0.device)
    return _share_results(total, extras, ctx, denom)


@torch.no_grad()
def forward_only(model: torch.nn.Module, micro_batches: list, ctx: ParallelContext,
                 loss_fn: Callable[[torch.Tensor, Any], Any], *, inputs: Callable[[Any], tuple] = batch_inputs,
                 autocast: Callable[[], Any] = contextlib.nullcontext) -> StepOutput:
    """Evaluation through the pipeline (any pp and virtual stages, pp 1 included): forwards only, activations
    flow one way. Returns the SUM of loss_fn over the micro-batches (and metrics), summed over dp, on every
    rank. Any number of micro-batches (no backward: no groups of pp needed)."""
    p0 = next(model.parameters())
    fed = [inputs(b) for b in micro_batches]
    shapes = [tuple(ids.shape[:2]) + (model.cfg.dim,) for ids, _ in fed]
    pp, virtual = ctx.pp, ctx.virtual_stages
    last = pp * virtual - 1
    total = torch.zeros((), dtype=torch.float64, device=p0.device)
    extras: dict[str, torch.Tensor] = {}
    hidden = getattr(loss_fn, "needs_hidden", False)

    def run_op(op: Op, got: dict) -> dict:
        stage = op.chunk * pp + ctx.pp_rank
        ids, kw = fed[op.mb]
        x = got.pop(_needs(op, stage, last)) if stage > 0 else ids
        with autocast():
            y = _chunk_forward(model, ctx, op.chunk, x, return_hidden=hidden, **kw)
            if stage == last:
                _sum_loss(loss_fn(y, micro_batches[op.mb]), total, extras)
                return {}
        return {_makes(op, stage, last): y}

    if micro_batches:
        _run_rounds(ctx, _eval_rounds(pp, virtual, len(micro_batches))[ctx.pp_rank], run_op, shapes, p0.dtype,
                    p0.device)
    return _share_results(total, extras, ctx, 1.0)


def _eval_rounds(pp: int, virtual: int, micro: int):
    """Forward-only rounds for any micro-batch count: padded to a multiple of pp for the grouping, the
    padding's ops dropped (they feed nothing)."""
    padded = -(-micro // pp) * pp if virtual > 1 else micro
    plan = rounds(pp, virtual, padded, forward_only=True)
    if padded == micro:
        return plan
    return tuple(tuple(Round(r.op if r.op is not None and r.op.mb < micro else None,
                             tuple(s for s in r.sends if s[0][2] < micro), tuple(s for s in r.recvs if s[0][2] < micro))
                       for r in ranks) for ranks in plan)


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

