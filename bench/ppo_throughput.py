"""PPO throughput: rollout tokens/s inside a PPO iteration against `llamactl generate`'s path alone, and
the PPO iteration against TRL's PPO trainer where the installed TRL has one.

Rollouts: `llamactl rlhf ppo` samples from the policy in its training layout; on CPU it keeps a
decode-layout copy of its shard, refreshed in place from the training weights before every rollout
(stages/ppo.py: decode_copy / sync_sampler). This bench runs whole PPO iterations (`stages.ppo.iteration`:
rollout, scoring by policy / reference / value / both RMs, minibatch steps) and reads the rollout's tokens/s
from its metrics row (the time includes the weight refresh). The peer is what `llamactl generate` runs:
`generation.load_for_generation` (checkpoint -> decode layout) then `generation.generate`, on the same
prompts, batch, seeds, temperature and --max-new-tokens. The two alternate round by round in one process;
the ratio is the median of per-round ratios (other processes share the cores). Token counts can differ
(the policy moves, rows stop at EOS), so the comparison is per generated token.

TRL: its PPO trainer is compared only if the installed TRL exposes one (trl.PPOTrainer or
trl.experimental.ppo); the script says which version it found and why it did not run otherwise.

    python bench/ppo_throughput.py [--dim 64] [--layers 2] [--batch 16] [--new-tokens 32] [--rounds 3]
    python bench/ppo_throughput.py --policy CKPT --rm-helpful RM --rm-safety RM --prompts FILE.jsonl
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def make_inputs(work: Path, dim: int, layers: int) -> tuple[Path, Path, Path, Path]:
    """Seeded policy and reward checkpoints (a tokenizer trained on the stdlib corpus) and prompts."""
    from llamactl import checkpoint
    from llamactl.config import ModelConfig
    from llamactl.corpus import write_stdlib_corpus
    from llamactl.model import build_model
    from llamactl.tokenizer import train_tokenizer

    corpus = write_stdlib_corpus(work / "corpus.txt", max_bytes=300_000)
    tok = train_tokenizer([corpus], work / "tok", vocab_size=1000)
    cfg = ModelConfig(dim=dim, n_layers=layers, n_heads=max(2, dim // 32), n_kv_heads=max(1, dim // 64),
                      vocab_size=1000, multiple_of=32, max_seq_len=256)
    pol = checkpoint.save(work / "policy", build_model(cfg, seed=1), tokenizer=tok, stage="bench")
    rms = [checkpoint.save(work / f"rm-{k}", build_model(cfg, head="reward", seed=s), tokenizer=tok, stage="reward",
                           extra={"rm_kind": k}) for k, s in (("helpfulness", 2), ("safety", 3))]
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} plus {2 * i + 1}? Answer briefly.",
                                           "safety": i % 5 == 0}) + "\n" for i in range(256)))
    return pol, rms[0], rms[1], prompts


def trl_ppo_status() -> tuple[object | None, str]:
    """(TRL's PPO trainer class or None, what was found)."""
    try:
        import trl
    except ImportError:
        return None, "TRL is not installed (pip install -e '.[bench]')"
    for mod, name in (("trl", "PPOTrainer"), ("trl.experimental.ppo", "PPOTrainer")):
        try:
            import os
            import warnings

            os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = __import__(mod, fromlist=[name])
            cls = getattr(m, name, None)
            if cls is not None:
                return cls, f"trl {trl.__version__}: {mod}.{name}"
        except Exception:  # noqa: BLE001 - missing module or its optional dependencies
            continue
    return None, (f"trl {trl.__version__} has no PPO trainer (neither trl.PPOTrainer nor "
                  f"trl.experimental.ppo.PPOTrainer imports; its trainer package has GRPO and RLOO, not PPO)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", type=Path)
    ap.add_argument("--rm-helpful", type=Path)
    ap.add_argument("--rm-safety", type=Path)
    ap.add_argument("--prompts", type=Path)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16, help="prompts per PPO iteration = rows decoded together")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from llamactl.chat_data import read_prompts
    from llamactl.generation import generate, load_for_generation, sequence_seed
    from llamactl.parallel.context import ParallelContext
    from llamactl.stages import ppo as stage

    work = Path(tempfile.mkdtemp(prefix="ppo-bench-"))
    if args.policy is None:
        pol, rmh, rms, prompts_file = make_inputs(work, args.dim, args.layers)
    else:
        pol, rmh, rms, prompts_file = args.policy, args.rm_helpful, args.rm_safety, args.prompts
    flags = dict(policy=str(pol), rm_helpful=str(rmh), rm_safety=str(rms), prompts=str(prompts_file),
                 out=str(work / "run"), iterations=args.rounds + 1, batch_size=args.batch,
                 minibatch=max(1, args.batch // 4), micro_batch=max(1, args.batch // 4), max_new_tokens=args.new_tokens,
                 lr=1e-5, temperature=1.0)
    plan = stage.resolve(flags)
    c = plan.cfg
    ctx = ParallelContext.single()
    m = stage.load_models(plan, ctx, "cpu")
    trainers = stage.make_trainers(m, plan)
    items = list(read_prompts(Path(c.prompts)))
    prompts = stage.encode_prompts(m.tok, items, plan.model.max_seq_len, c.max_new_tokens, "--prompts")
    order = stage.PromptOrder(len(prompts), c.seed)
    gen_model, gen_tok = load_for_generation(pol, "cpu")  # `llamactl generate`'s path: checkpoint -> decode layout

    def ppo_round(it: int) -> dict:
        rows = order.take(c.batch_size)
        return stage.iteration(m, trainers, items, prompts, rows, it, c) | {"rows": rows}

    def generate_round(rows: list[int], it: int) -> tuple[float, int]:
        seeds = [sequence_seed(c.seed, it * c.batch_size + k) for k in range(len(rows))]
        t = time.perf_counter()
        out = generate(gen_model, [prompts[i] for i in rows], max_new_tokens=c.max_new_tokens,
                       temperature=c.temperature, seeds=seeds, eos_id=gen_tok.eos_id)
        dt = time.perf_counter() - t
        return dt, sum(len(s.tokens) for s in out)

    ppo_round(0)  # warm-up: allocator, oneDNN packing, the first optimizer state
    generate_round(order.order()[:c.batch_size].tolist(), 0)
    ratios, ours, peer, iters = [], [], [], []
    for r in range(1, args.rounds + 1):
        first_gen = r % 2 == 0
        if first_gen:
            rows = order.order()[order.position:order.position + c.batch_size].tolist()
            if len(rows) < c.batch_size:
                rows = order.order()[:c.batch_size].tolist()
            dt, n = generate_round(rows, r)
            row = ppo_round(r)
        else:
            row = ppo_round(r)
            dt, n = generate_round(row["rows"], r)
        tps_gen = n / dt
        tps_ppo = row["rollout_tokens_per_s"]
        ours.append(tps_ppo)
        peer.append(tps_gen)
        ratios.append(tps_ppo / tps_gen)
        iters.append(row["time_generate"] + row["time_score"] + row["time_train"])
        print(f"round {r}: PPO rollout {tps_ppo:.1f} tok/s ({row['rollout_tokens']} tokens), generate alone "
              f"{tps_gen:.1f} tok/s ({n} tokens), ratio {tps_ppo / tps_gen:.2f}; iteration {iters[-1]:.2f} s "
              f"(generate {row['time_generate']:.2f}, score {row['time_score']:.2f}, train {row['time_train']:.2f})",
              flush=True)
    ratio = statistics.median(ratios)
    cls, trl_note = trl_ppo_status()
    print(f"TRL PPO: {trl_note}" + ("" if cls is None else " (comparison not implemented for this API version)"))
    print(f"PPO rollout tokens/s: {ratio:.2f}x llamactl generate ({statistics.median(ours):.1f} vs "
          f"{statistics.median(peer):.1f} tok/s, batch {c.batch_size}, {c.max_new_tokens} new tokens, "
          f"dim {plan.model.dim} x {plan.model.n_layers} layers, {args.threads} thread(s), median of {args.rounds} "
          f"rounds; PPO iteration {statistics.median(iters):.2f} s; TRL PPO not run: {trl_note})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
