"""Data parallelism: gradient buckets reduced during backward, ZeRO-1 as a distributed optimizer
(reduce-scatter, sharded AdamW, all-gather), global gradient norm.

Losses are normalised by the valid tokens of the whole global batch (see pipeline.py), so the gradient
of the global batch is the SUM of the data-parallel ranks' gradients, never their mean.

Overlap (GradReducer, as torch DDP and Megatron do it): parameters go into flat buckets of about
`bucket_mb` MB in reverse creation order (the last layers' gradients are the first ones backward
finishes). Each parameter's post-accumulate-grad hook counts the backward passes of the step, whose
number the trainer announces (`begin(micro_batches)`), so only the LAST accumulation of a gradient
counts and no schedule (plain accumulation, 1F1B, interleaved) needs to tell the reducer anything.
When every parameter of a bucket has its final gradient the bucket is launched as an async collective,
in bucket order only (so every dp rank issues the same collectives in the same order), while backward
goes on for the earlier layers. `__call__` launches what has not filled (a parameter that got no
gradient counts as zeros; with overlap off, every bucket) and waits for all. The hook counts must be the
same on every dp rank: a parameter gets its gradient in the same micro-batches everywhere (true for
every model here: the graph does not depend on the data).

ZeRO-1 (Rajbhandari et al.) with the communication of Megatron's distributed optimizer and the layout
of FSDP2: every parameter tensor, flattened, is cut into dp chunks of ceil(n / dp) elements; dp rank r
owns chunk r of every tensor and keeps AdamW state for it only. A bucket's gradients are packed
rank-major (rank 0's chunks of all its tensors, then rank 1's, ...), so one reduce-scatter hands each
rank the summed gradient of its own chunks, in a shard buffer of 1/dp of the bucket: the only gradient
the optimizer holds (the full local gradients are dropped as they are packed). After the update one
all-gather per bucket rebuilds the parameters. Each way sends (dp-1)/dp of the bucket per rank: together
the bytes of one ring all-reduce, 2 (dp-1)/dp N. The layout depends on the tensors only (not on the bucket
size), so optimizer state saved by a run loads into any ZeroOptimizer of the same parameters and dp.
AdamW is elementwise, so the result equals the unsharded optimizer's. fp32 parameters (the trainer's
master weights, also under bf16 autocast) are stepped in place through views: ZeRO-1 then costs
8 bytes / dp per parameter of optimizer state.

Clipping uses the norm of the whole model's gradient: sharded tensors summed over tp and pp, tensors
replicated over tp (norm gains, GQA kv heads held by several ranks) counted once, and nothing summed
over dp for full gradients (identical there after the all-reduce), ZeRO-1 shards summed over dp.
`GradNorm` only measures it; the trainer applies the clip (trainer.clipped_step), inside the fused AdamW
where it can, also under ZeRO-1.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from llamactl.parallel.context import ParallelContext
from llamactl.parallel.tensor import shard_specs


# ---- collectives and the rank-major chunk layout -------------------------------------------------
def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group, async_op: bool = False):
    """Sum `inp` (dp equal parts) over the group; part r lands in rank r's `out` (gloo and NCCL have it)."""
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, inp, group=group, async_op=async_op)


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group, async_op: bool = False):
    """Rank r's `inp` becomes part r of `out` on every rank."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, group=group, async_op=async_op)


def chunk_len(numel: int, dp: int) -> int:
    """Elements of one ZeRO-1 chunk of a tensor: rank r owns flat elements [r*c, (r+1)*c) (the last may be short)."""
    return -(-numel // dp)


def _own(numel: int, dp: int, rank: int) -> tuple[int, int]:
    c = chunk_len(numel, dp)
    return min(numel, rank * c), min(numel, (rank + 1) * c)


def _pack(dst: torch.Tensor, src: torch.Tensor | None) -> None:
    """Write a flat tensor into its (dp, c) rank-major columns, zero padding (src None: all zeros)."""
    if src is None:
        dst.zero_()
        return
    c = dst.shape[1]
    rows, rem = divmod(src.numel(), c)
    dst[:rows].copy_(src[:rows * c].view(rows, c))
    if rows < dst.shape[0]:
        dst[rows, :rem].copy_(src[rows * c:])
        dst[rows, rem:].zero_()
        dst[rows + 1:].zero_()


def _unpack(flat: torch.Tensor, src: torch.Tensor) -> None:
    """The inverse of _pack: (dp, c) rank-major columns back into the flat tensor."""
    c = src.shape[1]
    rows, rem = divmod(flat.numel(), c)
    flat[:rows * c].view(rows, c).copy_(src[:rows])
    if rem:
        flat[rows * c:].copy_(src[rows, :rem])


def _offsets(sizes: Iterable[int]) -> list[int]:
    out, off = [], 0
    for s in sizes:
        out.append(off)
        off += s
    return out + [off]


def make_buckets(params: Sequence[nn.Parameter], bucket_mb: float) -> list[list[nn.Parameter]]:
    """Runs of parameters of about `bucket_mb` MB, one dtype each, in the given order."""
    limit = max(1, int(bucket_mb * 2**20))
    buckets: list[list[nn.Parameter]] = []
    current: dict[torch.dtype, list[nn.Parameter]] = {}
    size: dict[torch.dtype, int] = {}
    for p in params:
        b = current.setdefault(p.dtype, [])
        if b and size[p.dtype] + p.numel() * p.element_size() > limit:
            buckets.append(b)
            b = current[p.dtype] = []
            size[p.dtype] = 0
        b.append(p)
        size[p.dtype] = size.get(p.dtype, 0) + p.numel() * p.element_size()
    buckets.extend(b for b in current.values() if b)
    return buckets


# ---- gradient reduction -----------------------------------------------------------------------------
class GradReducer:
    """Sum gradients over the data-parallel group in flat buckets, overlapped with backward (see module doc).

    `begin(m)` before the step's m backward passes arms the hooks (with overlap); `__call__()` after them
    finishes the reduction and returns the parameters whose `.grad` holds the global batch's gradient: the
    model's (all-reduce), or, with a ZeroOptimizer, this rank's shard masters (reduce-scatter; the model's
    own `.grad` are dropped). Buckets go in reverse parameter order, per dtype; a missing gradient counts as
    zeros, so every rank issues the same collectives.
    """

    def __init__(self, params: Iterable[nn.Parameter], ctx: ParallelContext, bucket_mb: float = 25.0, *,
                 overlap: bool = False, optimizer=None):
        self.ctx = ctx
        self.params = [p for p in params if p.requires_grad]
        self.buckets = make_buckets(self.params[::-1], bucket_mb)
        self.zero = optimizer if isinstance(optimizer, ZeroOptimizer) and ctx.dp > 1 else None
        self.sharded = self.zero is not None
        self.overlap = bool(overlap) and ctx.dp > 1
        dp = ctx.dp
        if self.sharded:
            if {id(p) for p in self.zero.params} != {id(p) for p in self.params}:
                raise ValueError("GradReducer and ZeroOptimizer must hold the same parameters")
            self.zero.gather_buckets = self.buckets  # the all-gather after the update uses the same buckets
            self._offs = [_offsets(chunk_len(p.numel(), dp) for p in b) for b in self.buckets]
        else:
            self._offs = [_offsets(p.numel() for p in b) for b in self.buckets]
        self._bucket_of = {id(p): k for k, b in enumerate(self.buckets) for p in b}
        self._bufs: list[torch.Tensor | None] = [None] * len(self.buckets)  # flat grads, or ZeRO-1 shards
        self._hooks = []
        if self.overlap:  # the hooks hold the reducer weakly: a dropped Trainer's reducer (and buffers) can go
            ref = weakref.ref(self)

            def hook(p: nn.Parameter) -> None:
                reducer = ref()
                if reducer is not None:
                    reducer._hook(p)

            self._hooks = [p.register_post_accumulate_grad_hook(hook) for p in self.params]
            weakref.finalize(self, _remove_hooks, self._hooks)
        self._reset()

    def _reset(self) -> None:
        self._micro = 0                                   # backward passes of the armed step (0: hooks idle)
        self._count: dict[int, int] = {}                  # id(param) -> gradients accumulated this step
        self._left = [len(b) for b in self.buckets]       # parameters of each bucket still waiting
        self._next = 0                                    # next bucket to launch (launches go in order)
        self._work: list[tuple[Any, torch.Tensor]] = []   # (handle, buffer kept alive until it completes)

    def begin(self, micro_batches: int) -> None:
        """Announce a step of `micro_batches` backward passes: a bucket launches from the hooks once every one
        of its parameters has accumulated that many gradients (without overlap: all after backward). Plain
        all-reduce: the gradients start as zeroed views of the flat buckets, so backward accumulates straight
        into what is reduced (DDP's gradient_as_bucket_view: no copy, no second gradient buffer)."""
        self._reset()
        self._micro = int(micro_batches) if self.overlap else 0
        if self.sharded or self.ctx.dp == 1:
            return
        for k, (bucket, offs) in enumerate(zip(self.buckets, self._offs)):
            flat = self._buffer(k, offs[-1], bucket[0])
            flat.zero_()
            for p, a, b in zip(bucket, offs, offs[1:]):
                p.grad = flat[a:b].view_as(p)

    def _buffer(self, k: int, numel: int, like: torch.Tensor) -> torch.Tensor:
        """Bucket k's persistent buffer: its flat gradients, or under ZeRO-1 this rank's gradient shard."""
        if self._bufs[k] is None:
            self._bufs[k] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return self._bufs[k]

    def _hook(self, p: nn.Parameter) -> None:
        if not self._micro:
            return
        n = self._count.get(id(p), 0) + 1
        self._count[id(p)] = n
        if n > self._micro:
            raise RuntimeError(f"parameter got {n} gradients in a step announced with {self._micro} (GradReducer.begin)")
        if n == self._micro:
            self._left[self._bucket_of[id(p)]] -= 1
            while self._next < len(self.buckets) and self._left[self._next] == 0:
                self._launch()

    @torch.no_grad()
    def _launch(self) -> None:
        """Pack bucket `self._next` and start its collective (async); the model's gradients are dropped."""
        k, bucket, offs = self._next, self.buckets[self._next], self._offs[self._next]
        self._next += 1
        p0, group, dp = bucket[0], self.ctx.dp_group, self.ctx.dp
        if self.sharded:
            width = offs[-1]
            packed = torch.empty(dp * width, dtype=p0.dtype, device=p0.device).view(dp, width)
            for p, a, b in zip(bucket, offs, offs[1:]):
                _pack(packed[:, a:b], None if p.grad is None else p.grad.reshape(-1))
                p.grad = None
            shard = self._buffer(k, width, p0)
            self._work.append((_reduce_scatter(shard, packed.view(-1), group, async_op=True), packed))
        else:
            flat = self._buffer(k, offs[-1], p0)
            for p, a, b in zip(bucket, offs, offs[1:]):
                if p.grad is None:
                    flat[a:b].zero_()
                elif p.grad.data_ptr() != flat[a:b].data_ptr():  # not accumulated in the bucket (no begin())
                    flat[a:b].copy_(p.grad.reshape(-1))
                    p.grad = None
            self._work.append((dist.all_reduce(flat, group=group, async_op=True), flat))

    @torch.no_grad()
    def __call__(self) -> list[nn.Parameter]:
        """Launch the buckets that have not been, wait for all, and hand out the summed gradients."""
        if self.ctx.dp == 1:
            return self.params
        while self._next < len(self.buckets):
            self._launch()
        for work, _ in self._work:
            work.wait()
        for bucket, offs, buf in zip(self.buckets, self._offs, self._bufs):
            for p, a, b in zip(bucket, offs, offs[1:]):
                if not self.sharded:
                    p.grad = buf[a:b].view_as(p)
                    continue
                master = self.zero.master(p)
                if master is not None:
                    g = buf[a:a + master.numel()]
                    master.grad = g if g.dtype == master.dtype else g.to(master.dtype)
        self._reset()
        return self.zero.masters if self.sharded else self.params

    def remove(self) -> None:
        """Detach the hooks now (they also go when the reducer is garbage collected)."""
        _remove_hooks(self._hooks)


def _remove_hooks(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()


# ---- global gradient norm ---------------------------------------------------------------------------
def _holders(spec, tp: int) -> int:
    """How many tp ranks hold the same values of a parameter (1 for a proper shard)."""
    if spec is None:
        return tp
    return max(1, tp * spec.length // spec.full)


class GradNorm:
    """`grad_norm(params) -> total gradient norm` of the whole model (tp x pp), counting replicas once.

    It scales nothing: the trainer turns the norm into the clip coefficient (trainer.clipped_step)."""

    def __init__(self, model: nn.Module, ctx: ParallelContext):
        self.ctx = ctx
        self.device = next(model.parameters()).device
        specs = shard_specs(model)
        self.counted: dict[int, bool] = {}
        for name, p in model.named_parameters():
            h = _holders(specs.get(name), ctx.tp)
            self.counted[id(p)] = ctx.tp_rank % h == 0

    def __call__(self, params: Iterable[nn.Parameter], *, dp_sharded: bool = False) -> torch.Tensor:
        """dp_sharded: `params` are ZeRO-1 chunk masters (GradReducer's result), so squares are summed over dp too."""
        params = [p for p in params if p.grad is not None]
        if self.ctx.tp == 1 and self.ctx.pp == 1 and not dp_sharded:  # nothing sharded: torch's own (foreach) norm
            return torch.nn.utils.get_total_norm([p.grad for p in params])
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        mine = [p.grad for p in params if self.counted.get(id(getattr(p, "_zero_param", p)), True)]
        if mine:
            norms = torch.stack([torch.linalg.vector_norm(g.float()) for g in mine])
            sq = (norms * norms).sum()
        groups = [(self.ctx.tp_group, self.ctx.tp), (self.ctx.pp_group, self.ctx.pp)]
        for group, size in groups + ([(self.ctx.dp_group, self.ctx.dp)] if dp_sharded else []):
            if size > 1:
                dist.all_reduce(sq, group=group)
        return sq.sqrt()


def count_valid(micro_batches, ctx: ParallelContext, device: torch.device | str = "cpu") -> int:
    """Valid (loss-carrying) units of the global batch: the step's normaliser, summed over dp on the model's
    device (NCCL needs it there)."""
    n = torch.tensor(float(sum(b.num_valid for b in micro_batches)), dtype=torch.float64, device=device)
    if ctx.dp > 1:
        dist.all_reduce(n, group=ctx.dp_group)
    return int(n.item())


# ---- optimizers -------------------------------------------------------------------------------------
def adamw(groups: list[dict], lr: float, betas: tuple[float, float], eps: float) -> torch.optim.Optimizer:
    """The one AdamW maker: torch's fused kernel where it has one for the device (CPU and CUDA both do; the
    fused one also takes the clip coefficient as grad_scale), foreach otherwise."""
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def make_optimizer(groups: list[dict], ctx: ParallelContext, *, lr: float, betas: tuple[float, float], eps: float,
                   zero: bool = False):
    """AdamW, or its ZeRO-1 form (state sharded over dp) when asked for and dp > 1."""
    if zero and ctx.dp > 1:
        return ZeroOptimizer(groups, ctx, lr=lr, betas=betas, eps=eps)
    return adamw(groups, lr=lr, betas=betas, eps=eps)


# ---- ZeRO-1 -----------------------------------------------------------------------------------------
class ZeroOptimizer:
    """AdamW with its state sharded over data parallel (ZeRO stage 1; layout and traffic in the module doc).

    param_groups: as for torch.optim ({"params": [...], "weight_decay": ...}); every dp rank must pass the
    same parameters in the same order. The inner optimizer steps this rank's chunks: views of fp32
    parameters, fp32 copies of others; `param_groups` exposes the inner groups, so setting g["lr"]
    works as with a plain optimizer. The chunks' gradients come from a GradReducer's reduce-scatter
    (`master.grad` set); without one (dp 1, or gradients already summed) `step` takes this rank's slice of
    each `p.grad`.
    """

    def __init__(self, param_groups: list[dict], ctx: ParallelContext, *, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 make_inner: Callable[..., torch.optim.Optimizer] = adamw):
        self.ctx = ctx
        self.params = [p for g in param_groups for p in g["params"]]
        self.total = sum(p.numel() for p in self.params)
        self.shard = sum(chunk_len(p.numel(), ctx.dp) for p in self.params)  # chunk elements per rank, padding included
        # (param, start, end, master) for this rank's chunk of each tensor that has one
        self.slices: list[tuple[nn.Parameter, int, int, nn.Parameter]] = []
        self._master: dict[int, nn.Parameter] = {}
        inner_groups = []
        for g in param_groups:
            mine = []
            for p in g["params"]:
                a, b = _own(p.numel(), ctx.dp, ctx.dp_rank)
                if a < b:
                    piece = p.detach().view(-1)[a:b]
                    # fp32 parameters are their own masters: the inner AdamW updates a view of them in
                    # place (no copy, and a checkpoint loaded into the model later is seen at once)
                    master = nn.Parameter(piece if p.dtype == torch.float32 else piece.float().clone())
                    master._zero_param = p  # GradNorm counts a chunk as its tensor (tp replicas once)
                    self.slices.append((p, a, b, master))
                    self._master[id(p)] = master
                    mine.append(master)
            inner_groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": mine})
        self.masters = [m for _, _, _, m in self.slices]
        self.gather_buckets = make_buckets(self.params, 25.0)  # a GradReducer sets its own (the same as its reduction)
        self.inner = make_inner(inner_groups, lr=lr, betas=betas, eps=eps)

    def master(self, p: nn.Parameter) -> nn.Parameter | None:
        """The parameter holding this rank's chunk of `p` (None: the chunk is empty)."""
        return self._master.get(id(p))

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    @property
    def defaults(self) -> dict:
        return self.inner.defaults

    @property
    def grad_scale(self) -> torch.Tensor | None:
        """The inner optimizer's: a fused inner AdamW divides this rank's gradient chunks by it in its kernel
        (how trainer.clipped_step folds in the clip coefficient)."""
        return getattr(self.inner, "grad_scale", None)

    @grad_scale.setter
    def grad_scale(self, value: torch.Tensor | None) -> None:
        self.inner.grad_scale = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params + self.masters:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        for p, a, b, master in self.slices:
            if master.grad is None and p.grad is not None:  # no reducer: the gradient is already summed
                master.grad = p.grad.reshape(-1)[a:b].to(torch.float32)
        self.inner.step()
        for p, a, b, master in self.slices:
            master.grad = None
            if p.dtype != torch.float32:
                p.view(-1)[a:b].copy_(master)
        self._all_gather()

    @torch.no_grad()
    def sync_masters(self) -> None:
        """Copy the model's weights into separate (non-fp32 model) masters, e.g. after checkpoint.load."""
        for p, a, b, master in self.slices:
            if p.dtype != torch.float32:
                master.copy_(p.view(-1)[a:b])

    @torch.no_grad()
    def _all_gather(self) -> None:
        """One all-gather per bucket: every rank packs its updated chunks, the rank-major result is unpacked
        into every parameter (a transient buffer of the bucket's size; the tensors stay ordinary)."""
        dp = self.ctx.dp
        if dp == 1:
            return
        for bucket in self.gather_buckets:
            offs = _offsets(chunk_len(p.numel(), dp) for p in bucket)
            width, p0 = offs[-1], bucket[0]
            mine = torch.zeros(width, dtype=p0.dtype, device=p0.device)
            for p, a in zip(bucket, offs):
                lo, hi = _own(p.numel(), dp, self.ctx.dp_rank)
                mine[a:a + hi - lo].copy_(p.view(-1)[lo:hi])
            full = torch.empty(dp * width, dtype=p0.dtype, device=p0.device)
            _all_gather(full, mine, self.ctx.dp_group)
            full = full.view(dp, width)
            for p, a, b in zip(bucket, offs, offs[1:]):
                _unpack(p.view(-1), full[:, a:b])

    def state_dict(self) -> dict:
        """This dp rank's shard of the optimizer state (checkpointed per rank) and the layout it needs."""
        return {"inner": self.inner.state_dict(), "zero": self._layout()}

    def _layout(self) -> dict:
        return {"dp": self.ctx.dp, "dp_rank": self.ctx.dp_rank, "total": self.total, "shard": self.shard,
                "chunks": "per-tensor"}

    def load_state_dict(self, state: dict) -> None:
        z, want = state.get("zero", {}), self._layout()
        if z != want:
            raise ValueError(f"ZeRO-1 optimizer state was saved for {z}, this run is {want}; resume with the "
                             f"same --tp/--pp/--nproc layout")
        self.inner.load_state_dict(state["inner"])
        self.sync_masters()
