"""Generation: equality with transformers and with no-cache recomputation, batching invariance, EOS,
Meta's top-p rule, seeds, log-probs."""
import math

import pytest
import torch

from llamactl.config import ModelConfig
from llamactl.errors import LlamactlError
from llamactl.generation import Sample, generate, next_token, sequence_seed
from llamactl.model import build_model
from llamactl.parallel.context import ParallelContext
from dist_utils import spawn


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs on one thread (see conftest.one_thread)."""


def odd_config(**kw):
    # odd sizes: 3 layers, 6 heads sharing 3 kv heads (GQA), vocab 97
    base = dict(dim=48, n_layers=3, n_heads=6, n_kv_heads=3, vocab_size=97, multiple_of=8, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def model():
    return build_model(odd_config(), seed=7).eval()


PROMPTS = [[1, 5, 9], [1, 40, 41, 42, 43, 44, 45], [1], [1, 3, 3, 3, 80, 81, 82, 83, 84, 85, 86, 2]]


def full_logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids]))[0]


# ---- against transformers ------------------------------------------------------------------------------
def test_greedy_equals_transformers_greedy(tiny_tokenizer, tmp_path):
    """A random GQA LlamaForCausalLM, saved by transformers, converted by `convert_hf`, loaded by checkpoint."""
    transformers = pytest.importorskip("transformers")
    from llamactl.checkpoint import load_model
    from llamactl.convert import convert_hf

    cfg = odd_config(vocab_size=2048)  # the tiny tokenizer's vocabulary
    hc = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                                  num_key_value_heads=cfg.kv_heads, rms_norm_eps=cfg.norm_eps,
                                  rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
                                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(11)
    hf = transformers.LlamaForCausalLM(hc).eval()
    with torch.no_grad():  # random norms so their weights matter
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.2)
    hf.save_pretrained(tmp_path / "hf")
    ckpt = convert_hf(tmp_path / "hf", tmp_path / "ckpt", tokenizer=tiny_tokenizer, show_progress=False)
    ours, _ = load_model(ckpt)
    assert ours.cfg.kv_heads < ours.cfg.n_heads
    prompts = [[1, 17, 33, 4, 90], [1, 7], [1, 60, 61, 62, 63, 64, 65, 66, 67]]
    got = generate(ours.eval(), prompts, max_new_tokens=20, temperature=0.0)  # one batch, left padded
    for p, s in zip(prompts, got):
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
        assert s.tokens == ref[0, len(p):].tolist()
        assert len(s.tokens) == 20 and s.finish_reason == "length"


# ---- cache, batching, EOS ------------------------------------------------------------------------------
def test_cached_generation_equals_recomputation(model):
    got = generate(model, PROMPTS, max_new_tokens=12)
    for p, s in zip(PROMPTS, got):
        seq = list(p)
        for _ in range(12):  # no cache: a full forward over the whole sequence per token
            seq.append(int(full_logits(model, seq)[-1].argmax()))
        assert s.tokens == seq[len(p):]


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0), (0.8, 0.9)])
def test_batching_invariance(model, temperature, top_p):
    kw = dict(max_new_tokens=10, temperature=temperature, top_p=top_p, seed=3)
    batched = generate(model, PROMPTS, **kw)
    pairs = generate(model, PROMPTS, batch_size=2, **kw)
    alone = [generate(model, [p], seeds=[sequence_seed(3, i)], **kw)[0] for i, p in enumerate(PROMPTS)]
    for a, b, c in zip(batched, pairs, alone):
        assert a.tokens == b.tokens == c.tokens
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(c.logprobs), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(a.sample_logprobs), torch.tensor(c.sample_logprobs),
                                   atol=1e-5, rtol=0)


def test_eos_stops_each_sequence_alone(model):
    free = generate(model, PROMPTS, max_new_tokens=12)
    eos = free[1].tokens[3]  # a token sequence 1 emits at step 3
    got = generate(model, PROMPTS, max_new_tokens=12, eos_id=eos)
    for f, g in zip(free, got):
        if eos in f.tokens:
            k = f.tokens.index(eos)
            assert g.tokens == f.tokens[:k + 1] and g.finish_reason == "stop"
        else:
            assert g.tokens == f.tokens and g.finish_reason == "length"
    assert got[1].finish_reason == "stop" and len(got[1].tokens) <= 4
    assert any(g.finish_reason == "length" for g in got)  # the others ran on after rows were dropped


def test_logprobs_equal_full_forward(model):
    got = generate(model, PROMPTS, max_new_tokens=9, temperature=0.7, top_p=0.8, seed=5)
    for s in got:
        seq = s.prompt + s.tokens
        logp = torch.log_softmax(full_logits(model, seq[:-1]), -1)
        ref = logp[len(s.prompt) - 1:].gather(-1, torch.tensor(s.tokens)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(s.logprobs), ref, atol=1e-5, rtol=0)
        # sampling-distribution log-probs: T=0.7 softmax, nucleus renormalised -> never below the T=1 value
        # for the kept tokens' total mass < 1, and they are finite
        assert all(math.isfinite(x) and x <= 0 for x in s.sample_logprobs)


def test_seeds_reproducible(model):
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.95)
    a = generate(model, PROMPTS, seed=1, **kw)
    b = generate(model, PROMPTS, seed=1, **kw)
    c = generate(model, PROMPTS, seed=2, **kw)
    assert [s.tokens for s in a] == [s.tokens for s in b]
    assert [s.tokens for s in a] != [s.tokens for s in c]
    # repeated prompts get different samples (num-samples K)
    d = generate(model, [PROMPTS[0]] * 4, seed=1, **kw)
    assert len({tuple(s.tokens) for s in d}) > 1


def test_greedy_is_argmax_and_logprobs_of_argmax():
    logits = torch.randn(5, 97, generator=torch.Generator().manual_seed(0))
    tok, lp, slp = next_token(logits, None, temperature=0.0, top_p=0.5)
    assert torch.equal(tok, logits.argmax(-1))
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1).max(-1).values)
    assert torch.equal(slp, torch.zeros(5))


# ---- Meta's top-p ----------------------------------------------------------------------------------------
def meta_sample_top_p(probs, p, generator):
    """Meta's llama/generation.py sample_top_p, with a generator."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


