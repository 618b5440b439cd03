"""Batched KV-cache generation: the engine behind chat, rejection sampling and PPO rollouts.

Padding (model.py's one convention: a padded batch is described by its real-token mask, or by lengths
for right padding): callers pass unpadded token lists and get unpadded Samples back; `collate` turns
samples into right-padded training tensors (Rollout) that `scoring.token_logprobs` and
`scoring.sequence_scores` read. Inside, prompts of different lengths share one batch by left padding
(every row then decodes at the same cache position): its real-token mask gives each row RoPE positions
counted from its first real token and a key mask (`padding_layout`), so no pad is ever attended to and
a row decodes exactly as it would alone. Decoding writes into a cache preallocated once per batch;
only the last position's logits are computed; rows that emit EOS are dropped from the batch (their
cache rows go with them), so finished sequences cost nothing.

Any layout: under tensor parallelism every rank runs its weight slices; under pipeline parallelism
(PPO generates in its training layout, e.g. tp 8 x pp 8 for 70b) each stage runs its own layers with
its own KV cache and hands the activations to the next (llamactl/pipe.py); the last stage samples and
broadcasts the tokens (and their log-probs) over the pipeline group, so every rank returns the same
Samples. `autocast_dtype` runs the forwards in bf16 from fp32 master weights (rollouts on GPU).

Sampling is Meta's reference exactly: greedy at temperature 0, else softmax(logits / T) and top-p
(sort descending, cumulative sum, drop tokens whose preceding mass already exceeds p -- the token that
crosses p is kept --, renormalise, multinomial). With top_p >= 1 no token is ever dropped, so the sort
is skipped and the row samples straight from the softmax (same distribution, less work).

Reproducibility: every sequence has its own torch.Generator seeded from (seed, its index in the
caller's list) -- `sequence_seed` -- so a sequence samples the same tokens alone or in any batch.

`lm_logits` + `next_token` are the only code that knows the vocabulary may be sharded over tp ranks:
at tp > 1 it all-gathers the vocab shards of the last position only (B x V floats) and every rank
samples the same token from identical generators; at tp == 1 it communicates nothing.

Log-probs: `Sample.logprobs[i]` is log softmax(logits)[token] at temperature 1 (the policy's
log-prob, what PPO and KL penalties need), whatever temperature / top-p sampled the token;
`Sample.sample_logprobs[i]` is the log-prob under the distribution actually sampled from
(temperature + top-p renormalised; 0.0 for greedy).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from llamactl.errors import LlamactlError
from llamactl.model import decode_buffer, fuse_projections, inference_linear, padding_layout
from llamactl.parallel.context import ParallelContext
from llamactl.parallel.tensor import gather_from_tp
from llamactl.pipe import autocast, from_last_stage, stage_forward


@dataclass
class Sample:
    """One generated continuation. `tokens` includes the EOS token when finish_reason == "stop"."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)          # log p_{T=1}(token | prefix)
    sample_logprobs: list[float] = field(default_factory=list)   # log p under the sampling distribution
    finish_reason: str = "length"                                # "stop" (EOS) | "length" | "interrupted"


