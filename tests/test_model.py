"""The model against a from-scratch single-function reference, and its incremental-decoding paths."""
import torch

from llamactl.config import ModelConfig, preset
from llamactl.model import build_model, last_token
from reference_llama import llama_forward, rope_half

torch.manual_seed(0)


def reference_forward(sd: dict, cfg: ModelConfig, tokens: torch.Tensor) -> torch.Tensor:
    rope = rope_half(cfg.head_dim, tokens.shape[1], cfg.rope_theta)
    return llama_forward(sd, tokens, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.kv_heads,
                         eps=cfg.norm_eps, rope=rope)


def odd_config():
    # odd sizes everywhere: 3 layers, 6 heads sharing 3 kv heads, vocab 97
    return ModelConfig(dim=48, n_layers=3, n_heads=6, n_kv_heads=3, vocab_size=97, multiple_of=8, max_seq_len=64)


def test_matches_reference_forward():
    cfg = odd_config()
    m = build_model(cfg, seed=1)
    # perturb the norms so their weights matter
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    tokens = torch.randint(0, cfg.vocab_size, (3, 19))
    ours = m(tokens)
    ref = reference_forward(dict(m.named_parameters()), cfg, tokens)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_kv_cache_matches_full_forward():
    cfg = odd_config()
    m = build_model(cfg, seed=2).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 23))
    with torch.no_grad():
        full = m(tokens)
        cache = m.new_cache(2, 40)
        parts = [m(tokens[:, :9], cache=cache), m(tokens[:, 9:16], start_pos=9, cache=cache)]
        parts += [m(tokens[:, i:i + 1], start_pos=i, cache=cache) for i in range(16, 23)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_left_padding_equals_unpadded():
    cfg = odd_config()
    m = build_model(cfg, seed=3).eval()
    a = torch.randint(0, cfg.vocab_size, (1, 13))
    pad = 5
    tokens = torch.cat([torch.zeros(1, pad, dtype=torch.long), a], 1)
    key_mask = torch.cat([torch.zeros(1, pad, dtype=torch.bool), torch.ones(1, 13, dtype=torch.bool)], 1)
    positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = m(tokens, positions=positions, key_mask=key_mask)
        plain = m(a)
    assert torch.isfinite(padded).all()
    torch.testing.assert_close(padded[:, pad:], plain, atol=1e-5, rtol=1e-5)


def test_reward_and_value_heads():
    cfg = preset("tiny")
    m = build_model(cfg, head="reward", seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (4, 11))
    values = m(tokens)
    assert values.shape == (4, 11) and values.dtype == torch.float32
    lengths = torch.tensor([11, 5, 1, 8])
    r = last_token(values, lengths)
    assert torch.equal(r, values[torch.arange(4), lengths - 1])
    assert "score.weight" in dict(m.named_parameters()) and "output.weight" not in dict(m.named_parameters())


def test_init_is_deterministic_and_recompute_is_exact():
    cfg = odd_config()
    a, b = build_model(cfg, seed=7), build_model(cfg, seed=7)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    a(tokens).logsumexp(-1).sum().backward()
    b.recompute = True
    b(tokens).logsumexp(-1).sum().backward()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-6, msg=n)
