"""Memory / parallelism / time planner. Checks its own arithmetic on the meta device (no memory used).

Memory per GPU, for the most loaded pipeline stage of a layout (tp x pp x dp):
- trainable models (bf16 autocast over fp32 master weights, as trainer.py runs on GPU): fp32 weights 4
  B/param, the bf16 working copy autocast keeps 2, fp32 gradients 4, AdamW m and v 8 -- 18 B/param; with
  ZeRO-1 (Megatron's distributed optimizer: gradients reduce-scattered into each rank's shard) the AdamW
  state (8) and the fp32 gradient kept for the update (4) are divided by dp;
- frozen models (PPO reference, reward models): bf16 weights, 2 B/param;
- activations per layer and micro-batch, Korthikanti et al. 2022 ("Reducing Activation Recomputation in
  Large Transformer Models", sections 4.1-4.2; bf16, s sequence, b micro-batch, h dim, a heads, t tp):
    stored, tensor parallel only:     s*b*h*(10 + 24/t + 5*a*s/(h*t))
    stored, sequence parallel:        s*b*h*(34 + 5*a*s/h) / t
    selective recomputation:          the 5*a*s/h attention-score term goes: s*b*h*(10 + 24/t), with SP
                                      s*b*h*34/t. llamactl's attention kernels (flash / memory-efficient
                                      scaled_dot_product_attention, kernels/) never store the scores, so
                                      selective is what they do whether or not --recompute is given;
    full recomputation (--recompute): the layer inputs only (2*s*b*h, /t with SP) plus one layer's
                                      (selective) activations while it is recomputed.
  Under 1F1B the first stage holds min(pp, micro-batches) micro-batches in flight; interleaved 1F1B with V
  virtual stages holds (p-r-1)*2 + (V-1)*p + 1 chunks of layers/(p*V) layers on stage r (Megatron's
  warm-up), L*(1 + (p-1)/(p*V)) layers' worth on the first stage. The last stage also holds the fp32
  logits and the cross-entropy softmax (2 x 4 B x s*b*V/t);
- generation (PPO rollouts): the bf16 KV cache, 2 x layers x batch x seq x kv_heads/t x head_dim x 2 B.

Time: model FLOPs per token = 6 x (matmul parameters) + 6 x layers x dim x seq (causal attention),
trainer.model_flops_per_token's formula; step time = FLOPs / (GPUs x peak x MFU). Pipeline bubble
(p-1)/(V*m + p-1) for m micro-batches (Narayanan et al. 2021; V = 1: plain 1F1B). Data-parallel traffic per
rank and step: a ring all-reduce of the rank's fp32 gradients, 2*(dp-1)/dp * 4 B/param; ZeRO-1's
reduce-scatter + all-gather send the same bytes; overlapped with backward (--overlap-grad-reduce).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from llamactl.config import ModelConfig, preset
from llamactl.errors import LlamactlError

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}
GIB = 2**30

# Paper, Table 2: pretraining GPU hours on A100-80GB for 2.0T tokens (Table 1), sequence length 4096.
PAPER_GPU_HOURS = {"7b": 184_320, "13b": 368_640, "34b": 1_038_336, "70b": 1_720_320}
PAPER_TOKENS = 2.0e12
A100_BF16_FLOPS = 312e12

STAGES = ("pretrain", "sft", "rm", "ppo")
GPUS_PER_NODE = 8  # default node size: tensor parallelism stays within a node's NVLink domain
# global batch in sequences (paper): pretraining 4M tokens at 4096; SFT 64; reward models 1024 rows
# (512 pairs); PPO 512 prompts per iteration (mini-batch 64).
STAGE_ROWS = {"pretrain": 1024, "sft": 64, "rm": 1024, "ppo": 512}

ZERO_SHARDED_BYTES = 8              # AdamW m + v, per dp rank (fp32 weights are their own masters)
RECOMPUTE = ("none", "selective", "full")  # activation recomputation, cheapest first


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


# ---- per-rank arithmetic ----------------------------------------------------------------------------
def kv_local(cfg: ModelConfig, tp: int) -> int:
    return cfg.kv_heads // tp if cfg.kv_heads % tp == 0 else 1


def stage_param_count(cfg: ModelConfig, tp: int, pp: int, pp_rank: int, head: str = "lm") -> int:
    """Planned parameters of one rank of pipeline stage pp_rank (any tp rank: the shards are equal)."""
    from llamactl.parallel.pipeline import stage_layers

    d, hd = cfg.dim, cfg.head_dim
    layer = (d * (cfg.n_heads // tp) * hd * 2 + 2 * d * kv_local(cfg, tp) * hd
             + 3 * d * (cfg.ffn_dim // tp) + 2 * d)
    n = len(stage_layers(cfg.n_layers, pp, pp_rank)) * layer
    if pp_rank == 0:
        n += cfg.vocab_size // tp * d
    if pp_rank == pp - 1:
        n += d + (cfg.vocab_size // tp * d if head == "lm" else d)
    return n


def layout_error(cfg: ModelConfig, tp: int, pp: int) -> str | None:
    """Why tp/pp cannot shard this model (None: it can)."""
    from llamactl.parallel.context import LayoutError, ParallelContext

    try:
        ParallelContext(tp=tp, pp=pp).validate(cfg.n_heads, cfg.kv_heads, cfg.n_layers, cfg.vocab_size, cfg.ffn_dim)
    except LayoutError as e:
        return str(e)
    return None


@dataclass
class Memory:
    """Bytes per GPU of the most loaded stage, by kind."""

    weights: float = 0.0        # trainable fp32 master + bf16 working copy
    grads: float = 0.0
    optimizer: float = 0.0
    frozen: float = 0.0         # bf16 weights of models that do not train (PPO)
    activations: float = 0.0
    logits: float = 0.0
    kv_cache: float = 0.0

    @property
    def total(self) -> float:
        # PPO generates (KV cache) and trains (activations) at different times
        return self.weights + self.grads + self.optimizer + self.frozen + max(self.activations + self.logits,
                                                                              self.kv_cache)


@dataclass
class Option:
    tp: int
    pp: int
    dp: int
    zero: bool
    recompute: str              # none | selective | full (RECOMPUTE)
    n_micro: int
    memory: Memory
    fits: bool
    sp: bool = False            # sequence parallelism (tp > 1)
    virtual: int = 1            # interleaved 1F1B virtual stages

    @property
    def bubble(self) -> float:
        """Idle fraction of the pipeline: (p-1)/(V*m + p-1)."""
        return bubble(self.pp, self.n_micro, self.virtual)

    @property
    def short(self) -> str:
        """'selective, SP, ZeRO-1' (the layouts table's fits column)."""
        parts = [{"none": "stored", "selective": "selective", "full": "full"}[self.recompute]]
        return ", ".join(parts + (["SP"] if self.sp else []) + (["ZeRO-1"] if self.zero else []))

    @property
    def setting(self) -> str:
        """'selective, SP, ZeRO-1': what this option turns on, for tables and the closing line."""
        parts = [{"none": "no recomputation", "selective": "selective recomputation",
                  "full": "full recomputation"}[self.recompute]]
        return ", ".join(parts + (["SP"] if self.sp else []) + (["ZeRO-1"] if self.zero else []))


@dataclass
class Plan:
    size: str
    cfg: ModelConfig
    stage: str
    gpus: int
    gpu_mem: float
    per_node: int
    seq_len: int
    micro_batch: int
    rows: int
    gen_batch: int
    chosen: Option | None
    options: list[Option]
    flops_per_step: float
    tokens_per_step: int
    step_time: float | None
    total_tokens: float | None
    mfu: float
    peak_flops: float
    checks: list[tuple[str, int, int, int]] = field(default_factory=list)  # (head, stage, planned, meta)
    virtual_stages: int = 1     # --virtual-stages asked for (layouts whose stages do not split use 1)

    @property
    def check_ok(self) -> bool:
        return bool(self.checks) and all(p == m for _, _, p, m in self.checks)


def _models(stage: str) -> tuple[list[str], list[str]]:
    """(trainable heads, frozen heads) of a stage: PPO trains policy + value, keeps reference + 2 RMs."""
    if stage == "ppo":
        return ["lm", "value"], ["lm", "reward", "reward"]
    if stage == "rm":
        return ["reward"], []
    return ["lm"], []


def layer_activations(cfg: ModelConfig, tp: int, seq: int, micro_batch: int, *, sp: bool, recompute: str) -> float:
    """Bytes of one layer's stored activations for one micro-batch (Korthikanti et al. 2022; module doc).
    recompute 'full' gives the working set of the one layer being recomputed (selective)."""
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    s, b, h, a, t = seq, micro_batch, cfg.dim, cfg.n_heads, tp
    scores = 5 * a * s / h if recompute == "none" else 0.0
    if sp:
        return s * b * h * (34 + scores) / t
    return s * b * h * (10 + 24 / t + scores / t)


def layers_in_flight(n_layers: int, pp: int, r: int, n_micro: int, virtual: int = 1) -> float:
    """Layers' worth of micro-batch activations stage r holds at its peak under 1F1B (virtual = 1) or
    interleaved 1F1B: min(p - r, m) micro-batches of its layers, or Megatron's warm-up of
    (p-r-1)*2 + (V-1)*p + 1 chunks (at most m*V) of layers/V each."""
    from llamactl.parallel.pipeline import stage_layers

    layers = len(stage_layers(n_layers, pp, r))
    if virtual == 1:
        return min(pp - r, n_micro) * layers
    chunks = min((pp - r - 1) * 2 + (virtual - 1) * pp + 1, n_micro * virtual)
    return chunks * layers / virtual


def bubble(pp: int, n_micro: int, virtual: int = 1) -> float:
    """Pipeline bubble of (interleaved) 1F1B: (p-1)/(V*m + p-1)."""
    return (pp - 1) / (virtual * n_micro + pp - 1)


def memory_for(cfg: ModelConfig, stage: str, tp: int, pp: int, dp: int, *, zero: bool, recompute: str,
               seq: int, micro_batch: int, n_micro: int, gen_batch: int, sp: bool = False,
               virtual: int = 1) -> Memory:
    """Memory per GPU of the most loaded pipeline stage (max over stages of the total)."""
    from llamactl.parallel.pipeline import stage_layers

    trainable, frozen = _models(stage)
    best = None
    s, b, h = seq, micro_batch, cfg.dim
    sp = sp and tp > 1
    shard = zero and dp > 1
    work = layer_activations(cfg, tp, s, b, sp=sp, recompute="selective" if recompute == "full" else recompute)
    for r in range(pp):
        m = Memory()
        for head in trainable:
            n = stage_param_count(cfg, tp, pp, r, head)
            m.weights += 6 * n
            m.grads += 4 * n / dp if shard and n_micro == 1 else 4 * n  # accumulation holds the full gradient
            m.optimizer += ZERO_SHARDED_BYTES * n / dp if shard else 8 * n
        for head in frozen:
            m.frozen += 2 * stage_param_count(cfg, tp, pp, r, head)
        layers = len(stage_layers(cfg.n_layers, pp, r))
        held = layers_in_flight(cfg.n_layers, pp, r, n_micro, virtual)
        if recompute == "full":
            m.activations = held * 2 * s * b * h / (tp if sp else 1) + work
        else:
            m.activations = held * work
        if r == pp - 1 and "lm" in trainable:
            m.logits = 2 * 4 * s * b * cfg.vocab_size / tp
        if stage == "ppo":
            m.kv_cache = 2 * layers * gen_batch * s * kv_local(cfg, tp) * cfg.head_dim * 2
        if best is None or m.total > best.total:
            best = m
    return best


def flops_per_token(cfg: ModelConfig, seq: int) -> float:
    """Training FLOPs per token: the trainer's formula (flops.model_flops_per_token), one definition."""
    from llamactl.flops import model_flops_per_token

    return model_flops_per_token(cfg, seq)


def stage_flops_per_token(cfg: ModelConfig, stage: str, seq: int) -> float:
    """PPO per token: policy + value train (6N each), reference + 2 reward models + value score (2N each),
    generation of the rollout (2N, memory bound in practice). Other stages: one model trains (6N)."""
    train = flops_per_token(cfg, seq)
    if stage != "ppo":
        return train
    fwd = train / 3
    return 2 * train + 4 * fwd + fwd


def paper_mfu() -> list[tuple[str, float, float, float]]:
    """(size, GPU hours, model FLOPs of 2T tokens at seq 4096, implied MFU on A100 bf16 peak)."""
    out = []
    for size, hours in PAPER_GPU_HOURS.items():
        f = flops_per_token(preset(size), 4096) * PAPER_TOKENS
        out.append((size, hours, f, f / (hours * 3600 * A100_BF16_FLOPS)))
    return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def make_plan(size: str, stage: str = "pretrain", *, gpus: int = 8, gpu_mem: float = 80.0, nodes: int | None = None,
              seq_len: int | None = None, micro_batch: int = 1, tokens: float | None = None, mfu: float = 0.4,
              peak_tflops: float = 312.0, gen_batch: int = 64, tp: int | None = None, pp: int | None = None,
              usable: float = 0.9, check: bool = True, cfg: ModelConfig | None = None, rows: int | None = None,
              virtual_stages: int = 1) -> Plan:
    """Evaluate every layout (or the given tp/pp) and pick the smallest model-parallel one that fits.

    cfg overrides the preset's shape (e.g. a run's resolved model config); size is then just its name.
    rows: the global batch in sequences (a run's own; default: the paper's for the stage).
    virtual_stages: interleaved 1F1B's V for layouts with pp > 1 whose stages split into V equal chunks.
    """
    cfg = cfg or preset(size)
    if stage not in STAGES:
        raise LlamactlError(f"unknown stage {stage!r}; one of {', '.join(STAGES)} (--stage)")
    if nodes is None:
        nodes = max(1, math.ceil(gpus / GPUS_PER_NODE))
    if gpus < 1 or nodes < 1 or gpus % nodes:
        raise LlamactlError(f"--gpus {gpus} must be a positive multiple of --nodes {nodes}")
    if gpu_mem <= 0 or micro_batch < 1 or not 0 < mfu <= 1:
        raise LlamactlError("--gpu-mem and --micro-batch must be positive, --mfu in (0, 1]")
    per_node = gpus // nodes
    if seq_len is not None and seq_len < 1:
        raise LlamactlError(f"--seq-len must be >= 1, got {seq_len} (--seq-len)")
    if not isinstance(virtual_stages, int) or virtual_stages < 1:
        raise LlamactlError(f"--virtual-stages must be >= 1, got {virtual_stages} (--virtual-stages)")
    seq = seq_len if seq_len is not None else min(4096, cfg.max_seq_len)
    if rows is None:
        rows = max(1, 4 * 2**20 // seq) if stage == "pretrain" else STAGE_ROWS[stage]  # pretraining: 4M tokens
    elif rows < 1:
        raise LlamactlError(f"the global batch must hold at least one sequence, got {rows}")
    if tp is not None or pp is not None:
        tp, pp = 1 if tp is None else tp, 1 if pp is None else pp
        if tp < 1 or pp < 1:
            raise LlamactlError(f"--tp {tp} and --pp {pp} must be >= 1")
        err = layout_error(cfg, tp, pp)
        if err:
            raise LlamactlError(err)
        if gpus % (tp * pp):
            raise LlamactlError(f"--tp {tp} x --pp {pp} does not divide the {gpus} GPUs (--gpus / --nproc)")
        layouts = [(tp, pp)]
    else:
        tps = [t for t in _divisors(per_node) if t & (t - 1) == 0]
        layouts = [(t, p) for t in tps for p in _divisors(gpus // t)
                   if layout_error(cfg, t, p) is None]
    options = []
    for t, p in layouts:
        dp = gpus // (t * p)
        n_micro = max(1, rows // (dp * micro_batch))
        v = virtual_stages if p > 1 and cfg.n_layers % (p * virtual_stages) == 0 else 1
        for rec in RECOMPUTE:
            for zero in ((False, True) if dp > 1 else (False,)):
                for sp in ((False, True) if t > 1 else (False,)):
                    m = memory_for(cfg, stage, t, p, dp, zero=zero, recompute=rec, seq=seq, micro_batch=micro_batch,
                                   n_micro=n_micro, gen_batch=min(gen_batch, math.ceil(rows / dp)), sp=sp, virtual=v)
                    options.append(Option(t, p, dp, zero, rec, n_micro, m, m.total <= usable * gpu_mem * GIB, sp, v))
    # no full recomputation if any layout can avoid it (it costs a third more compute, more than a deeper
    # pipeline's bubble); then the smallest model-parallel group, within it the widest tp (NVLink) and fewest
    # pipeline stages; then the cheapest setting that fits: the least recomputation, no ZeRO-1, and sequence
    # parallelism (free: its all-gather + reduce-scatter move the bytes of the all-reduce they replace)
    order = sorted(options, key=lambda o: (o.recompute == "full", o.tp * o.pp, -o.tp, RECOMPUTE.index(o.recompute),
                                           o.zero, not o.sp))
    chosen = next((o for o in order if o.fits), None)
    if chosen is None and len(layouts) == 1:
        chosen = min(options, key=lambda o: o.memory.total)
    tokens_per_step = rows * seq
    fpt = stage_flops_per_token(cfg, stage, seq)
    flops_step = fpt * tokens_per_step
    peak = peak_tflops * 1e12
    step_time = flops_step / (gpus * peak * mfu)
    plan = Plan(size, cfg, stage, gpus, gpu_mem, per_node, seq, micro_batch, rows, gen_batch, chosen, options,
                flops_step, tokens_per_step, step_time, tokens, mfu, peak, virtual_stages=virtual_stages)
    if check and chosen is not None:
        plan.checks = meta_check(cfg, stage, chosen.tp, chosen.pp)
    return plan


def meta_check(cfg: ModelConfig, stage: str, tp: int, pp: int) -> list[tuple[str, int, int, int]]:
    """Build every stage's shard (tp rank 0 and the last tp rank) on the meta device: planned == built."""
    from llamactl.parallel.context import ParallelContext

    heads = sorted(set(_models(stage)[0] + _models(stage)[1]))
    out = []
    for head in heads:
        for r in range(pp):
            planned = stage_param_count(cfg, tp, pp, r, head)
            built = {count_on_meta(cfg, ParallelContext(tp=tp, pp=pp, dp=1, rank=r * tp + t), head)
                     for t in sorted({0, tp - 1})}
            out.append((head, r, planned, built.pop() if len(built) == 1 else -1))
    return out


# ---- printing ---------------------------------------------------------------------------------------
def _gib(x: float) -> str:
    return f"{x / GIB:,.1f}"


def _dur(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:,.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:,.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:,.1f} h"
    return f"{seconds / 86400:,.1f} days"


def print_plan(plan: Plan) -> None:
    """Rich tables: the model, memory per GPU, layouts, time, the meta-device check, the paper's MFU."""
    from llamactl.ui import console, table

    c = plan.cfg
    console.print(table(f"{plan.size} for {plan.stage} on {plan.gpus} GPUs x {plan.gpu_mem:g} GiB "
                        f"({plan.per_node} per node)", ["", "value"], [
        ["parameters", f"{c.num_params():,}"],
        ["layers / dim / heads / kv heads", f"{c.n_layers} / {c.dim} / {c.n_heads} / {c.kv_heads}"],
        ["models", " + ".join(f"{h} (trains)" for h in _models(plan.stage)[0])
         + "".join(f" + {h} (frozen)" for h in _models(plan.stage)[1])],
        ["sequence length / micro-batch", f"{plan.seq_len} / {plan.micro_batch}"],
        ["global batch", f"{plan.rows} sequences ({plan.tokens_per_step:,} tokens)"],
    ]))
    o = plan.chosen
    if o is not None:
        m = o.memory
        by_dp = f" (ZeRO-1 / dp {o.dp})" if o.zero else ""
        rows = [["trainable weights (fp32 + bf16 copy)", _gib(m.weights)], [f"gradients (fp32){by_dp}", _gib(m.grads)],
                [f"AdamW state{by_dp}", _gib(m.optimizer)]]
        if m.frozen:
            rows.append(["frozen models (bf16)", _gib(m.frozen)])
        held = layers_in_flight(plan.cfg.n_layers, o.pp, 0, o.n_micro, o.virtual)
        rows.append([f"activations ({o.setting.split(', ZeRO-1')[0]}, {held:g} layers' worth of micro-batches "
                     f"in flight{f', V {o.virtual}' if o.virtual > 1 else ''})", _gib(m.activations)])
        if m.logits:
            rows.append(["logits + softmax (last stage)", _gib(m.logits)])
        if m.kv_cache:
            rows.append([f"KV cache (generation, {min(plan.gen_batch, math.ceil(plan.rows / o.dp))} rows)",
                         _gib(m.kv_cache)])
        rows.append(["total", _gib(m.total)])
        rows.append(["usable (90 %)", _gib(0.9 * plan.gpu_mem * GIB)])
        console.print(table(f"memory per GPU (GiB), tp {o.tp} x pp {o.pp} x dp {o.dp}", ["", "GiB"], rows))
    keys = []
    for x in sorted(plan.options, key=lambda x: (x.tp * x.pp, -x.tp)):
        if (x.tp, x.pp) not in keys:
            keys.append((x.tp, x.pp))
    if o is not None:  # the layouts up to the chosen one, and the next few
        keys = keys[max(0, keys.index((o.tp, o.pp)) - 10):keys.index((o.tp, o.pp)) + 4]
    lay_rows = []
    for key in keys[:14]:
        mine = [y for y in plan.options if (y.tp, y.pp) == key]
        x = mine[0]
        by = {(y.recompute, y.zero, y.sp): y.memory.total for y in mine}
        cell = lambda r, z, sp: _gib(by[(r, z, sp)]) if (r, z, sp) in by else "-"  # noqa: E731
        full = min(y.memory.total for y in mine if y.recompute == "full")
        fits = next((y for y in sorted(mine, key=lambda y: (RECOMPUTE.index(y.recompute), y.zero, not y.sp))
                     if y.fits), None)
        lay_rows.append([x.tp, x.pp, x.dp, x.virtual, cell("none", False, False), cell("selective", False, False),
                         cell("selective", False, True), cell("selective", True, True), _gib(full), f"{x.bubble:.2%}",
                         f"yes: {fits.short}" if fits else "no"])
    console.print(table("layouts (GiB per GPU of the most loaded stage; SP: sequence parallel, selective: "
                        "attention scores recomputed, full: every layer recomputed, with SP and ZeRO-1 where they exist)",
                        ["tp", "pp", "dp", "V", "stored", "selective", "+ SP", "+ ZeRO-1", "full", "bubble", "fits"],
                        lay_rows))
    trows = [["model FLOPs per step", f"{plan.flops_per_step:.3e}"],
             [f"step time at MFU {plan.mfu:.0%} of {plan.peak_flops / 1e12:g} TFLOP/s", _dur(plan.step_time)]]
    if o is not None and o.pp > 1:
        trows.append([f"pipeline bubble (p-1)/(V*m+p-1), p {o.pp}, m {o.n_micro}, V {o.virtual}", f"{o.bubble:.2%}"])
        per_stage = plan.cfg.n_layers // o.pp
        v_best = max(d for d in _divisors(per_stage) if per_stage // d >= 2) if per_stage >= 2 else 1
        if o.virtual == 1 and v_best > 1:  # what interleaving would give, and what it costs in activations
            extra = (layers_in_flight(plan.cfg.n_layers, o.pp, 0, o.n_micro, v_best)
                     - layers_in_flight(plan.cfg.n_layers, o.pp, 0, o.n_micro))
            trows.append([f"  with --virtual-stages {v_best} (interleaved 1F1B)",
                          f"{bubble(o.pp, o.n_micro, v_best):.2%} (first stage: +{extra:.0f} layers' activations)"])
    if o is not None and o.dp > 1:
        grads = sum(stage_param_count(plan.cfg, o.tp, o.pp, 0, hd) for hd in _models(plan.stage)[0]) * 4
        trows.append([f"data-parallel bytes sent per rank and step ({'ZeRO-1 reduce-scatter + all-gather' if o.zero else 'all-reduce'})",
                      f"{2 * (o.dp - 1) / o.dp * grads / 1e9:,.2f} GB (2(dp-1)/dp x fp32 gradients; overlapped with backward)"])
    if plan.total_tokens:
        steps = plan.total_tokens / plan.tokens_per_step
        total = steps * plan.step_time
        trows += [["steps for --tokens", f"{steps:,.0f}"], ["training time", _dur(total)],
                  ["GPU hours", f"{total * plan.gpus / 3600:,.0f}"]]
    console.print(table("time", ["", "value"], trows))
    if plan.checks:
        crow = [[h, r, f"{p:,}", f"{m:,}", "ok" if p == m else "MISMATCH"] for h, r, p, m in plan.checks]
        console.print(table(f"meta-device check (tp {o.tp} x pp {o.pp})", ["head", "stage", "planned params / rank",
                                                                         "built on meta", ""], crow))
    prow = [[s, f"{h:,}", f"{f:.3e}", f"{u:.1%}"] for s, h, f, u in paper_mfu()]
    console.print(table("implied MFU of the paper's pretraining (Table 2: A100-80GB hours, 2.0T tokens, seq 4096, "
                        "312 TFLOP/s bf16)", ["size", "GPU hours", "model FLOPs", "MFU"], prow))
    if o is None:
        console.print(f"no layout fits {plan.size} {plan.stage} in {plan.gpus} GPUs of {plan.gpu_mem:g} GiB; "
                      f"add GPUs (--gpus) or use a smaller micro-batch / sequence")
    elif not o.fits:
        console.print(f"tp {o.tp} x pp {o.pp} x dp {o.dp} needs {_gib(o.memory.total)} GiB per GPU even with "
                      f"{o.setting}: more than {plan.gpu_mem:g} GiB")
    else:
        console.print(f"plan: tp {o.tp} x pp {o.pp} x dp {o.dp}{f' x V {o.virtual}' if o.virtual > 1 else ''}, "
                      f"{o.setting}; meta-device check {'passed' if plan.check_ok else 'FAILED'}")


def print_run_plan(size: str, cfg: ModelConfig, stage: str, *, tp: int, pp: int, gpus: int, seq_len: int,
                   micro_batch: int = 1, tokens: float | None = None, gpu_mem: float = 80.0,
                   rows: int | None = None, virtual_stages: int = 1) -> Plan:
    """What a stage's --dry-run shows: the plan of its own layout (tp x pp over max(gpus, tp*pp) GPUs, its
    --virtual-stages) and, given `rows`, its own global batch in sequences (not tokens)."""
    plan = make_plan(size, stage, gpus=max(gpus, tp * pp), gpu_mem=gpu_mem, seq_len=seq_len,
                     micro_batch=micro_batch, tokens=tokens, tp=tp, pp=pp, cfg=cfg, rows=rows,
                     virtual_stages=virtual_stages)
    print_plan(plan)
    return plan


def dry_run_plan(size: str, stage: str, *, tp: int, pp: int, gpus: int, seq_len: int | None = None,
                 micro_batch: int | None = None, tokens: float | None = None, zero: bool = False,
                 virtual_stages: int = 1) -> Plan:
    """--dry-run without data: the preset's resolved model and layout, then the plan of that layout."""
    from llamactl.config import ParallelConfig, dump_toml
    from llamactl.ui import console

    cfg = preset(size)
    err = layout_error(cfg, tp, pp)
    if err:
        raise LlamactlError(err)
    seq = seq_len if seq_len is not None else min(4096, cfg.max_seq_len)
    par = ParallelConfig(tp=tp, pp=pp, nproc=max(gpus, tp * pp), zero=zero, virtual_stages=virtual_stages)
    console.print(dump_toml({"model": cfg, "parallel": par}), markup=False)
    console.print(f"(no --data given: the {stage} settings that depend on the data and tokenizer resolve once it is)")
    return print_run_plan(size, cfg, stage, tp=tp, pp=pp, gpus=gpus, seq_len=seq, micro_batch=1 if micro_batch is None else micro_batch,
                          tokens=tokens, virtual_stages=virtual_stages)
