"""Megatron-style tensor, pipeline and data parallelism on torch.distributed (gloo on CPU, NCCL on GPU).

Imports nothing from the llamactl core: the ParallelContext is the only state and is passed explicitly.
"""
from llamactl.parallel.context import LayoutError, ParallelContext

__all__ = ["LayoutError", "ParallelContext"]
