"""ParallelContext: the tensor / pipeline / data parallel groups of one rank. The only parallel state.

Rank layout (Megatron's order): tp varies fastest, then dp, then pp:
    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank
so the ranks of one tensor-parallel group are neighbours (one node, NVLink) and pipeline stages are
the outermost split (cheap p2p across nodes).

Every rank builds one context and passes it explicitly; nothing here is a module-level global.
torch.distributed is imported where groups are made, so the CLI can name a bad layout (and parse its
flags, print --help) without loading torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field



class LayoutError(ValueError):
    """A parallel layout that cannot work for this world or model (a user error, reported in one line)."""


# what each layout number is, for messages that name the flag
_LAYOUT_FLAGS = {"--tp": "tensor-parallel degree", "--pp": "pipeline-parallel degree",
                 "--nproc": "process count per node", "--nnodes": "node count"}


def check_layout(tp: int = 1, pp: int = 1, *, nproc: int | None = None, nnodes: int = 1,
                 world: int | None = None) -> int:
    """The one check of the layout numbers; returns dp (1 while the world is unknown).

    Every number must be at least 1, and tp * pp must divide the world: `world` when it is known
    (a launched process group), else nproc * nnodes when nproc is given. Raises a one-line LayoutError
    naming the flag, so no caller ever divides by a zero or negative degree.
    """
    for flag, value in (("--tp", tp), ("--pp", pp), ("--nproc", nproc), ("--nnodes", nnodes)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise LayoutError(f"{flag} {value!r} is not a valid {_LAYOUT_FLAGS[flag]}: it must be at least 1 ({flag})")
    if world is None and nproc is not None:
        world = nproc * nnodes
        where = "--tp/--pp/--nproc" + (" x --nnodes" if nnodes > 1 else "")
        of = f"the {world} processes (--nproc {nproc}" + (f" x --nnodes {nnodes})" if nnodes > 1 else ")")
    else:
        where, of = "--tp/--pp/--nproc", f"the world of {world} processes"
    if world is None:
        return 1
    if world % (tp * pp):
        raise LayoutError(f"--tp {tp} x --pp {pp} = {tp * pp} does not divide {of} ({where})")
    return world // (tp * pp)


@dataclass
class ParallelContext:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    rank: int = 0
    tp_group: object | None = None
    pp_group: object | None = None
    dp_group: object | None = None
    # ranks (global) of this rank's groups, in group order
    tp_ranks: list[int] = field(default_factory=lambda: [0])
    pp_ranks: list[int] = field(default_factory=lambda: [0])
    dp_ranks: list[int] = field(default_factory=lambda: [0])
    virtual_stages: int = 1  # interleaved 1F1B: layer chunks per pipeline rank (no groups of its own)
    _kv_groups: dict = field(default_factory=dict, repr=False)

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def single(cls) -> "ParallelContext":
        """One process, no communication: every parallel layer degenerates to the plain one."""
        return cls()

    @classmethod
    def from_world(cls, tp: int = 1, pp: int = 1, virtual_stages: int = 1) -> "ParallelContext":
        """Build the groups from an initialised torch.distributed world (dp = world / (tp*pp))."""
        import torch.distributed as dist

        check_layout(tp, pp)
        if not dist.is_available() or not dist.is_initialized():
            if tp * pp != 1:
                raise LayoutError(f"tp={tp} pp={pp} needs {tp * pp} processes; launch with --nproc or torchrun (--tp/--pp)")
            return cls.single()
        world, rank = dist.get_world_size(), dist.get_rank()
        dp = check_layout(tp, pp, world=world)
        ctx = cls(tp=tp, pp=pp, dp=dp, rank=rank, virtual_stages=virtual_stages)
        ctx.tp_ranks, ctx.tp_group = _make_groups(rank, [[p * dp * tp + d * tp + t for t in range(tp)]
                                                          for p in range(pp) for d in range(dp)])
        ctx.dp_ranks, ctx.dp_group = _make_groups(rank, [[p * dp * tp + d * tp + t for d in range(dp)]
                                                          for p in range(pp) for t in range(tp)])
        ctx.pp_ranks, ctx.pp_group = _make_groups(rank, [[p * dp * tp + d * tp + t for p in range(pp)]
                                                          for d in range(dp) for t in range(tp)])
        return ctx

    # ---- coordinates --------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_main(self) -> bool:
        """The rank that prints and writes run-level files (metrics, config)."""
        return self.rank == 0

    # ---- model validation ---------------------------------------------------------------------------
    def validate(self, n_heads: int, n_kv_heads: int, n_layers: int, vocab_size: int, ffn_dim: int) -> None:
        """Raise LayoutError, naming the flag, if this layout cannot shard the model."""
        tp, pp = self.tp, self.pp
        check_layout(tp, pp)
        if n_heads % tp:
            raise LayoutError(f"--tp {tp} does not divide the {n_heads} attention heads")
        if n_kv_heads % tp and tp % n_kv_heads:
            raise LayoutError(f"--tp {tp} neither divides nor is a multiple of the {n_kv_heads} kv heads")
        if vocab_size % tp:
            raise LayoutError(f"--tp {tp} does not divide the vocabulary of {vocab_size}")
        if ffn_dim % tp:
            raise LayoutError(f"--tp {tp} does not divide the FFN size {ffn_dim}")
        if pp > n_layers:
            raise LayoutError(f"--pp {pp} is larger than the {n_layers} layers")
        if pp * self.virtual_stages > n_layers:
            raise LayoutError(f"--pp {pp} x --virtual-stages {self.virtual_stages} = {pp * self.virtual_stages} "
                              f"layer chunks is more than the {n_layers} layers")

    def kv_replica_group(self, n_kv_heads: int):
        """Group of tp ranks that hold a copy of the same kv head when tp > n_kv_heads (GQA replicated).

        Created lazily but collectively: every rank of the world must call this in the same order
        (the model constructor does, identically on all ranks).
        """
        if self.tp <= n_kv_heads:
            return None
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            return None  # a context without a world: shapes only (meta-device planning), no communication
        if n_kv_heads not in self._kv_groups:
            rep = self.tp // n_kv_heads
            chosen = None
            world_groups = []
            for p in range(self.pp):
                for d in range(self.dp):
                    base = p * self.dp * self.tp + d * self.tp
                    for h in range(n_kv_heads):
                        world_groups.append([base + h * rep + r for r in range(rep)])
            _, chosen = _make_groups(self.rank, world_groups)
            self._kv_groups[n_kv_heads] = chosen
        return self._kv_groups[n_kv_heads]


def _make_groups(rank: int, all_groups: list[list[int]]):
    """Create every group collectively (torch requires all ranks to call new_group for each)."""
    import torch.distributed as dist

    mine_ranks, mine = None, None
    for ranks in all_groups:
        g = dist.new_group(ranks) if len(ranks) > 1 else None
        if rank in ranks:
            mine_ranks, mine = ranks, g
    return mine_ranks, mine
