"""Batched KV-cache generation: the engine behind chat, rejection sampling and PPO rollouts.

Prompts of different lengths share one batch by left padding: each row gets explicit RoPE positions
(0.. for its real tokens) and a key mask, so no pad token is ever attended to. Decoding writes into a
cache preallocated once per batch; only the last position's logits are computed; rows that emit EOS
are dropped from the batch (their cache rows go with them), so finished sequences cost nothing.

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
from llamactl.parallel.context import ParallelContext
from llamactl.parallel.tensor import gather_from_tp


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

    The same product as the model's column-parallel head (whose forward needs no communication). On
    CPU, after `decode_layout(model, pack_head=True)`, batches of two or more rows use a oneDNN-packed
    copy of the head weight: MKL's fp32 GEMM is 3-5x slower than oneDNN's for a handful of rows
    against the (vocab x dim) head. The copy is re-packed whenever the weight changes (its version
    counter moves, e.g. after an optimizer step), so it is never stale.
    """
    h = hidden[:, -1]
    w = model.output.weight
    if h.shape[0] >= 2 and getattr(model, "_llamactl_pack_head", False):
        packed = _packed_head(model, w, h.shape[0])
        if packed is not None:
            return torch.ops.mkldnn._linear_pointwise(h.contiguous(), packed, None, "none", [], "")
    return F.linear(h, w).float()


def _packed_head(model, w: torch.Tensor, batch: int):
    if w.device.type != "cpu" or w.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    try:
        key = (w.data_ptr(), w._version)
    except RuntimeError:  # an inference tensor has no version counter: never re-packed
        key = (w.data_ptr(), -1)
    cached = getattr(model, "_llamactl_packed", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), batch)
    except (RuntimeError, AttributeError):  # a torch build without these oneDNN ops: plain path
        model._llamactl_pack_head = False
        return None
    model._llamactl_packed = (key, packed)
    return packed


# ---- the decode loop --------------------------------------------------------------------------------------
OnStep = Callable[[list[int], list[int]], bool | None]


def generate(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, eos_id: int | None = None, ctx: ParallelContext | None = None,
             batch_size: int | None = None, seeds: list[int] | None = None,
             on_step: OnStep | None = None, progress: Callable[[int], None] | None = None) -> list[Sample]:
    """Continue every prompt (token id lists) by up to max_new_tokens tokens; one Sample per prompt, in order.

    batch_size: rows decoded together (default: all); prompts are grouped by length to limit padding,
    which changes no result. seeds: per-prompt generator seeds (default sequence_seed(seed, i)).
    on_step(rows, tokens): called after each decode step with the prompt indices still running and
    their new tokens; returning True stops everything ("interrupted"). progress(n): n prompts finished.
    """
    ctx = ctx or getattr(model, "ctx", None) or ParallelContext.single()
    if ctx.pp > 1:
        raise LlamactlError("pipeline-parallel generation is not supported; generate with --pp 1 (tensor parallel is fine)")
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
                                      max_new_tokens, temperature, top_p, eos_id, on_step)
        if progress is not None:
            progress(len(rows))
    return out


@torch.inference_mode()
def _generate_batch(model, ctx, prompts, rows, seeds, out, max_new, temperature, top_p, eos_id, on_step) -> bool:
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
    cache = model.new_cache(b, total)
    tokens = torch.zeros(b, plen, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, plen - len(p):] = torch.tensor(p, dtype=torch.long)
    tokens = tokens.to(device)
    padded = min(lens) != plen
    positions = key_mask = next_pos = None
    if padded:
        pad = torch.tensor([plen - n for n in lens], device=device)
        ar = torch.arange(plen, device=device)
        positions = (ar[None] - pad[:, None]).clamp(min=0)
        key_mask = torch.ones(b, total, dtype=torch.bool, device=device)
        key_mask[:, :plen] = ar[None] >= pad[:, None]
        next_pos = torch.tensor(lens, device=device)[:, None]  # (B, 1) RoPE position of the next token
    gens = [torch.Generator(device=device).manual_seed(sd) for sd in seeds] if temperature > 0 else None

    logits = lm_logits(model, model(tokens, start_pos=0, cache=cache, positions=positions,
                                     key_mask=key_mask[:, :plen] if padded else None, last_only=True,
                                     return_hidden=True))
    alive = list(range(b))  # batch row -> index into prompts/rows
    toks_hist, lp_hist, slp_hist, alive_hist = [], [], [], []
    finished = {}
    interrupted = False
    for step in range(max_new):
        tok, lp, slp = next_token(logits, ctx, temperature=temperature, top_p=top_p, generators=gens)
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
            hidden = model(tok[:, None], start_pos=pos, cache=cache, positions=next_pos + step,
                           key_mask=key_mask[:, :pos + 1], last_only=True, return_hidden=True)
        else:
            hidden = model(tok[:, None], start_pos=pos, cache=cache, last_only=True, return_hidden=True)
        logits = lm_logits(model, hidden)
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


# ---- CPU decode layout ------------------------------------------------------------------------------------------
@torch.no_grad()
def decode_layout(model, *, pack_head: bool = True) -> int:
    """Store every weight matrix but the embedding column-major on CPU (same shape, same values).

    A decode step is a matrix-vector product per weight; MKL's kernel for x @ W^T streams a
    column-major W about twice as fast as a row-major one on the CPUs measured here (the lm head of
    `small`: 2.8 vs 5.2 ms). One matrix at a time is copied, so peak memory grows by the largest
    matrix only. Meant for inference-only models (generate, chat): tensors are no longer contiguous,
    so re-save through checkpoint code that calls .contiguous(). pack_head: also let `lm_logits` keep a
    oneDNN-packed copy of the head (one extra head-sized tensor) for batches of 2+ rows.
    Returns the number of matrices moved.
    """
    model._llamactl_pack_head = pack_head and next(model.parameters()).device.type == "cpu"
    moved = 0
    for name, p in model.named_parameters():
        if p.device.type != "cpu" or p.dim() != 2 or name.endswith("tok_embeddings.weight") or min(p.shape) == 1:
            continue
        if p.stride() == (1, p.shape[0]):
            continue
        p.data = p.data.t().contiguous().t()
        moved += 1
    return moved


# ---- the `llamactl generate` driver -------------------------------------------------------------------------
def load_for_generation(model_dir, device: str = "auto", ctx: ParallelContext | None = None):
    """(model in eval mode, Tokenizer) from a checkpoint directory; bf16 on CUDA, fp32 on CPU.

    With a tensor-parallel ctx every rank loads only its own slices (no consolidation)."""
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
    if ctx is not None and ctx.pp > 1:
        raise LlamactlError("generation runs with tensor parallelism only; use --pp 1 (--tp N)")
    model, _ = checkpoint.load_model(model_dir, ctx, device=device, dtype=dtype)
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

    Under tensor parallelism every rank decodes the same tokens from its weight slices; rank 0 writes."""
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
