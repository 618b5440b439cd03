"""SFT throughput: llamactl's SFT step against TRL's SFTTrainer on the same model, data and batch.

Both sides start from the same weights: a llamactl model (a preset, its vocabulary set to the tokenizer's)
is saved as a checkpoint, which is also a Hugging Face Llama directory, and transformers loads it as
LlamaForCausalLM (fp32, sdpa attention). The data are the task suite's SFT dialogues (`llamactl data
tasks`) in the Llama 2-Chat format, packed by llamactl into rows of --seq-len tokens with the loss on answer
tokens only; TRL gets exactly those rows, pre-tokenized, with the prompt tokens' labels set to -100
(so its own preprocessing, packing and padding have nothing left to change). Same global batch
(--micro-batch rows x --accum), fp32, AdamW (0.9, 0.95, 1e-5), weight decay 0.1, clip 1.0, cosine lr.

TRL runs its real training loop (`SFTTrainer.train()`: its collator, its compute_loss with the token
accuracy / entropy metrics it logs, accelerate's backward and clipping, the optimizer and scheduler). The
two sides alternate step by step in one process: a TrainerCallback times each TRL optimizer step (from
on_step_begin to on_step_end) and then runs and times one llamactl `Trainer.step` (what `llamactl sft`'s
loop runs) on the same micro-batches. Warm-up steps are excluded; the ratio is the median of per-round
ratios (other processes share the cores). Batches are built outside the timed region on both sides.

    python bench/sft_throughput.py [--size tiny] [--dim D] [--layers L] [--seq-len 256] [--micro-batch 8] [--accum 2] [--rounds 6]

TRL is a bench-only extra (pip install -e '.[bench]'); without it the script says so and exits 2.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def make_data(work: Path, suite: Path | None, tokenizer: Path | None, vocab: int) -> tuple[Path, Path]:
    """(SFT JSONL, tokenizer.model): given, or a fresh task suite and a tokenizer trained on its pretraining text."""
    if suite is None:
        from llamactl.tasks import SuiteConfig, write_suite

        suite = work / "suite"
        write_suite(suite, config=SuiteConfig())
    if tokenizer is None:
        from llamactl.tokenizer import train_tokenizer

        tokenizer = train_tokenizer([suite / "pretrain.txt"], work / "tok", vocab_size=vocab)
    elif tokenizer.is_dir():
        tokenizer = tokenizer / "tokenizer.model"
    return suite / "sft.train.jsonl", tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="tiny", help="llamactl preset (vocabulary set to the tokenizer's)")
    ap.add_argument("--dim", type=int, help="override the preset's width (heads of 64)")
    ap.add_argument("--layers", type=int, help="override the preset's depth")
    ap.add_argument("--suite", type=Path, help="task suite dir (default: generated)")
    ap.add_argument("--tokenizer", type=Path, help="tokenizer.model (default: trained on the suite, --vocab)")
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=3, help="steps per round per side")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    try:
        import datasets  # noqa: F401
        import trl
        from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    except ImportError as e:
        print(f"sft tokens/s: not measured: TRL is not installed ({e}); pip install -e '.[bench]'")
        raise SystemExit(2)
    torch.set_num_threads(a.threads)
    from datasets import Dataset
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel
    from trl import SFTConfig, SFTTrainer

    from llamactl import checkpoint
    from llamactl.config import preset
    from llamactl.data import IGNORE
    from llamactl.model import build_model
    from llamactl.parallel.context import ParallelContext
    from llamactl.sft_data import SFTBatches
    from llamactl.stages.sft import encode_file
    from llamactl.tokenizer import Tokenizer
    from llamactl.trainer import TrainConfig, Trainer

    work = Path(tempfile.mkdtemp(prefix="sft-bench-"))
    data, tok_path = make_data(work, a.suite, a.tokenizer, a.vocab)
    tok = Tokenizer.load(tok_path)
    shape = {"vocab_size": tok.vocab_size}
    if a.dim:
        shape.update(dim=a.dim, n_heads=a.dim // 64, n_kv_heads=a.dim // 64)
    if a.layers:
        shape["n_layers"] = a.layers
    cfg = preset(a.size, **shape)
    if a.seq_len > cfg.max_seq_len:
        raise SystemExit(f"--seq-len {a.seq_len} is longer than the {a.size} model's context {cfg.max_seq_len}")
    samples = encode_file(data, tok, "--suite")
    src = SFTBatches(samples, a.seq_len, pad_id=tok.eos_id, micro_batch=a.micro_batch, accum=a.accum)
    steps = [src.next_step() for _ in range(a.warmup + a.rounds * a.steps)]  # llamactl's micro-batches

    # the same rows in the same order for TRL: inputs, and labels = the input token where it is the target of an
    # answer token (HF shifts labels by one inside the model, so a row's last target is the one it drops)
    ids = torch.cat([b.tokens for step in steps for b in step])
    mask = torch.cat([b.loss_mask for step in steps for b in step])
    labels = torch.full_like(ids, IGNORE)
    labels[:, 1:] = torch.where(mask[:, :-1], ids[:, 1:], IGNORE)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})

    ctx = ParallelContext.single()
    model = build_model(cfg, ctx, seed=0)
    ckpt = checkpoint.save(work / "init", model, tokenizer=tok_path, stage="bench", dtype=torch.float32)
    trainer = Trainer(model, ctx, TrainConfig(steps=len(steps), lr=2e-5, weight_decay=0.1, clip=1.0))
    hf = LlamaForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32, attn_implementation="sdpa")
    vocab = {f"<t{i}>": i for i in range(tok.vocab_size)}
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=HFTokenizer(WordLevel(vocab, unk_token="<t0>")),
                                     unk_token="<t0>", bos_token=f"<t{tok.bos_id}>", eos_token=f"<t{tok.eos_id}>",
                                     pad_token=f"<t{tok.eos_id}>")

    times = {"llamactl": [], "trl": []}
    losses = {"llamactl": [], "trl": []}

    class Alternate(TrainerCallback):
        """Time TRL's optimizer step, then run and time one llamactl step on the same batch."""

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times["trl"].append(time.perf_counter() - self.t0)
            i = len(times["llamactl"])
            t0 = time.perf_counter()
            out = trainer.step(steps[i])
            times["llamactl"].append(time.perf_counter() - t0)
            losses["llamactl"].append(out.loss)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses["trl"].append(logs["loss"])

    targs = SFTConfig(output_dir=str(work / "trl"), max_steps=len(steps), per_device_train_batch_size=a.micro_batch,
                      gradient_accumulation_steps=a.accum, learning_rate=2e-5, lr_scheduler_type="cosine",
                      weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-5, max_grad_norm=1.0,
                      optim="adamw_torch_fused", max_length=a.seq_len, packing=False, use_cpu=True, bf16=False,
                      fp16=False, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                      dataloader_num_workers=0, seed=0, shuffle_dataset=False)
    class InOrder(SFTTrainer):
        """TRL's trainer reading the rows in llamactl's order (it would shuffle them): the same batch per step."""

        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    sft = InOrder(model=hf, args=targs, train_dataset=dataset, processing_class=hf_tok, callbacks=[Alternate()])
    sft.train()

    tokens = a.micro_batch * a.accum * a.seq_len
    ratios = []
    for r in range(a.rounds):
        lo = a.warmup + r * a.steps
        ours = sum(times["llamactl"][lo:lo + a.steps]) / a.steps
        theirs = sum(times["trl"][lo:lo + a.steps]) / a.steps
        ratios.append(theirs / ours)
        print(f"round {r}: llamactl {tokens / ours:,.0f} tok/s, TRL {tokens / theirs:,.0f} tok/s, ratio {ratios[-1]:.3f}",
              flush=True)
    tps = {k: tokens / statistics.median(v[a.warmup:]) for k, v in times.items()}
    n = sum(p.numel() for p in model.parameters())
    print(f"config: {a.size}{' dim ' + str(cfg.dim) if a.dim else ''} ({n:,} params, vocab {cfg.vocab_size}), {len(samples):,} task-suite dialogues packed into "
          f"rows of {a.seq_len}, batch {a.micro_batch}x{a.accum} rows, fp32, {a.threads} threads, TRL {trl.__version__}")
    print(f"first-step loss on answer tokens: llamactl {losses['llamactl'][0]:.4f}, TRL {losses['trl'][0]:.4f} (the same "
          f"rows; HF's label shift drops each row's last target)")
    print(f"sft tokens/s: {statistics.median(ratios):.2f}x trl ({tps['llamactl']:,.0f} vs {tps['trl']:,.0f} tok/s, "
          f"median of {a.rounds} rounds of {a.steps} steps)")


if __name__ == "__main__":
    sys.exit(main())
