"""Memory / parallelism / time planner. Checks its own arithmetic on the meta device (no memory used)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llamactl.config import ModelConfig

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}


@dataclass
class ParamReport:
    size: str
    params: int
    meta_params: int
    bytes_per_dtype: dict[str, int]


def count_on_meta(cfg: ModelConfig, ctx=None, head: str = "lm") -> int:
    """Parameters of this rank's shard, counted by instantiating it on the meta device (instant)."""
    from llamactl.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg, ctx, head)
    return sum(p.numel() for p in model.parameters())


def param_report(size: str, cfg: ModelConfig) -> ParamReport:
    n = cfg.num_params()
    return ParamReport(size, n, count_on_meta(cfg), {k: n * b for k, b in DTYPE_BYTES.items()})
