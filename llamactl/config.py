"""Typed configuration: model presets with the published Llama 2 shapes, and the parallel layout.

Stage configs (pretrain, sft, ...) live next to their stage but are plain dataclasses too; the CLI only
maps flags onto these objects.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from llamactl.errors import LlamactlError


@dataclass
class ModelConfig:
    """Shape of a Llama 2 transformer (field names follow Meta's params.json)."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise LlamactlError(f"dim {self.dim} is not divisible by n_heads {self.n_heads} (model config)")
        if self.n_heads % self.kv_heads:
            raise LlamactlError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.kv_heads} (model config)")
        if self.head_dim % 2:
            raise LlamactlError(f"head_dim {self.head_dim} must be even for RoPE (model config)")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        """Meta's rule: h = int(2*4*dim/3); h = int(mult*h) if mult; round up to multiple_of."""
        h = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            h = int(self.ffn_dim_multiplier * h)
        return self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)

    def num_params(self) -> int:
        """Exact parameter count (embedding and output untied, no biases)."""
        d, hd = self.dim, self.head_dim
        attn = d * self.n_heads * hd + 2 * d * self.kv_heads * hd + self.n_heads * hd * d
        ffn = 3 * d * self.ffn_dim
        per_layer = attn + ffn + 2 * d
        return 2 * self.vocab_size * d + self.n_layers * per_layer + d

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise LlamactlError(f"unknown model config keys {sorted(unknown)}")
        return cls(**d)


# Published shapes. tiny and small are for CPU work; tiny has GQA so GQA is always exercised.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=2048, multiple_of=32, max_seq_len=512),
    "small": ModelConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, vocab_size=32000, multiple_of=256, max_seq_len=1024),
    "7b": ModelConfig(dim=4096, n_layers=32, n_heads=32),
    "13b": ModelConfig(dim=5120, n_layers=40, n_heads=40),
    "34b": ModelConfig(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, max_seq_len=16384),
    "70b": ModelConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096),
}

# Peak learning rate of pretraining per size (paper, Table 1 / section 2.2).
PRETRAIN_PEAK_LR = {"tiny": 3e-3, "small": 1e-3, "7b": 3e-4, "13b": 3e-4, "34b": 1.5e-4, "70b": 1.5e-4}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A fresh copy of a preset, with overrides applied (e.g. vocab_size from a tokenizer)."""
    if name not in PRESETS:
        raise LlamactlError(f"unknown size {name!r}; choose one of {', '.join(PRESETS)} (--size)")
    return dataclasses.replace(PRESETS[name], **overrides)


@dataclass
class ParallelConfig:
    """Requested layout: tensor, pipeline parallel degrees; data parallel fills the rest of the world.

    nproc and nnodes mean what the flags of the same name mean (processes per node, nodes); zero shards the
    AdamW state over data parallel (ZeRO-1)."""

    tp: int = 1
    pp: int = 1
    nproc: int = 1
    nnodes: int = 1
    zero: bool = False
    sequence_parallel: bool | None = None  # Megatron-SP inside the tp group; None: on when tp > 1
    virtual_stages: int = 1  # interleaved 1F1B: model chunks per pipeline rank (1: plain 1F1B)
    overlap_grad_reduce: bool = True  # dp gradient buckets reduced from backward hooks as they fill

    @property
    def sp(self) -> bool:
        """Sequence parallelism as the planner counts it (GPUs, NCCL): on whenever tp > 1 unless
        --no-sequence-parallel. Training passes `sequence_parallel` itself: its default (None) is resolved by the
        backend, off on gloo where SP is slower (parallel.sequence.use_sequence_parallel)."""
        return self.tp > 1 if self.sequence_parallel is None else bool(self.sequence_parallel and self.tp > 1)

    @property
    def world(self) -> int:
        return self.nproc * self.nnodes

    @property
    def dp(self) -> int:
        return max(1, self.world // (self.tp * self.pp))

    def validate(self) -> None:
        """Every degree >= 1 and tp * pp dividing the world (parallel.context.check_layout: the one check)."""
        from llamactl.parallel.context import check_layout

        check_layout(self.tp, self.pp, nproc=self.nproc, nnodes=self.nnodes)
        if not isinstance(self.zero, bool):
            raise LlamactlError(f"zero must be true or false, got {self.zero!r} (--zero)")
        if not isinstance(self.virtual_stages, int) or self.virtual_stages < 1:
            raise LlamactlError(f"virtual stages must be an integer >= 1, got {self.virtual_stages!r} (--virtual-stages)")
        if self.virtual_stages > 1 and self.pp == 1:
            raise LlamactlError(f"--virtual-stages {self.virtual_stages} needs pipeline parallelism (--pp > 1)")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a --config file; sections map onto dataclasses ([model], [train], [parallel], ...)."""
    p = Path(path)
    if not p.is_file():
        raise LlamactlError(f"config file not found ({p})")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise LlamactlError(f"config file is not valid TOML: {e} ({p})") from None


def load_sections(config_file: str | Path | None, sections: tuple[str, ...]) -> dict[str, Any]:
    """A stage's --config file (empty without one); a section the stage does not read is an error."""
    file = load_toml(config_file) if config_file else {}
    unknown = set(file) - set(sections)
    if unknown:
        use = ", ".join(f"[{s}]" for s in sections)
        raise LlamactlError(f"unknown sections {sorted(unknown)} (--config {config_file}); use {use}")
    return file


def section_config(default: Any, section: str, file: dict[str, Any], flags: dict[str, Any],
                   config_file: str | Path | None) -> Any:
    """default <- the file's [section] <- the flags the user gave (None: not given)."""
    c = apply_overrides(default, file.get(section, {}), f"[{section}] in {config_file}")
    return apply_overrides(c, {k: v for k, v in flags.items() if v is not None}, "flags")


def apply_overrides(obj: Any, values: dict[str, Any], where: str) -> Any:
    """Return a copy of dataclass obj with values set, rejecting unknown keys by name. Later layers go on top
    of earlier ones: preset <- config file <- flags (pass only the flags the user gave)."""
    known = {f.name for f in fields(obj)}
    unknown = set(values) - known
    if unknown:
        raise LlamactlError(f"unknown keys {sorted(unknown)} ({where})")
    return dataclasses.replace(obj, **values)


def dump_toml(sections: dict[str, Any]) -> str:
    """Write dataclasses / dicts as TOML (flat sections, scalars and lists only), for run dirs."""
    lines: list[str] = []
    for name, obj in sections.items():
        d = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(obj)
        lines.append(f"[{name}]")
        for k, v in d.items():
            if v is None:
                continue
            lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Path):
        v = str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")

