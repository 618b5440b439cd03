"""Hugging Face's Llama layout: tensor names and config.json, to and from ours (Meta's names, ModelConfig).

Used by the checkpoint format (whose directories are HF model directories) and by `convert`. Our RoPE uses
HF's rotate-half layout, so the names map one to one with no q/k permutation (Meta's layout: convert.py).
"""
from __future__ import annotations

from typing import Any

import torch

from llamactl.config import ModelConfig
from llamactl.errors import LlamactlError

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
DTYPE_ALIASES = {**DTYPES, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype | None, flag: str = "--dtype") -> torch.dtype | None:
    """torch dtype of a weight dtype name (float32 / fp32, bfloat16 / bf16, float16 / fp16); None stays None."""
    if name is None or isinstance(name, torch.dtype) and name in DTYPE_NAMES:
        return name
    if not isinstance(name, str) or name.lower() not in DTYPE_ALIASES:
        raise LlamactlError(f"unknown dtype {name!r}; one of float32, bfloat16, float16 ({flag})")
    return DTYPE_ALIASES[name.lower()]


# ---- names: ours (Meta's) <-> Hugging Face's ---------------------------------------------------------
_LAYER_TO_HF = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_LAYER_FROM_HF = {v: k for k, v in _LAYER_TO_HF.items()}
_TOP_TO_HF = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight", "score.weight": "score.weight"}
_TOP_FROM_HF = {v: k for k, v in _TOP_TO_HF.items()}
HEAD_PARAMS = ("output.weight", "score.weight")


def to_hf_name(name: str) -> str:
    """`layers.3.attention.wq.weight` -> `model.layers.3.self_attn.q_proj.weight` (and the top-level ones)."""
    if name in _TOP_TO_HF:
        return _TOP_TO_HF[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in _LAYER_TO_HF:
        return f"model.layers.{parts[1]}.{_LAYER_TO_HF[parts[2]]}"
    raise KeyError(name)


def from_hf_name(name: str) -> str | None:
    """Inverse of to_hf_name; None for tensors we do not use (e.g. rotary inv_freq buffers)."""
    if name in _TOP_FROM_HF:
        return _TOP_FROM_HF[name]
    if name.startswith("model.layers."):
        idx, rest = name[len("model.layers."):].split(".", 1)
        if rest in _LAYER_FROM_HF:
            return f"layers.{idx}.{_LAYER_FROM_HF[rest]}"
    return None


# ---- HF config.json <-> ModelConfig -------------------------------------------------------------------
def hf_config(cfg: ModelConfig, head: str, dtype: torch.dtype) -> dict[str, Any]:
    """The config.json transformers needs to load our tensors as LlamaForCausalLM / ...SequenceClassification."""
    d = {
        "architectures": ["LlamaForCausalLM" if head == "lm" else "LlamaForSequenceClassification"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "num_hidden_layers": cfg.n_layers,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers < 5 reads this, >= 5 rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": DTYPE_NAMES.get(dtype, "float32"),
        "use_cache": True,
    }
    if head != "lm":
        # HF scores the rightmost token that is not pad_token_id; id 0 (unk) never appears with byte fallback
        d.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, pad_token_id=0)
    return d


def infer_ffn_rule(dim: int, intermediate_size: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) that reproduce `intermediate_size` with Meta's FFN rule.

    Prefers Meta's usual multiple_of 256, then larger powers of two dividing the size; a multiplier is
    used only when needed and then the one with the fewest decimals (the largest such), e.g. 70B -> 1.3.
    """
    size = intermediate_size
    h = int(2 * 4 * dim / 3)
    pow2 = [1 << k for k in range(20, -1, -1) if size % (1 << k) == 0]
    candidates = ([256] if size % 256 == 0 else []) + [m for m in pow2 if m != 256]
    if size not in candidates:
        candidates.append(size)  # last resort: always reachable with a multiplier

    def rule(m: int, mult: float | None) -> int:
        hh = int(mult * h) if mult is not None else h
        return m * ((hh + m - 1) // m)

    for m in candidates[:-1] if size not in pow2 else candidates:
        if rule(m, None) == size:
            return m, None
    for decimals in range(1, 7):
        scale = 10 ** decimals
        for m in candidates:
            lo, hi = max(1, (size - m) * scale // max(h, 1) - 1), (size * scale) // max(h, 1) + 2
            for k in range(hi, lo - 1, -1):
                mult = round(k / scale, decimals)
                if rule(m, mult) == size:
                    return m, mult
    raise LlamactlError(f"cannot express intermediate_size {size} with Meta's FFN rule for dim {dim}")


def config_from_hf(d: dict[str, Any], where: str) -> tuple[ModelConfig, str]:
    """ModelConfig and head kind from a Hugging Face config.json dict; unsupported variants are refused."""
    if d.get("model_type") not in ("llama", None):
        raise LlamactlError(f"model_type is {d.get('model_type')!r}, only 'llama' is supported ({where})")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
               if k not in d]
    if missing:
        raise LlamactlError(f"config.json lacks {', '.join(missing)} ({where})")
    if d.get("hidden_act", "silu") != "silu":
        raise LlamactlError(f"hidden_act {d['hidden_act']!r} is not supported, Llama uses 'silu' ({where})")
    if d.get("rope_scaling"):
        raise LlamactlError(f"rope_scaling {d['rope_scaling']} is not supported ({where})")
    for k in ("attention_bias", "mlp_bias"):
        if d.get(k):
            raise LlamactlError(f"{k}=true is not supported: Llama 2 has no biases ({where})")
    dim, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
    if d.get("head_dim") not in (None, dim // heads):
        raise LlamactlError(f"head_dim {d['head_dim']} != hidden_size / num_attention_heads = {dim // heads} ({where})")
    multiple_of, mult = infer_ffn_rule(dim, int(d["intermediate_size"]))
    rope = d.get("rope_parameters") or {}
    theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default":
        raise LlamactlError(f"rope type {rope.get('rope_type')!r} is not supported ({where})")
    kv = d.get("num_key_value_heads") or heads
    cfg = ModelConfig(dim=dim, n_layers=int(d["num_hidden_layers"]), n_heads=heads,
                      n_kv_heads=None if kv == heads else int(kv), vocab_size=int(d["vocab_size"]),
                      multiple_of=multiple_of, ffn_dim_multiplier=mult, norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                      rope_theta=float(theta), max_seq_len=int(d.get("max_position_embeddings", 4096)))
    arch = (d.get("architectures") or ["LlamaForCausalLM"])[0]
    if arch == "LlamaForCausalLM":
        head = "lm"
    elif arch == "LlamaForSequenceClassification":
        if int(d.get("num_labels", len(d.get("id2label") or {0: 0}))) != 1:
            raise LlamactlError(f"LlamaForSequenceClassification with num_labels != 1 is not a reward model ({where})")
        head = "reward"
    else:
        raise LlamactlError(f"architecture {arch} is not supported (LlamaForCausalLM / "
                            f"LlamaForSequenceClassification) ({where})")
    return cfg, head