def test_top_p_equals_meta_reference():
    logits = torch.randn(1, 97, generator=torch.Generator().manual_seed(1)) * 2
    for seed in range(40):
        for p, t in [(0.9, 1.0), (0.5, 0.7), (0.99, 1.3)]:
            tok, _, _ = next_token(logits, None, temperature=t, top_p=p,
                                   generators=[torch.Generator().manual_seed(seed)])
            ref = meta_sample_top_p(torch.softmax(logits / t, -1), p, torch.Generator().manual_seed(seed))
            assert tok.tolist() == ref[:, 0].tolist()


def test_top_p_one_is_plain_softmax_sampling():
    logits = torch.randn(3, 97, generator=torch.Generator().manual_seed(2))
    for seed in range(30):
        gens = [torch.Generator().manual_seed(seed * 3 + i) for i in range(3)]
        tok, _, slp = next_token(logits, None, temperature=0.9, top_p=1.0, generators=gens)
        probs = torch.softmax(logits / 0.9, -1)
        ref = [int(torch.multinomial(probs[i], 1, generator=torch.Generator().manual_seed(seed * 3 + i)))
               for i in range(3)]
        assert tok.tolist() == ref
        torch.testing.assert_close(slp, probs.log().gather(-1, tok[:, None])[:, 0])


def test_tiny_top_p_is_greedy():
    logits = torch.randn(4, 97, generator=torch.Generator().manual_seed(3))
    for seed in range(20):
        gens = [torch.Generator().manual_seed(seed + 100 * i) for i in range(4)]
        tok, _, slp = next_token(logits, None, temperature=1.5, top_p=1e-6, generators=gens)
        assert torch.equal(tok, logits.argmax(-1))
        torch.testing.assert_close(slp, torch.zeros(4))  # the only token kept has probability 1


def test_top_p_keeps_the_token_that_crosses_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    g = torch.Generator().manual_seed(0)

    def kept(p):
        seen = {int(next_token(logits, None, temperature=1.0, top_p=p, generators=[g])[0]) for _ in range(300)}
        return seen

    assert kept(0.45) == {0}
    assert kept(0.5) == {0, 1}      # 0.5 of mass before token 1 is not > 0.5: token 1 stays (Meta's strict >)
    assert kept(0.7) == {0, 1}      # token 1 crosses 0.7 and is kept
    assert kept(0.85) == {0, 1, 2}
    tok, _, slp = next_token(logits, None, temperature=1.0, top_p=0.7, generators=[g])
    torch.testing.assert_close(slp.exp(), probs[0, tok] / 0.8)