def sequence_seed(seed: int, index: int) -> int:
    """Seed of the generator of sequence `index` of a call seeded with `seed` (batch-independent)."""
    return int.from_bytes(hashlib.sha256(f"gen:{seed}:{index}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


# ---- the sampling step: the only place that knows about vocab sharding ------------------------------------
def full_logits(logits_local: torch.Tensor, ctx: ParallelContext | None) -> torch.Tensor:
    """(B, V/tp) last-position logits of this rank -> (B, V) on every rank (no comm at tp == 1)."""
    if ctx is None or ctx.tp == 1:
        return logits_local
    return gather_from_tp(logits_local.contiguous(), ctx)


def next_token(logits_local: torch.Tensor, ctx: ParallelContext | None, *, temperature: float, top_p: float,
               generators: Sequence[torch.Generator] | None = None):
    """Pick one token per row from last-position logits (B, V/tp) fp32.

    Returns (tokens (B,) long, logprobs (B,) at T=1, sample_logprobs (B,) under the sampling distribution).
    Greedy (argmax) when temperature <= 0. Row i samples with generators[i].
    """
    logits = full_logits(logits_local, ctx).float()
    logp = torch.log_softmax(logits, dim=-1)
    if temperature <= 0:
        tok = logits.argmax(dim=-1)
        return tok, logp.gather(-1, tok[:, None])[:, 0], torch.zeros_like(tok, dtype=logp.dtype)
    if generators is None or len(generators) != logits.shape[0]:
        raise ValueError("sampling needs one torch.Generator per row")
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1.0:
        tok = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])
        sprob = probs.gather(-1, tok[:, None])[:, 0]
    else:
        probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
        probs_sum = torch.cumsum(probs_sort, dim=-1)
        probs_sort[probs_sum - probs_sort > top_p] = 0.0
        probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
        j = torch.cat([torch.multinomial(probs_sort[i], 1, generator=g) for i, g in enumerate(generators)])
        tok = probs_idx.gather(-1, j[:, None])[:, 0]
        sprob = probs_sort.gather(-1, j[:, None])[:, 0]
    return tok, logp.gather(-1, tok[:, None])[:, 0], sprob.log()


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """(B, 1, dim) final-normed hidden states of the last position -> this rank's logits (B, V/tp) fp32.

    The same product as the model's column-parallel head (whose forward needs no communication), through
    `model.inference_linear`: on CPU in fp32 the decode GEMV kernel for up to 8 rows. After
    `decode_layout(model, pack_head=True)`, larger CPU batches use a oneDNN-packed copy of the head weight:
    MKL's fp32 GEMM is 3-5x slower than oneDNN's for a handful of rows against the (vocab x dim) head. The
    copy is re-packed whenever the weight changes.
    """
    h = hidden[:, -1]
    w = model.output.weight
    if getattr(model, "_llamactl_pack_head", False):
        model.output.__dict__["_llamactl_pack"] = True
    return inference_linear(model.output, "weight", h, w).float()


# ---- the decode loop --------------------------------------------------------------------------------------
OnStep = Callable[[list[int], list[int]], bool | None]


