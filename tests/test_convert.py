"""Meta / Hugging Face interop against the real thing: transformers' Llama, and Meta's reference RoPE.

A tiny random LlamaForCausalLM with GQA, saved by transformers, converted by llamactl, must give the same
logits; our export and our checkpoint directory itself must load back in transformers with the same
logits; a Meta export at MP=2 must hold fairscale's split tensors in Meta's interleaved RoPE layout
(checked with a forward pass written the way Meta's reference code computes RoPE) and import back
bit-identically.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from llamactl import checkpoint as C
from llamactl.convert import convert, export, half_to_interleaved, interleaved_to_half
from llamactl.errors import LlamactlError
from llamactl.model import build_model
from reference_llama import llama_forward, rope_interleaved

transformers = pytest.importorskip("transformers")

TOKENS = torch.tensor([[1, 17, 300, 2000, 5, 99, 1024, 7, 8, 1500, 3, 42],
                       [1, 2047, 4, 4, 600, 31, 12, 9, 77, 1800, 250, 11]])


def _hf_config(**kw):
    base = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=2048, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500.0,
                tie_word_embeddings=False, attn_implementation="eager")
    base.update(kw)
    return transformers.LlamaConfig(**base)


def _randomize_norms(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:  # distinct norms catch input/post-attention mix-ups
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random LlamaForCausalLM with GQA, saved by transformers (safetensors), without tokenizer."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_hf_config()).eval()
    _randomize_norms(model, 1)
    d = tmp_path_factory.mktemp("hf") / "tiny-llama"
    model.save_pretrained(d)
    with torch.no_grad():
        logits = model(TOKENS).logits
    return d, logits


@pytest.fixture(scope="module")
def converted(hf_dir, tiny_tokenizer, tmp_path_factory):
    src, _ = hf_dir
    return convert(src, tmp_path_factory.mktemp("ck") / "from-hf", "hf", tokenizer=tiny_tokenizer, show_progress=False)


def _our_logits(path):
    m, _ = C.load_model(path)
    with torch.no_grad():
        return m.eval()(TOKENS)


def _hf_logits(path, cls=None):
    cls = cls or transformers.LlamaForCausalLM
    m = cls.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        return m(TOKENS).logits


def test_hf_import_parity(hf_dir, converted):
    src, want = hf_dir
    assert sorted(p.name for p in src.iterdir() if p.suffix == ".safetensors")  # saved by transformers
    cfg, head = C.load_config(converted)
    assert head == "lm" and (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.ffn_dim) == (64, 3, 4, 2, 176)
    assert (cfg.multiple_of, cfg.ffn_dim_multiplier) == C.infer_ffn_rule(64, 176)
    diff = (_our_logits(converted) - want).abs().max().item()
    assert diff <= 1e-4, diff
    assert C.verify(converted) == [] and C.read_meta(converted)["stage"] == "convert-hf"


def test_our_dirs_load_in_transformers(hf_dir, converted, tmp_path):
    _, want = hf_dir
    # the checkpoint directory itself is a HF model directory
    assert (_hf_logits(converted) - want).abs().max().item() <= 1e-4
    out = export(converted, tmp_path / "hf-out", "hf", show_progress=False)
    assert not (out / "llamactl.json").exists() and (out / "tokenizer.model").is_file()
    assert (_hf_logits(out) - want).abs().max().item() <= 1e-4
    # bf16 export: the same tensors rounded
    out16 = export(converted, tmp_path / "hf-bf16", "hf", dtype="bf16", show_progress=False)
    assert json.loads((out16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    ours = C.load_model(out16, dtype=torch.bfloat16)[0].layers["1"].attention.wq.weight
    assert torch.equal(ours, C.load_model(converted)[0].layers["1"].attention.wq.weight.bfloat16())


def test_reward_head_is_a_sequence_classifier(tmp_path, tiny_tokenizer):
    from llamactl.config import ModelConfig

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=2048, multiple_of=16, max_seq_len=64)
    rm = build_model(cfg, head="reward", seed=5).eval()
    path = C.save(tmp_path / "rm", rm, tokenizer=tiny_tokenizer, stage="reward")
    with torch.no_grad():
        ours = rm(TOKENS)[:, -1]
    theirs = _hf_logits(path, transformers.LlamaForSequenceClassification)
    assert theirs.shape == (2, 1) and (theirs[:, 0] - ours).abs().max().item() <= 1e-5
    # and a HF sequence classifier converts back as a reward model
    back = convert(path, tmp_path / "rm-back", "hf", show_progress=False)
    assert C.load_config(back)[1] == "reward"
    assert torch.equal(C.load_model(back)[0].score.weight, rm.score.weight)


def _meta_forward(sd: dict, params: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Llama 2 as Meta's reference computes it: complex-number RoPE on interleaved pairs."""
    rope = rope_interleaved(params["dim"] // params["n_heads"], tokens.shape[1], params["rope_theta"])
    return llama_forward(sd, tokens, n_layers=params["n_layers"], n_heads=params["n_heads"],
                         n_kv_heads=params["n_kv_heads"], eps=params["norm_eps"], rope=rope)


def test_meta_round_trip_mp2(hf_dir, converted, tmp_path):
    _, want = hf_dir
    meta_dir = export(converted, tmp_path / "meta", "meta", mp=2, show_progress=False)
    params = json.loads((meta_dir / "params.json").read_text())
    cfg, _ = C.load_config(converted)
    assert params == {"dim": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 2048,
                      "multiple_of": cfg.multiple_of, "ffn_dim_multiplier": cfg.ffn_dim_multiplier,
                      "norm_eps": 1e-5, "rope_theta": 500.0}
    shards = [torch.load(meta_dir / f"consolidated.0{i}.pth", weights_only=True) for i in range(2)]
    # fairscale split dims
    s0 = shards[0]
    assert s0["tok_embeddings.weight"].shape == (2048, 32) and s0["output.weight"].shape == (1024, 64)
    assert s0["layers.0.attention.wq.weight"].shape == (32, 64) and s0["layers.0.attention.wk.weight"].shape == (16, 64)
    assert s0["layers.0.attention.wo.weight"].shape == (64, 32)
    assert s0["layers.0.feed_forward.w2.weight"].shape == (64, 88)
    assert s0["layers.0.feed_forward.w1.weight"].shape == (88, 64) and s0["norm.weight"].shape == (64,)
    assert torch.equal(s0["layers.2.ffn_norm.weight"], shards[1]["layers.2.ffn_norm.weight"])
    # merged Meta weights in Meta's RoPE layout give the same logits under Meta's reference RoPE
    split = {"tok_embeddings": 1, "wo": 1, "w2": 1}
    merged = {}
    for k in s0:
        kind = k.split(".")[-2]
        merged[k] = s0[k] if "norm" in k else torch.cat([s[k] for s in shards], split.get(kind, 0))
    assert (_meta_forward(merged, params, TOKENS) - want).abs().max().item() <= 1e-4
    # the stray rope.freqs of Meta's files is ignored, vocab_size -1 (as Meta ships it) is read from the
    # embedding; the import is bit-identical
    (meta_dir / "params.json").write_text(json.dumps({**params, "vocab_size": -1}))
    for i, s in enumerate(shards):
        s["rope.freqs"] = torch.randn(16)
        torch.save(s, meta_dir / f"consolidated.0{i}.pth")
    back = convert(meta_dir, tmp_path / "from-meta", "meta", show_progress=False)  # tokenizer.model sits in meta_dir
    a, b = C.load_model(converted)[0], C.load_model(back)[0]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(_our_logits(back), _our_logits(converted))


def test_rope_permutation_is_meta_vs_half_layout():
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(16, 3)  # 2 heads of head_dim 8
    half = interleaved_to_half(w, 2)
    # head 0's interleaved rows (0,1), (2,3), ... become halves: even rows first, then odd rows
    assert half[:8, 0].tolist() == w[[0, 2, 4, 6, 1, 3, 5, 7], 0].tolist()
    assert torch.equal(half_to_interleaved(half, 2), w)


def test_bin_weights_and_tied_embeddings(tmp_path, tiny_tokenizer):
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(_hf_config(num_hidden_layers=1, tie_word_embeddings=True)).eval()
    d = tmp_path / "bin"
    d.mkdir()
    model.config.save_pretrained(d)
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    torch.save(sd, d / "pytorch_model.bin")
    shutil.copyfile(tiny_tokenizer, d / "tokenizer.model")
    out = convert(d, tmp_path / "ck", "hf", show_progress=False)
    with torch.no_grad():
        want = model(TOKENS).logits
    assert (_our_logits(out) - want).abs().max().item() <= 1e-4


def test_one_line_errors(hf_dir, converted, tmp_path, capsys):
    from llamactl.cli import main

    src, _ = hf_dir

    def err(*argv):
        with pytest.raises(SystemExit) as e:
            main(list(map(str, argv)))
        assert e.value.code == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]

    assert "no tokenizer.model" in err("convert", "--from", "hf", src, tmp_path / "x")
    assert "source not found" in err("convert", "--from", "hf", tmp_path / "missing", tmp_path / "x")
    assert "no params.json" in err("convert", "--from", "meta", src, tmp_path / "x")
    assert "unknown source format 'gguf'" in err("convert", "--from", "gguf", src, tmp_path / "x")
    assert "--tokenizer" in err("convert", "--from", "hf", src, tmp_path / "x", "--tokenizer", tmp_path / "nope.model")
    assert "already exists" in err("export", "--to", "hf", converted, src)
    # a tokenizer whose vocabulary does not match the model's
    small = tmp_path / "small-vocab"
    transformers.LlamaForCausalLM(_hf_config(num_hidden_layers=1, vocab_size=1024)).save_pretrained(small)
    capsys.readouterr()  # transformers' own progress output
    msg = err("convert", "--from", "hf", small, tmp_path / "x", "--tokenizer", converted / "tokenizer.model")
    assert "2,048 pieces but the model's vocab_size is 1,024" in msg
    shutil.rmtree(small)
    assert "does not divide the 2 kv heads" in err("export", "--to", "meta", "--mp", "4", converted, tmp_path / "m")
    assert "not a checkpoint directory" in err("export", "--to", "hf", tmp_path, tmp_path / "y")
    # a pickle that is more than tensors is refused by weights_only=True
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4}))
    torch.save({"tok_embeddings.weight": torch.zeros(2, 64), "x": Path("/")}, bad / "consolidated.00.pth")
    assert "weights_only=True" in err("convert", "--from", "meta", bad, tmp_path / "z")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # failed writes leave no temporaries
    main(["convert", "--from", "hf", str(src), str(tmp_path / "ok"), "--tokenizer", str(converted / "tokenizer.model")])
    assert "wrote" in capsys.readouterr().out


def test_bf16_training_checkpoint_exports_to_hf(tmp_path, tiny_tokenizer):
    """save(dtype=bf16) with fp32 masters in train_state: the directory and its HF export hold the bf16
    weights only (no train state, no masters), and transformers computes the bf16 model's logits."""
    from llamactl.config import ModelConfig

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=2048, multiple_of=16, max_seq_len=64)
    m = build_model(cfg, seed=6).eval()
    ck = C.save(tmp_path / "step-000003", m, tokenizer=tiny_tokenizer, step=3, dtype=torch.bfloat16,
                train_state={"step": 3})
    assert (ck / "train_state" / "masters00000.pt").is_file()
    out = export(ck, tmp_path / "hf", "hf", show_progress=False)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert not (out / "train_state").exists() and not (out / "llamactl.json").exists()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.bfloat16().float())  # the weights the export holds
        want = m(TOKENS)
    for d in (ck, out):
        assert (_hf_logits(d) - want).abs().max().item() <= 1e-4, d
