"""Pipeline parallelism: stage partitioning (1F1B schedule and p2p come with the parallel issue)."""
from __future__ import annotations


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
