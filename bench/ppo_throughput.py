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

TRL: its PPO trainer is compared only if an installed TRL exposes one (trl.PPOTrainer or
trl.experimental.ppo); the script says which version it found and why it did not run otherwise. TRL 1.x
has no PPO trainer; TRL 0.20 has one (with transformers 4.55), installed beside the bench's own packages:

    pip install --no-deps --target /tmp/trl020 trl==0.20.0 transformers==4.55.4 tokenizers==0.21.4 \
        huggingface_hub==0.34.4 datasets==3.6.0 requests urllib3 idna certifi charset_normalizer
    python bench/ppo_throughput.py --trl-path /tmp/trl020

TRL's PPOTrainer then trains the same policy checkpoint (as LlamaForCausalLM) with the helpfulness RM as
reward and value model (LlamaForSequenceClassification; TRL takes one reward model, llamactl scores with
both), on the same prompt token ids, batch, minibatch, one PPO epoch, --new-tokens at T 1 with EOS, fp32,
the same threads; its iteration time is the median gap between its per-update log calls (generation,
scoring and the minibatch steps), after one warm-up update. llamactl's is generation + scoring + training
of `stages.ppo.iteration`.

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
                  f"trl.experimental.ppo.PPOTrainer imports; its trainer package has GRPO and RLOO, not PPO; "
                  f"--trl-path takes TRL 0.20, see this script's doc)")


def trl_ppo_iteration_seconds(cls, pol: Path, rm: Path, prompts: list[list[int]], *, batch: int, minibatch: int,
                              micro: int, new_tokens: int, beta: float, updates: int, out_dir: str) -> list[float]:
    """Seconds per PPO update of TRL's PPOTrainer (0.20 API) on the same checkpoints and prompt ids."""
    import trl
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import (LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast,
                              TrainerCallback)

    def load(kind, path):
        return kind.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="sdpa")

    policy, ref = load(LlamaForCausalLM, pol), load(LlamaForCausalLM, pol)
    reward = load(LlamaForSequenceClassification, rm)
    value = load(LlamaForSequenceClassification, rm)
    vocab = policy.config.vocab_size
    vocab_map = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab_map, unk_token="<unk>")),
                                  unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>",
                                  padding_side="left")
    for m in (policy, ref, reward, value):
        m.config.pad_token_id = tok.pad_token_id
    rows = [prompts[i % len(prompts)] for i in range(batch * updates)]
    ds = Dataset.from_dict({"input_ids": rows})
    args = trl.PPOConfig(output_dir=out_dir, per_device_train_batch_size=micro, gradient_accumulation_steps=batch // micro,
                         num_mini_batches=batch // minibatch, num_ppo_epochs=1, total_episodes=batch * updates,
                         response_length=new_tokens, stop_token="eos", temperature=1.0, learning_rate=1e-5,
                         kl_coef=beta, cliprange=0.2, cliprange_value=0.2, gamma=1.0, lam=0.95,
                         local_rollout_forward_batch_size=batch, num_sample_generations=0, report_to=[],
                         use_cpu=True, logging_steps=1, save_strategy="no", seed=0, bf16=False, fp16=False,
                         adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-5, weight_decay=0.1, max_grad_norm=1.0,
                         lr_scheduler_type="constant", disable_tqdm=True)
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_log(self, *a, **k):
            stamps.append(time.perf_counter())

    trainer = cls(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                  value_model=value, train_dataset=ds, callbacks=[Clock()])
    start = time.perf_counter()
    trainer.train()
    marks = [start] + [t for t in stamps]
    return [b - a for a, b in zip(marks, marks[1:])][1:]  # the first update is the warm-up


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
    ap.add_argument("--trl-path", type=Path, help="a directory with TRL 0.20 and transformers 4.55 (see the doc)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.trl_path is not None:
        sys.path.insert(0, str(args.trl_path))

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
    print(f"TRL PPO: {trl_note}", flush=True)
    trl_line = f"TRL PPO not run: {trl_note}"
    if cls is not None:
        from llamactl import checkpoint

        trl_iters = trl_ppo_iteration_seconds(cls, checkpoint.resolve(pol), checkpoint.resolve(rmh), prompts,
                                              batch=c.batch_size, minibatch=c.minibatch, micro=c.micro_batch,
                                              new_tokens=c.max_new_tokens, beta=c.beta, updates=args.rounds + 1,
                                              out_dir=str(work / "trl"))
        print(f"TRL PPO iterations (s): {', '.join(f'{t:.2f}' for t in trl_iters)}")
        trl_line = (f"TRL PPOTrainer iteration {statistics.median(trl_iters):.2f} s: llamactl is "
                    f"{statistics.median(trl_iters) / statistics.median(iters):.2f}x faster per iteration ({trl_note})")
    print(f"PPO rollout tokens/s: {ratio:.2f}x llamactl generate ({statistics.median(ours):.1f} vs "
          f"{statistics.median(peer):.1f} tok/s, batch {c.batch_size}, {c.max_new_tokens} new tokens, "
          f"dim {plan.model.dim} x {plan.model.n_layers} layers, {args.threads} thread(s), median of {args.rounds} "
          f"rounds; PPO iteration {statistics.median(iters):.2f} s; {trl_line})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
