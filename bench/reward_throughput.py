"""Reward-model training throughput: llamactl vs TRL's RewardTrainer, pairs per second.

Same weights (llamactl's reward checkpoint loaded by transformers as LlamaForSequenceClassification), same
pairs in the same order and batches (chosen rows then rejected rows, right-padded to the batch's longest,
as TRL's DataCollatorForPreference does), same loss -log sigma(r_c - r_r - margin), fp32, AdamW (0.9,
0.95, 1e-5, wd 0.1), clip 1.0, constant lr. llamactl steps through `Trainer.step` (what `rm train` runs);
TRL steps as its Trainer's inner loop does: `RewardTrainer.training_step` (its compute_loss + backward),
clip_grad_norm_, optimizer and scheduler step, zero_grad. Both are timed alternately in one process, one
step at a time, warm-up steps excluded; the ratio is the median of the per-round ratios (the cores are
shared, so single timings are noisy).

Needs the bench extra: pip install -e '.[bench]' (trl), keeping the CPU torch build.

    python bench/reward_throughput.py [--rounds 6] [--steps 2] [--pairs 16] [--min-len 48] [--max-len 160]
                                      [--clock cpu]   (CPU seconds of one thread: for a shared machine)
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def make_pairs(n: int, vocab: int, lo: int, hi: int, seed: int = 0):
    from llamactl.stages.reward import EncodedPair

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        lc, lr = (int(x) for x in torch.randint(lo, hi + 1, (2,), generator=g))
        out.append(EncodedPair(torch.randint(3, vocab, (lc,), generator=g).tolist(),
                               torch.randint(3, vocab, (lr,), generator=g).tolist(), [1.0, 2 / 3, 1 / 3, 0.0][i % 4], i % 4))
    return out


def llamactl_side(model, batches):
    from llamactl.parallel.context import ParallelContext
    from llamactl.stages.reward import RewardBatch, reward_loss
    from llamactl.trainer import TrainConfig, Trainer

    trainer = Trainer(model, ParallelContext.single(), TrainConfig(steps=10**9, lr=1e-5, schedule="constant"),
                      reward_loss)
    micro = [[RewardBatch.from_pairs(b)] for b in batches]
    i = [0]

    def step():
        out = trainer.step(micro[i[0] % len(micro)])
        i[0] += 1
        return out.loss

    return step


def trl_side(ckpt: Path, batches, vocab: int, out_dir: str):
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import LlamaForSequenceClassification, PreTrainedTokenizerFast
    from trl import RewardConfig, RewardTrainer

    model = LlamaForSequenceClassification.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa")
    vocab_map = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab_map, unk_token="<unk>")),
                                  unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>")
    flat = [p for b in batches for p in b]
    ds = Dataset.from_dict({"chosen_ids": [p.chosen for p in flat], "rejected_ids": [p.rejected for p in flat],
                            "margin": [p.margin for p in flat]})
    args = RewardConfig(output_dir=out_dir, per_device_train_batch_size=len(batches[0]), learning_rate=1e-5,
                        lr_scheduler_type="constant", adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-5,
                        weight_decay=0.1, max_grad_norm=1.0, report_to=[], use_cpu=True, max_length=None,
                        pad_token="<unk>", logging_steps=10**9, save_strategy="no", seed=0)
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets before its steps
    collate = trainer.data_collator
    inputs = [collate([{"chosen_ids": p.chosen, "rejected_ids": p.rejected, "margin": p.margin} for p in b])
              for b in batches]
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    i = [0]

    def step():
        loss = trainer.training_step(model, dict(inputs[i[0] % len(inputs)]))
        i[0] += 1
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad(set_to_none=True)
        return float(loss)

    return step


def timed(step, n: int, clock=time.perf_counter) -> float:
    t0 = clock()
    for _ in range(n):
        step()
    return clock() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=2, help="steps per side per round")
    ap.add_argument("--pairs", type=int, default=16, help="pairs per batch")
    ap.add_argument("--min-len", type=int, default=48)
    ap.add_argument("--max-len", type=int, default=160)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: this process's CPU seconds (one thread), for machines other jobs share")
    a = ap.parse_args()
    if a.clock == "cpu":
        a.threads = 1  # CPU time of one thread is the work done, whatever else runs on the cores
    if a.threads:
        torch.set_num_threads(a.threads)
    clock = time.process_time if a.clock == "cpu" else time.perf_counter

    from llamactl import checkpoint
    from llamactl.config import preset
    from llamactl.model import build_model

    cfg = preset(a.size, max_seq_len=max(512, a.max_len))
    pairs = make_pairs(a.pairs * 4, cfg.vocab_size, a.min_len, a.max_len)
    batches = [pairs[i:i + a.pairs] for i in range(0, len(pairs), a.pairs)]
    model = build_model(cfg, head="reward", seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint.save(Path(tmp) / "rm", model, stage="bench")  # fp32, an HF directory
        ours = llamactl_side(model, batches)
        theirs = trl_side(ckpt, batches, cfg.vocab_size, str(Path(tmp) / "trl"))
        l0, t0 = ours(), theirs()  # warm-up (first step: same weights, same batch -> same loss)
        print(f"first-step loss: llamactl {l0:.6f}, trl {t0:.6f}")
        ours(), theirs()
        ratios, ps_ours, ps_theirs = [], [], []
        for r in range(a.rounds):
            dt_o = timed(ours, a.steps, clock)
            dt_t = timed(theirs, a.steps, clock)
            po, pt = a.steps * a.pairs / dt_o, a.steps * a.pairs / dt_t
            ps_ours.append(po)
            ps_theirs.append(pt)
            ratios.append(po / pt)
            print(f"round {r + 1}: llamactl {po:.1f} pairs/s, trl {pt:.1f} pairs/s, ratio {po / pt:.2f}")
    mo, mt = statistics.median(ps_ours), statistics.median(ps_theirs)
    print(f"rm pairs/s: {statistics.median(ratios):.2f}x trl ({mo:.1f} vs {mt:.1f} pairs/s, {a.size} "
          f"{model.cfg.num_params() / 1e6:.1f}M params, {a.pairs} pairs/batch, responses {a.min_len}-{a.max_len} "
          f"tokens, fp32, {torch.get_num_threads()} threads, {a.clock} clock, median of {a.rounds} rounds)")


if __name__ == "__main__":
    main()