# ---- errors and interruption -----------------------------------------------------------------------------
def test_context_overflow_and_layout_mismatch_are_clear_errors(model):
    with pytest.raises(LlamactlError, match="max-new-tokens"):
        generate(model, [[1] * 60], max_new_tokens=10)
    with pytest.raises(ValueError, match="layout"):
        generate(model, [[1]], max_new_tokens=2, ctx=ParallelContext(pp=2))
    with pytest.raises(LlamactlError, match="top-p"):
        generate(model, [[1]], max_new_tokens=2, top_p=0.0)


def test_on_step_streams_and_can_interrupt(model):
    seen = []

    def on_step(rows, toks):
        seen.append((rows, toks))
        return len(seen) == 3

    got = generate(model, PROMPTS[:2], max_new_tokens=10, on_step=on_step)
    assert [len(s.tokens) for s in got] == [3, 3]
    assert all(s.finish_reason == "interrupted" for s in got)
    assert [t for _, t in seen] == [[got[r].tokens[i] for r in rows] for i, (rows, _) in enumerate(seen)]
    assert isinstance(got[0], Sample)


# ---- the CPU decode layout (column-major weights, oneDNN-packed head) ------------------------------------
def _packed(model) -> int:
    """How many oneDNN-packed weight copies the model's modules hold."""
    return sum(len(m.__dict__.get("_llamactl_packed", {})) for m in model.modules())


@pytest.mark.parametrize("pack_min", [None, 0])
def test_decode_layout_changes_no_result(pack_min, monkeypatch):
    """Same tokens and log-probs after decode_layout; weights this small get no packed copy unless the size
    floor is lowered (0: every matrix packed, so the packed path and its re-packing are checked too)."""
    from llamactl import model as model_mod

    if pack_min is not None:
        monkeypatch.setattr(model_mod, "PACK_MIN_ELEMENTS", pack_min)
    cfg = odd_config()
    plain = build_model(cfg, seed=9).eval()
    fast = build_model(cfg, seed=9).eval()
    from llamactl.generation import decode_layout

    # every matrix but the embedding and those with fewer outputs than inputs (w2; GQA's wk, wv here)
    assert decode_layout(fast) == 3 * 4 + 1
    assert fast.layers["0"].feed_forward.w2.weight.is_contiguous()
    assert fast.layers["0"].attention.wq.weight.stride(0) == 1  # q|k|v: one column-major matrix
    assert fast.output.weight.stride() == (1, cfg.vocab_size)
    kw = dict(max_new_tokens=8, temperature=0.9, top_p=0.9, seed=4)
    for prompts in (PROMPTS, PROMPTS[:1]):  # packed head (batch >= 2) and column-major GEMV (batch 1)
        a, b = generate(plain, prompts, **kw), generate(fast, prompts, **kw)
        for x, y in zip(a, b):
            assert x.tokens == y.tokens
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)
    assert _packed(fast) == (3 * 4 if pack_min == 0 else 0)  # q|k|v, wo, w1|w3, w2 (prefill); 4 rows: GEMV head
    # the packed copy follows in-place weight updates (optimizer steps between rollouts)
    with torch.no_grad():
        for m in (plain, fast):
            m.output.weight.mul_(-1.5)
    a, b = generate(plain, PROMPTS, **kw), generate(fast, PROMPTS, **kw)
    assert [x.tokens for x in a] == [y.tokens for y in b]
    torch.testing.assert_close(torch.tensor(a[0].logprobs), torch.tensor(b[0].logprobs), atol=1e-5, rtol=0)


# ---- any layout: pp 2 and tp 2 x pp 2 against one process --------------------------------------------------
def _layout_config():
    # tp 2 needs an even vocab and kv heads: 6 heads sharing 2 kv heads, vocab 98; 3 layers split unevenly
    return odd_config(n_kv_heads=2, vocab_size=98)


def _same_samples(got, want, tag):
    for g, w in zip(got, want):
        assert g.tokens == w.tokens, f"{tag}: {g.tokens} != {w.tokens}"
        assert g.finish_reason == w.finish_reason, tag
        assert max((abs(a - b) for a, b in zip(g.logprobs, w.logprobs)), default=0.0) <= 1e-5, tag
        assert max((abs(a - b) for a, b in zip(g.sample_logprobs, w.sample_logprobs)), default=0.0) <= 1e-5, tag


