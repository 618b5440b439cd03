"""Greedy decoding throughput: llamactl.generation vs transformers `generate`, same weights, alternated.

The `small` preset with random weights (seeded), exported to Hugging Face names into a
LlamaForCausalLM; both generate exactly --new-tokens tokens (no EOS) from the same --prompt-len
prompts, greedy, fp32, --threads threads, at each batch size. Rounds alternate the order of the two
engines; medians are reported. The memory-bandwidth bound: every decode step reads all weights once
(all layers + final norm + lm head; the embedding only B rows), so tokens/s <= B * bandwidth / bytes,
with bandwidth measured here by a large dst.copy_(src) (read + write bytes / time).
llamactl runs as `llamactl generate` does: after `decode_layout` (weights stored column-major on CPU on
huge pages, q|k|v and w1|w3 fused; decode steps of up to 8 rows run the GEMV kernel, larger products such
as the prompt's prefill oneDNN-packed copies).

On a machine shared with other jobs, wall-clock time mostly measures the scheduler: with 2 threads a
parallel region waits for its second thread whenever that one is preempted. `--clock cpu --threads 1`
times each engine by the CPU time of its one thread instead (the bandwidth copy likewise), which other
jobs disturb far less (they still share the memory bus); the clock used is printed.

    python bench/generate_throughput.py [--rounds 3] [--batches 1,8] [--new-tokens 128] [--threads 2] [--clock wall]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from llamactl.config import preset
from llamactl.generation import decode_layout, generate
from llamactl.model import build_model


def to_hf(model):
    """A transformers LlamaForCausalLM holding exactly our weights (rotate-half RoPE: no permutation)."""
    import transformers

    cfg = model.cfg
    hc = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                                  num_key_value_heads=cfg.kv_heads, rms_norm_eps=cfg.norm_eps,
                                  rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
                                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf = transformers.LlamaForCausalLM(hc).eval()
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    sub = [("attention.wq", "self_attn.q_proj"), ("attention.wk", "self_attn.k_proj"),
           ("attention.wv", "self_attn.v_proj"), ("attention.wo", "self_attn.o_proj"),
           ("feed_forward.w1", "mlp.gate_proj"), ("feed_forward.w3", "mlp.up_proj"),
           ("feed_forward.w2", "mlp.down_proj"), ("attention_norm", "input_layernorm"),
           ("ffn_norm", "post_attention_layernorm")]
    sd = {}
    for k, v in model.state_dict().items():
        if k in names:
            sd[names[k]] = v
            continue
        n = "model." + k
        for a, b in sub:
            n = n.replace(a, b)
        sd[n] = v
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise SystemExit(f"weight mapping incomplete: missing {missing} unexpected {unexpected}")
    return hf


CLOCK = time.perf_counter  # --clock cpu: time.process_time (CPU time of the process's threads)


def copy_bandwidth(mib: int = 256, reps: int = 5) -> float:
    """GB/s of read + write traffic of a large tensor copy (median of reps)."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        t = CLOCK()
        dst.copy_(src)
        times.append(CLOCK() - t)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def weight_bytes_per_step(model, batch: int) -> int:
    """Bytes of weights one decode step reads: everything but the embedding, plus B embedding rows."""
    total = 0
    for name, p in model.named_parameters():
        if name == "tok_embeddings.weight":
            total += batch * p.shape[1] * p.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def run_hf(hf, prompts: torch.Tensor, new: int) -> tuple[float, list[list[int]]]:
    with torch.inference_mode():
        t = CLOCK()
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                          min_new_tokens=new, do_sample=False, pad_token_id=0)
        dt = CLOCK() - t
    return dt, out[:, prompts.shape[1]:].tolist()


def run_ours(model, prompts: torch.Tensor, new: int) -> tuple[float, list[list[int]]]:
    t = CLOCK()
    out = generate(model, prompts.tolist(), max_new_tokens=new, temperature=0.0, eos_id=None)
    dt = CLOCK() - t
    return dt, [s.tokens for s in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", help="model preset")
    ap.add_argument("--rounds", type=int, default=3, help="alternated rounds (medians reported)")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sequence")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per sequence")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time; cpu: CPU time of the process (shared machines, with --threads 1)")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    import transformers  # noqa: F401  (the peer; fail early if absent)

    cfg = preset(args.size)
    ours = build_model(cfg, seed=0).eval()
    hf = to_hf(ours)  # copies the weights: both engines hold their own
    moved = decode_layout(ours)  # what `llamactl generate` / `chat` do after loading a checkpoint on CPU
    batches = [int(b) for b in args.batches.split(",")]
    g = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(3, cfg.vocab_size, (b, args.prompt_len), generator=g) for b in batches}
    times = {(e, b): [] for e in ("llamactl", "transformers") for b in batches}
    same = {}
    bws = []
    for b in batches:  # warm-up at full prompt length (allocator, MKL, oneDNN's packed copies for the prefill)
        run_ours(ours, prompts[b], 4)
        run_hf(hf, prompts[b], 4)
    for r in range(args.rounds):
        bws.append(copy_bandwidth())  # each round: the bound follows the machine's load
        for b in batches:
            order = [("llamactl", run_ours, ours), ("transformers", run_hf, hf)]
            if r % 2:
                order.reverse()
            toks = {}
            for name, fn, m in order:
                dt, toks[name] = fn(m, prompts[b], args.new_tokens)
                times[(name, b)].append(dt)
            same[b] = same.get(b, True) and toks["llamactl"] == toks["transformers"]
            print(f"round {r + 1} batch {b}: " + ", ".join(
                f"{n} {b * args.new_tokens / times[(n, b)][-1]:.1f} tok/s" for n, _, _ in order)
                + f", ratio {times[('transformers', b)][-1] / times[('llamactl', b)][-1]:.2f}x", flush=True)
    bw = statistics.median(bws)
    rows = []
    for b in batches:
        tps = {e: b * args.new_tokens / statistics.median(times[(e, b)]) for e in ("llamactl", "transformers")}
        # the median of the rounds' paired ratios: each pair ran back to back, under the same load
        ratio = statistics.median(h / o for o, h in zip(times[("llamactl", b)], times[("transformers", b)]))
        bound = b * bw * 1e9 / weight_bytes_per_step(ours, b)
        frac = 100 * tps["llamactl"] / bound
        rows.append((b, tps, ratio, frac))
        print(f"batch {b}: llamactl {tps['llamactl']:.1f} tok/s, transformers {tps['transformers']:.1f} tok/s, "
              f"ratio {ratio:.2f}x (median of paired rounds), greedy tokens identical: {same[b]}, bandwidth bound "
              f"{bound:.1f} tok/s -> llamactl at {frac:.0f} % of it")
    wb = weight_bytes_per_step(ours, 1)
    print(f"weights read per decode step: {wb / 1e6:.1f} MB; copy bandwidth {bw:.1f} GB/s (read + write, median "
          f"of rounds {', '.join(f'{x:.1f}' for x in bws)}); llamactl decode layout: {moved} matrices column-major")
    head = ", ".join(f"{ratio:.2f}x at batch {b}" for b, _, ratio, _ in rows)
    details = "; ".join(f"batch {b}: {t['llamactl']:.1f} vs {t['transformers']:.1f} tok/s, {frac:.0f} % of the "
                        f"bandwidth bound" for b, t, _, frac in rows)
    print(f"generate tokens/s: {head} transformers ({details}; {args.size}, {args.new_tokens} new tokens, "
          f"{args.threads} threads, {args.clock} clock, medians of {args.rounds} rounds)")

if __name__ == "__main__":
    main()