def generate(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, eos_id: int | None = None, ctx: ParallelContext | None = None,
             batch_size: int | None = None, seeds: list[int] | None = None,
             on_step: OnStep | None = None, progress: Callable[[int], None] | None = None,
             autocast_dtype: torch.dtype | None = None) -> list[Sample]:
    """Continue every prompt (token id lists) by up to max_new_tokens tokens; one Sample per prompt, in order.

    batch_size: rows decoded together (default: all); prompts are grouped by length to limit padding,
    which changes no result. seeds: per-prompt generator seeds (default sequence_seed(seed, i)).
    on_step(rows, tokens): called after each decode step with the prompt indices still running and
    their new tokens; returning True stops everything ("interrupted"); under tp / pp it runs on every
    rank and must answer the same on all of them. progress(n): n prompts finished.
    autocast_dtype: run the forwards under torch.autocast to this dtype (e.g. torch.bfloat16 rollouts from
    fp32 master weights on GPU; the KV cache is kept in it too); sampling and log-probs stay fp32.
    """
    ctx = ctx or getattr(model, "ctx", None) or ParallelContext.single()
    built = getattr(model, "ctx", None)
    if built is not None and (built.tp, built.pp) != (ctx.tp, ctx.pp):
        raise ValueError(f"ctx (tp {ctx.tp}, pp {ctx.pp}) does not match the layout the model was built for "
                         f"(tp {built.tp}, pp {built.pp})")
    if getattr(model, "head", "lm") != "lm":
        raise LlamactlError(f"generation needs a language-model checkpoint, not a {model.head} head (--model)")
    if max_new_tokens < 1:
        raise LlamactlError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not 0.0 < top_p <= 1.0:
        raise LlamactlError(f"--top-p must be in (0, 1], got {top_p}")
    if any(len(p) == 0 for p in prompts):
        raise LlamactlError("empty prompt (every prompt needs at least one token, e.g. BOS)")
    if seeds is None:
        seeds = [sequence_seed(seed, i) for i in range(len(prompts))]
    elif len(seeds) != len(prompts):
        raise ValueError("one seed per prompt")
    out = [Sample(prompt=list(p)) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    bs = batch_size or max(1, len(prompts))
    stopped = False
    for s in range(0, len(order), bs):
        rows = order[s:s + bs]
        if stopped:
            for r in rows:
                out[r].finish_reason = "interrupted"
        else:
            stopped = _generate_batch(model, ctx, [prompts[r] for r in rows], rows, [seeds[r] for r in rows], out,
                                      max_new_tokens, temperature, top_p, eos_id, on_step, autocast_dtype)
        if progress is not None:
            progress(len(rows))
    return out


@torch.inference_mode()
def _generate_batch(model, ctx, prompts, rows, seeds, out, max_new, temperature, top_p, eos_id, on_step,
                    autocast_dtype) -> bool:
    """Decode one batch in place into out[rows[i]]; True when on_step asked to stop."""
    device = next(model.parameters()).device
    b = len(prompts)
    lens = [len(p) for p in prompts]
    plen = max(lens)
    limit = model.cfg.max_seq_len
    if plen + max_new > limit:
        raise LlamactlError(f"prompt of {plen} tokens + {max_new} new tokens exceeds the model context of "
                            f"{limit} (--max-new-tokens or a shorter prompt)")
    total = plen + max_new
    cache = model.new_cache(b, total, dtype=autocast_dtype)
    tokens = torch.zeros(b, plen, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, plen - len(p):] = torch.tensor(p, dtype=torch.long)
    tokens = tokens.to(device)
    padded = min(lens) != plen
    positions = key_mask = next_pos = None
    if padded:  # left padding, described by its real-token mask (model.padding_layout)
        real = torch.arange(plen)[None] >= torch.tensor([plen - n for n in lens])[:, None]
        positions, _ = padding_layout(real.to(device))
        key_mask = torch.ones(b, total, dtype=torch.bool, device=device)
        key_mask[:, :plen] = real.to(device)
        next_pos = torch.tensor(lens, device=device)[:, None]  # (B, 1) RoPE position of the next token
    gens = [torch.Generator(device=device).manual_seed(sd) for sd in seeds] if temperature > 0 else None
    amp = autocast(autocast_dtype, device)
    pp = ctx.pp > 1

    def pick(x, **kw):
        """One forward over this rank's stage, then the next token of every row (on every rank)."""
        with amp:
            hidden = stage_forward(model, x, ctx, cache=cache, last_only=True, return_hidden=True, **kw)
        if hidden is None:  # an earlier pipeline stage: the last one samples and broadcasts
            res = None
        else:
            res = next_token(lm_logits(model, hidden), ctx, temperature=temperature, top_p=top_p, generators=gens)
        if not pp:
            return res
        packed = None if res is None else torch.stack([r.double() for r in res], 1)
        packed = from_last_stage(packed, (x.shape[0], 3), torch.float64, device, ctx)
        return packed[:, 0].long(), packed[:, 1].float(), packed[:, 2].float()

    nxt = pick(tokens, start_pos=0, positions=positions, key_mask=key_mask[:, :plen] if padded else None)
    alive = list(range(b))  # batch row -> index into prompts/rows
    toks_hist, lp_hist, slp_hist, alive_hist = [], [], [], []
    finished = {}
    interrupted = False
    for step in range(max_new):
        tok, lp, slp = nxt
        toks_hist.append(tok)
        lp_hist.append(lp)
        slp_hist.append(slp)
        alive_hist.append(alive)
        if on_step is not None and on_step([rows[a] for a in alive], tok.tolist()):
            interrupted = True
            break
        if step == max_new - 1:
            break
        if eos_id is not None:
            done = tok == eos_id
            if bool(done.any()):
                keep = (~done).nonzero()[:, 0]
                for a, d in zip(alive, done.tolist()):
                    if d:
                        finished[a] = "stop"
                if keep.numel() == 0:
                    break
                alive = [alive[i] for i in keep.tolist()]
                cache.reorder(keep)
                tok = tok.index_select(0, keep)
                if gens is not None:
                    gens = [gens[i] for i in keep.tolist()]
                if padded:
                    key_mask = key_mask.index_select(0, keep)
                    next_pos = next_pos.index_select(0, keep)
        pos = plen + step
        if padded:
            nxt = pick(tok[:, None], start_pos=pos, positions=next_pos + step, key_mask=key_mask[:, :pos + 1])
        else:
            nxt = pick(tok[:, None], start_pos=pos)
    _collect(out, rows, alive_hist, toks_hist, lp_hist, slp_hist, finished, eos_id, interrupted)
    return interrupted


def _collect(out, rows, alive_hist, toks_hist, lp_hist, slp_hist, finished, eos_id, interrupted):
    """Move the per-step histories (one sync at the end) into the Samples."""
    toks = [t.tolist() for t in toks_hist]
    lps = [t.tolist() for t in lp_hist]
    slps = [t.tolist() for t in slp_hist]
    for alive, tk, lp, slp in zip(alive_hist, toks, lps, slps):
        for j, a in enumerate(alive):
            s = out[rows[a]]
            s.tokens.append(tk[j])
            s.logprobs.append(lp[j])
            s.sample_logprobs.append(slp[j])
    for a in range(len(rows)):
        s = out[rows[a]]
        if finished.get(a) == "stop" or (eos_id is not None and s.tokens and s.tokens[-1] == eos_id):
            s.finish_reason = "stop"
        elif interrupted:
            s.finish_reason = "interrupted"
        else:
            s.finish_reason = "length"


# ---- samples back into training tensors ---------------------------------------------------------------------
@dataclass
class Rollout:
    """Samples as right-padded training tensors (model.py's padding convention: lengths, pad after).

    tokens (B, T) long: prompt + generated tokens (EOS included when the sample stopped), pad_id after.
    mask (B, T) bool: True at generated tokens, the only ones that carry loss (PPO, rejection-sampling
    SFT); prompt and padding are False. lengths (B,) long: prompt + generated tokens.
    logprobs (B, T) fp32: the sampling policy's log p_{T=1} of each generated token, 0 elsewhere.
    The model's prediction for tokens[:, t] is made at t - 1, so against `token_logprobs(...)` (B, T-1)
    use mask[:, 1:] and logprobs[:, 1:].
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor
    logprobs: torch.Tensor


def collate(samples: Sequence[Sample], pad_id: int = 0, *, device=None) -> Rollout:
    """Right-padded tensors of prompt + response for a batch of Samples (see Rollout)."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    lengths = [len(s.prompt) + len(s.tokens) for s in samples]
    t = max(lengths)
    tokens = torch.full((len(samples), t), pad_id, dtype=torch.long)
    mask = torch.zeros(len(samples), t, dtype=torch.bool)
    logprobs = torch.zeros(len(samples), t, dtype=torch.float32)
    for i, s in enumerate(samples):
        n, m = len(s.prompt), len(s.tokens)
        tokens[i, :n + m] = torch.tensor(s.prompt + s.tokens, dtype=torch.long)
        mask[i, n:n + m] = True
        logprobs[i, n:n + m] = torch.tensor(s.logprobs, dtype=torch.float32)
    return Rollout(tokens.to(device), mask.to(device), torch.tensor(lengths, device=device), logprobs.to(device))


# ---- CPU decode layout ------------------------------------------------------------------------------------------
@torch.no_grad()
def decode_layout(model, *, pack_head: bool = True, pack: bool = True) -> int:
    """Store every weight matrix but the embedding column-major on CPU (same shape, same values).

    A decode step is a matrix-vector product per weight (the GEMV kernel for up to 8 rows,
    `model.inference_linear`); column-major, each input's weights are one contiguous run of outputs, what
    the hardware prefetchers stream best when W has at least as many outputs as inputs; with fewer (w2: 1536
    -> 512 in `small`) the row-major one is streamed as a few long dot products, so those stay as they
    are. Every matrix moved (and w2) lands on huge pages (`model.decode_buffer`: 15-25 % faster streams).
    One matrix at a time is copied, so peak memory grows by the largest matrix only. Meant for inference-only models (generate, chat): tensors are no longer contiguous,
    so re-save through checkpoint code that calls .contiguous(). pack_head: also let `lm_logits` keep a
    oneDNN-packed copy of the head (one extra head-sized tensor) for batches of more than 8 rows. Then
    `model.fuse_projections` makes wq|wk|wv and w1|w3 one column-major matrix each (4 GEMMs per layer
    instead of 7, no extra memory); pack: batches of more than 8 rows use oneDNN-packed copies of the layer
    matrices too (one extra copy of them; up to 8 rows the GEMV kernel is faster than oneDNN).
    Returns the number of matrices moved.
    """
    model._llamactl_pack_head = pack_head and next(model.parameters()).device.type == "cpu"
    moved = 0
    for name, p in model.named_parameters():
        if p.device.type != "cpu" or p.dim() != 2 or name.endswith("tok_embeddings.weight") or min(p.shape) == 1:
            continue
        if p.shape[1] > p.shape[0]:  # fewer outputs than inputs (w2): streamed row-major, on huge pages
            if p.is_contiguous() and not getattr(p, "_llamactl_decode_buffer", False):
                p.data = decode_buffer(p.shape, p.dtype, p.device).copy_(p.data)
                p._llamactl_decode_buffer = True
            continue
        if p.stride(0) == 1 and p.stride(1) >= p.shape[0]:  # column-major already (or a slice of a fused one)
            continue
        p.data = decode_buffer(p.shape[::-1], p.dtype, p.device).copy_(p.data.t()).t()
        moved += 1
    fuse_projections(model, pack=pack)
    return moved


# ---- the `llamactl generate` driver -------------------------------------------------------------------------
def load_for_generation(model_dir, device: str = "auto", ctx: ParallelContext | None = None):
    """(model in eval mode, Tokenizer) from a checkpoint directory; bf16 on CUDA, fp32 on CPU.

    With a tp / pp ctx every rank loads only its own slices and layers (no consolidation)."""
    from pathlib import Path

    from llamactl import checkpoint
    from llamactl.tokenizer import Tokenizer

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise LlamactlError(f"checkpoint directory not found: {model_dir} (--model)")
    model_dir = checkpoint.resolve(model_dir)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model, _ = checkpoint.load_model(model_dir, ctx, device=device, dtype=dtype, flag="--model")
    decode_layout(model)
    tok = Tokenizer.load(checkpoint.tokenizer_path(model_dir))
    if tok.vocab_size > model.cfg.vocab_size:
        raise LlamactlError(f"tokenizer of {tok.vocab_size} pieces does not fit the model vocabulary of "
                            f"{model.cfg.vocab_size} ({model_dir})")
    return model.eval(), tok


def read_prompts(path=None, prompt: str | None = None) -> list[dict]:
    """Prompt records from --prompt or a JSONL file of {"prompt": str} / {"dialog": [...]} lines."""
    import json
    from pathlib import Path

    if (path is None) == (prompt is None):
        raise LlamactlError("give exactly one of --prompt TEXT or --prompts FILE.jsonl")
    if prompt is not None:
        return [{"prompt": prompt}]
    path = Path(path)
    if not path.is_file():
        raise LlamactlError(f"prompts file not found: {path} (--prompts)")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise LlamactlError(f"bad JSON at {path}:{n}: {e.msg} (--prompts)") from None
        if not isinstance(rec, dict) or not (isinstance(rec.get("prompt"), str) or isinstance(rec.get("dialog"), list)):
            raise LlamactlError(f'{path}:{n}: each line needs "prompt" (a string) or "dialog" (a list of messages)')
        out.append(rec)
    if not out:
        raise LlamactlError(f"no prompts in {path} (--prompts)")
    return out


def encode_prompt(tok, rec: dict, *, raw: bool, system: str | None, where: str = "") -> list[int]:
    """Token ids of one prompt record: chat-formatted (Meta's template) unless raw."""
    from llamactl.tokenizer import encode_dialog

    if raw:
        if "prompt" not in rec:
            raise LlamactlError(f"--raw takes plain prompts, not dialogs{where}")
        return tok.encode(rec["prompt"], bos=True)
    dialog = list(rec["dialog"]) if "dialog" in rec else [{"role": "user", "content": rec["prompt"]}]
    if system and not (dialog and isinstance(dialog[0], dict) and dialog[0].get("role") == "system"):
        dialog = [{"role": "system", "content": system}] + dialog
    try:
        return encode_dialog(tok, dialog)
    except LlamactlError as e:
        raise LlamactlError(f"{e}{where}") from None


def run_generate(model_dir, *, prompt: str | None, prompts_file, raw: bool, system: str | None, num_samples: int,
                 temperature: float, top_p: float, max_new_tokens: int, seed: int, out, batch_size: int,
                 device: str = "auto", ctx: ParallelContext | None = None) -> list[dict]:
    """`llamactl generate`: K samples per prompt as JSONL records (to `out`, or stdout).

    Under tp / pp every rank ends with the same tokens (each decodes with its weight slices and layers,
    the last stage samples and broadcasts); rank 0 writes."""
    import json
    import sys
    import time
    from pathlib import Path

    from llamactl.ui import err_console, progress as progress_bar

    if num_samples < 1 or batch_size < 1:
        raise LlamactlError("--num-samples and --batch-size must be at least 1")
    if temperature < 0:
        raise LlamactlError(f"--temperature must be >= 0, got {temperature}")
    recs = read_prompts(prompts_file, prompt)
    model, tok = load_for_generation(model_dir, device, ctx)
    main_rank = ctx is None or ctx.rank == 0
    where = lambda i: f" (prompt {i + 1} of {prompts_file})" if prompts_file else " (--prompt)"  # noqa: E731
    ids = [encode_prompt(tok, r, raw=raw, system=system, where=where(i)) for i, r in enumerate(recs)]
    flat = [p for p in ids for _ in range(num_samples)]
    t0 = time.perf_counter()
    with progress_bar(disable=not main_rank) as bar:
        task = bar.add_task("generate", total=len(flat))
        samples = generate(model, flat, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           seed=seed, eos_id=tok.eos_id, batch_size=batch_size,
                           progress=lambda n: bar.advance(task, n))
    dt = time.perf_counter() - t0
    rows = []
    for j, s in enumerate(samples):
        i, k = divmod(j, num_samples)
        answer = s.tokens[:-1] if s.finish_reason == "stop" else s.tokens
        rec = {"index": i, "sample": k, "prompt": recs[i].get("prompt", recs[i].get("dialog")),
               "text": tok.decode(answer), "prompt_tokens": s.prompt, "tokens": s.tokens,
               "logprobs": s.logprobs, "sample_logprobs": s.sample_logprobs, "finish_reason": s.finish_reason}
        if "id" in recs[i]:
            rec["id"] = recs[i]["id"]
        rows.append(rec)
    if not main_rank:
        return rows
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if out is None:
        sys.stdout.write(lines)
    else:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(lines, encoding="utf-8")
    n_tok = sum(len(s.tokens) for s in samples)
    err_console.print(f"{len(samples)} samples, {n_tok} tokens in {dt:.1f} s ({n_tok / max(dt, 1e-9):.1f} tokens/s)"
                      + (f" -> {out}" if out else ""))
    return rows