def _any_layout(rank, world, tp, pp):
    """generate at (tp, pp) equals one process for a fixed seed: greedy and sampled, padded prompts, EOS."""
    import torch.distributed as dist

    cfg = _layout_config()
    single = build_model(cfg, seed=5).eval()
    ctx = ParallelContext.from_world(tp=tp, pp=pp)
    model = build_model(cfg, ctx, seed=5).eval()
    eos = generate(single, PROMPTS, max_new_tokens=10)[1].tokens[2]  # stops one row early, the others run on
    for kw in (dict(temperature=0.0), dict(temperature=0.9, top_p=0.8, seed=11), dict(temperature=1.0, seed=2)):
        kw = dict(max_new_tokens=10, eos_id=eos, **kw)
        want = generate(single, PROMPTS, **kw)
        got = generate(model, PROMPTS, ctx=ctx, **kw)
        _same_samples(got, want, f"tp={tp} pp={pp} {kw}")
        everyone = [None] * world
        dist.all_gather_object(everyone, [g.tokens for g in got])
        assert all(e == everyone[0] for e in everyone), "ranks ended with different tokens"
        if kw["temperature"] == 0:  # rows were dropped mid-batch while others ran on
            assert any(s.finish_reason == "stop" for s in want) and any(s.finish_reason == "length" for s in want)
    # the CPU decode layout (fused q|k|v and w1|w3 as views, packed copies) on each rank's slices and layers
    from llamactl.generation import decode_layout

    decode_layout(model)
    for kw in (dict(temperature=0.0), dict(temperature=0.9, top_p=0.8, seed=11)):
        kw = dict(max_new_tokens=10, eos_id=eos, **kw)
        _same_samples(generate(model, PROMPTS, ctx=ctx, **kw), generate(single, PROMPTS, **kw),
                      f"decode layout tp={tp} pp={pp} {kw}")


def test_generate_at_pp2():
    spawn(_any_layout, 2, 1, 2)


def test_generate_at_tp2_pp2():
    spawn(_any_layout, 4, 2, 2)


# ---- bf16 rollouts and collation ----------------------------------------------------------------------------
def test_bf16_autocast_rollouts_track_fp32():
    """autocast_dtype=bfloat16 from fp32 weights: runs, and its log-probs of the tokens it chose are those
    of the fp32 model within bf16 rounding (teacher-forced in fp32)."""
    from llamactl.scoring import token_logprobs

    model = build_model(odd_config(), seed=7).eval()
    got = generate(model, PROMPTS, max_new_tokens=8, temperature=0.8, seed=1, autocast_dtype=torch.bfloat16)
    for s in got:
        assert len(s.tokens) == 8
        seq = torch.tensor([s.prompt + s.tokens])
        ref = token_logprobs(model, seq)[0, len(s.prompt) - 1:]
        torch.testing.assert_close(torch.tensor(s.logprobs), ref, atol=0.1, rtol=0)
    fp32 = generate(model, PROMPTS, max_new_tokens=8, temperature=0.0)
    bf16 = generate(model, PROMPTS, max_new_tokens=8, temperature=0.0, autocast_dtype=torch.bfloat16)
    assert sum(a.tokens[0] == b.tokens[0] for a, b in zip(fp32, bf16)) >= len(PROMPTS) - 1  # same greedy start


def test_collate_gives_right_padded_training_tensors(model):
    from llamactl.generation import collate
    from llamactl.scoring import token_logprobs

    samples = generate(model, PROMPTS, max_new_tokens=6, temperature=1.0, seed=9, eos_id=PROMPTS[0][1])
    r = collate(samples, pad_id=0)
    b, t = r.tokens.shape
    assert t == max(len(s.prompt) + len(s.tokens) for s in samples)
    for i, s in enumerate(samples):
        n, m = len(s.prompt), len(s.tokens)
        assert r.tokens[i, :n + m].tolist() == s.prompt + s.tokens and bool((r.tokens[i, n + m:] == 0).all())
        assert r.mask[i].nonzero()[:, 0].tolist() == list(range(n, n + m)) and int(r.lengths[i]) == n + m
    # the sampler's log-probs are the teacher-forced ones at the response tokens (PPO's old log-probs)
    lp = token_logprobs(model, r.tokens, r.lengths)
    torch.testing.assert_close(lp[r.mask[:, 1:]], r.logprobs[:, 1:][r.mask[:, 1:]], atol=1e-5, rtol=0)
    assert bool((r.logprobs[~r.mask] == 0).all())
