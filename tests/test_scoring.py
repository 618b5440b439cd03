"""Scoring: per-token log-probs and sequence scores against one process's plain log_softmax / head output,
with padding on either side, and at tp 2 and pp 2 (gloo processes)."""
import pytest
import torch

from dist_utils import spawn
from llamactl.config import ModelConfig
from llamactl.errors import LlamactlError
from llamactl.model import build_model, last_token
from llamactl.scoring import sequence_scores, token_logprobs


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs on one thread (see conftest.one_thread)."""


def odd_config(**kw):
    # odd sizes: 3 layers, 6 heads sharing 2 kv heads (GQA), vocab 98 (even, so tp 2 splits it)
    base = dict(dim=48, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=98, multiple_of=8, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


ROWS = [[1, 5, 9, 17, 60, 2, 33], [1, 40, 41], [1, 3, 3, 3, 80, 81, 82, 83, 84, 85, 86], [1, 7]]


def reference_logprobs(model, ids):
    """log_softmax of the full logits of one unpadded row, gathered at the next token: (len-1,)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]
    return torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def padded(rows, side, pad=0):
    t = max(map(len, rows))
    tokens = torch.full((len(rows), t), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.bool)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(t - len(r), t)
        tokens[i, sl] = torch.tensor(r)
        mask[i, sl] = True
    return tokens, mask


def unpad(values, mask, i, shift=1):
    """Row i's values at its real positions (shift 1: log-probs are indexed by target position - 1)."""
    keep = (mask[i, shift:] & mask[i, :-shift]) if shift else mask[i]
    return values[i][keep]


@pytest.fixture(scope="module")
def lm():
    return build_model(odd_config(), seed=3).eval()


@pytest.fixture(scope="module")
def rm():
    return build_model(odd_config(), head="reward", seed=4).eval()


# ---- one process ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["right", "left"])
def test_token_logprobs_equal_log_softmax_with_padding(lm, side):
    tokens, mask = padded(ROWS, side)
    arg = mask.sum(1) if side == "right" else mask  # lengths for right padding, a mask for either side
    got = token_logprobs(lm, tokens, arg)
    assert got.shape == (len(ROWS), tokens.shape[1] - 1) and got.dtype == torch.float32
    for i, r in enumerate(ROWS):
        torch.testing.assert_close(unpad(got, mask, i), reference_logprobs(lm, r), atol=1e-5, rtol=0)
    assert bool((got[~(mask[:, 1:] & mask[:, :-1])] == 0).all())  # padding scores nothing


def test_token_logprobs_unpadded_and_gradient(lm):
    tokens = torch.tensor([ROWS[0], ROWS[0][::-1]])
    got = token_logprobs(lm, tokens)
    for i in range(2):
        torch.testing.assert_close(got[i], reference_logprobs(lm, tokens[i].tolist()), atol=1e-6, rtol=0)
    # differentiable at pp 1 (PPO's ratio): the same gradient as log_softmax of the full logits
    weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(0))
    lm.zero_grad()
    (token_logprobs(lm, tokens) * weights).sum().backward()
    ours = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad()
    logp = torch.log_softmax(lm(tokens)[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0]
    (logp * weights).sum().backward()
    for n, p in lm.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)
    lm.zero_grad(set_to_none=True)


@pytest.mark.parametrize("side", ["right", "left"])
def test_sequence_scores_at_the_last_real_token(rm, side):
    tokens, mask = padded(ROWS, side)
    arg = mask.sum(1) if side == "right" else mask
    got = sequence_scores(rm, tokens, arg)
    per_token = sequence_scores(rm, tokens, arg, per_token=True)
    for i, r in enumerate(ROWS):
        with torch.no_grad():
            alone = rm(torch.tensor([r]))[0]
        torch.testing.assert_close(got[i], alone[-1], atol=1e-5, rtol=0)
        torch.testing.assert_close(per_token[i][mask[i]], alone, atol=1e-5, rtol=0)
    assert bool((per_token[~mask] == 0).all())
    torch.testing.assert_close(last_token(per_token, mask), got)


def test_last_token_lengths_and_mask_agree():
    values = torch.randn(3, 6)
    lengths = torch.tensor([6, 2, 4])
    right = torch.arange(6)[None] < lengths[:, None]
    left = right.flip(1)
    assert torch.equal(last_token(values, lengths), last_token(values, right))
    assert torch.equal(last_token(values, left), values[:, -1])


def test_bad_padding_and_heads_are_clear_errors(lm, rm):
    tokens = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="contiguous"):
        token_logprobs(lm, tokens, torch.tensor([[True, False, True, True]]))
    with pytest.raises(ValueError, match="lengths"):
        token_logprobs(lm, tokens, torch.tensor([5]))
    with pytest.raises(LlamactlError, match="language-model"):
        token_logprobs(rm, tokens)
    with pytest.raises(LlamactlError, match="reward or value"):
        sequence_scores(lm, tokens)


# ---- tp 2 and pp 2 ----------------------------------------------------------------------------------------
def _layouts(rank, world):
    """token_logprobs / sequence_scores at tp 2 and at pp 2 equal one process, on every rank, both paddings."""
    from llamactl.parallel.context import ParallelContext

    cfg = odd_config()
    single_lm = build_model(cfg, seed=3).eval()
    single_rm = build_model(cfg, head="reward", seed=4).eval()
    for tp, pp in ((2, 1), (1, 2)):
        ctx = ParallelContext.from_world(tp=tp, pp=pp)
        lm = build_model(cfg, ctx, seed=3).eval()
        rm = build_model(cfg, ctx, head="reward", seed=4).eval()
        for side in ("right", "left"):
            tokens, mask = padded(ROWS, side)
            want = token_logprobs(single_lm, tokens, mask)
            got = token_logprobs(lm, tokens, mask, ctx)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0, msg=f"logprobs tp={tp} pp={pp} {side}")
            want = sequence_scores(single_rm, tokens, mask)
            got = sequence_scores(rm, tokens, mask, ctx)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0, msg=f"scores tp={tp} pp={pp} {side}")
        if pp == 1:  # the per-token head's backward at tp 2: input gradient equal to one process's
            tokens = torch.tensor([ROWS[0], ROWS[2][:7]])
            h = torch.randn(2, 6, cfg.dim, generator=torch.Generator().manual_seed(1))
            from llamactl.scoring import hidden_logprobs

            valid = torch.ones(2, 6, dtype=torch.bool)
            h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
            a = hidden_logprobs(h1, single_lm.output, tokens[:, 1:], valid, ParallelContext.single())
            b = hidden_logprobs(h2, lm.output, tokens[:, 1:], valid, ctx)
            torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
            a.sum().backward()
            b.sum().backward()
            torch.testing.assert_close(h2.grad, h1.grad, atol=1e-6, rtol=0)


def test_scoring_at_tp2_and_pp2():
    spawn(_layouts, 2)
