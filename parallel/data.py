"""Data parallelism: bucketed gradient all-reduce, ZeRO-1 optimizer sharding, global gradient norm.

Losses are normalised by the valid tokens of the whole global batch (see pipeline.py), so the gradient
of the global batch is the SUM of the data-parallel ranks' gradients, never their mean.

ZeRO-1 (Rajbhandari et al.): the parameters of this rank's model shard are viewed as one flat vector;
dp rank r owns the contiguous slice [r*S, (r+1)*S) of it, keeps AdamW state for that slice only, steps
it, and the updated slices are all-gathered back into every replica. AdamW is elementwise, so the
result equals the unsharded optimizer's. fp32 parameters (the trainer's master weights, also under
bf16 autocast) are stepped in place through views: ZeRO-1 then costs 8 bytes / dp per parameter.

Clipping uses the norm of the whole model's gradient: sharded tensors summed over tp and pp, tensors
replicated over tp (norm gains, GQA kv heads held by several ranks) counted once, and nothing summed
over dp (the gradients are identical there after the reduction). `GradNorm` only measures it; the
trainer applies the clip (trainer.clipped_step), inside the fused AdamW where it can, also under ZeRO-1.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from llamactl.parallel.context import ParallelContext
from llamactl.parallel.tensor import shard_specs


# ---- bucketed all-reduce --------------------------------------------------------------------------
class GradReducer:
    """Sum gradients over the data-parallel group in flat buckets of about `bucket_mb` MB.

    Buckets are formed once in a fixed parameter order (identical on every dp rank) and per dtype;
    a missing gradient counts as zeros so every rank issues the same collectives.
    """

    def __init__(self, params: Iterable[nn.Parameter], ctx: ParallelContext, bucket_mb: float = 25.0):
        self.ctx = ctx
        self.params = [p for p in params if p.requires_grad]
        limit = max(1, int(bucket_mb * 2**20))
        self.buckets: list[list[nn.Parameter]] = []
        current: dict[torch.dtype, list[nn.Parameter]] = {}
        size: dict[torch.dtype, int] = {}
        for p in self.params:
            b = current.setdefault(p.dtype, [])
            if b and size[p.dtype] + p.numel() * p.element_size() > limit:
                self.buckets.append(b)
                b = current[p.dtype] = []
                size[p.dtype] = 0
            b.append(p)
            size[p.dtype] = size.get(p.dtype, 0) + p.numel() * p.element_size()
        self.buckets.extend(b for b in current.values() if b)

    def __call__(self, model: nn.Module | None = None) -> None:
        if self.ctx.dp == 1:
            return
        for bucket in self.buckets:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.ctx.dp_group)
            offset = 0
            for p in bucket:
                n = p.numel()
                chunk = flat[offset:offset + n].view_as(p)
                if p.grad is None:
                    p.grad = chunk.clone()
                else:
                    p.grad.copy_(chunk)
                offset += n


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
        specs = shard_specs(model)
        self.counted: dict[int, bool] = {}
        for name, p in model.named_parameters():
            h = _holders(specs.get(name), ctx.tp)
            self.counted[id(p)] = ctx.tp_rank % h == 0

    def __call__(self, params: Iterable[nn.Parameter]) -> torch.Tensor:
        params = [p for p in params if p.grad is not None]
        if self.ctx.tp == 1 and self.ctx.pp == 1:  # nothing sharded: torch's own (foreach) total norm
            return torch.nn.utils.get_total_norm([p.grad for p in params])
        device = params[0].grad.device if params else torch.device("cpu")
        sq = torch.zeros((), dtype=torch.float32, device=device)
        mine = [p.grad for p in params if self.counted.get(id(p), True)]
        if mine:
            norms = torch.stack([torch.linalg.vector_norm(g.float()) for g in mine])
            sq = (norms * norms).sum()
        for group, size in ((self.ctx.tp_group, self.ctx.tp), (self.ctx.pp_group, self.ctx.pp)):
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
    """AdamW with its state sharded over data parallel (ZeRO stage 1).

    param_groups: as for torch.optim ({"params": [...], "weight_decay": ...}); every dp rank must pass the
    same parameters in the same order. The inner optimizer steps this rank's slices: views of fp32
    parameters, fp32 copies of others; `param_groups` exposes the inner groups, so setting g["lr"]
    works as with a plain optimizer.
    """

    def __init__(self, param_groups: list[dict], ctx: ParallelContext, *, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 make_inner: Callable[..., torch.optim.Optimizer] = adamw):
        self.ctx = ctx
        self.params = [p for g in param_groups for p in g["params"]]
        total = sum(p.numel() for p in self.params)
        self.shard = math.ceil(total / ctx.dp)
        lo, hi = ctx.dp_rank * self.shard, min(total, (ctx.dp_rank + 1) * self.shard)
        # (param, start, end, master) for the pieces of the flat vector owned here
        self.slices: list[tuple[nn.Parameter, int, int, nn.Parameter]] = []
        inner_groups, offset = [], 0
        for g in param_groups:
            mine = []
            for p in g["params"]:
                a, b = max(lo, offset), min(hi, offset + p.numel())
                if a < b:
                    piece = p.detach().view(-1)[a - offset:b - offset]
                    # fp32 parameters are their own masters: the inner AdamW updates a view of them in
                    # place (no copy, and a checkpoint loaded into the model later is seen at once)
                    master = nn.Parameter(piece if p.dtype == torch.float32 else piece.float().clone())
                    self.slices.append((p, a - offset, b - offset, master))
                    mine.append(master)
                offset += p.numel()
            inner_groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": mine})
        self.total = total
        self.inner = make_inner(inner_groups, lr=lr, betas=betas, eps=eps)

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
        """The inner optimizer's: a fused inner AdamW divides this rank's gradient slices by it in its kernel
        (how trainer.clipped_step folds in the clip coefficient)."""
        return getattr(self.inner, "grad_scale", None)

    @grad_scale.setter
    def grad_scale(self, value: torch.Tensor | None) -> None:
        self.inner.grad_scale = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        for p, a, b, master in self.slices:
            g = p.grad
            master.grad = None if g is None else g.reshape(-1)[a:b].to(torch.float32)
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
        """Every rank puts its updated slice into a flat buffer; all-gather rebuilds all parameters.

        (A transient buffer the size of this rank's model shard; the parameters themselves are not
        kept in one flat buffer, so the model's tensors stay ordinary.)"""
        if self.ctx.dp == 1 or not self.params:
            return
        p0 = self.params[0]
        flat = torch.zeros(self.shard * self.ctx.dp, dtype=p0.dtype, device=p0.device)
        offsets, off = {}, 0
        for p in self.params:
            offsets[id(p)] = off
            off += p.numel()
        for p, a, b, _ in self.slices:
            flat[offsets[id(p)] + a:offsets[id(p)] + b].copy_(p.view(-1)[a:b])
        parts = list(flat.chunk(self.ctx.dp))
        mine = parts[self.ctx.dp_rank].clone()
        dist.all_gather(parts, mine, group=self.ctx.dp_group)
        for p in self.params:
            p.copy_(flat[offsets[id(p)]:offsets[id(p)] + p.numel()].view_as(p))

    def state_dict(self) -> dict:
        """This dp rank's shard of the optimizer state (checkpointed per rank) and the layout it needs."""
        return {"inner": self.inner.state_dict(), "zero": {"dp": self.ctx.dp, "dp_rank": self.ctx.dp_rank,
                                                           "total": self.total, "shard": self.shard}}

    def load_state_dict(self, state: dict) -> None:
        z = state.get("zero", {})
        want = {"dp": self.ctx.dp, "dp_rank": self.ctx.dp_rank, "total": self.total, "shard": self.shard}
        if z != want:
            raise ValueError(f"ZeRO-1 optimizer state was saved for {z}, this run is {want}; resume with the "
                             f"same --tp/--pp/--nproc layout")
        self.inner.load_state_dict(state["inner"])
        self.sync_masters()

