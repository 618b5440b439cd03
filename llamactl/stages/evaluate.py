"""`llamactl eval`: mean next-token loss and perplexity of a checkpoint on held-out tokens."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llamactl.errors import LlamactlError


@dataclass
class EvalResult:
    loss: float          # nats per token
    perplexity: float
    tokens: int          # target tokens scored
    split: str
    seq_len: int


@torch.no_grad()
def evaluate_model(model, ctx, data, *, seq_len: int, batch_size: int = 8, max_tokens: int | None = None,
                   show_progress: bool = False) -> EvalResult:
    """Score every non-overlapping window of `data` (a TokenData) in order, up to max_tokens targets."""
    from llamactl.data import Batch, eval_windows
    from llamactl.parallel.pipeline import forward_only, lm_output_loss
    from llamactl.ui import progress

    if batch_size < 1 or seq_len < 1 or (max_tokens is not None and max_tokens < 1):
        raise LlamactlError(f"batch size, window length and token budget must be >= 1, got {batch_size}, {seq_len}, "
                            f"{max_tokens} (--batch-size, --seq-len, --max-tokens)")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    windows = list(eval_windows(data, seq_len, max_tokens)) if data.num_tokens > seq_len else []
    if not windows:
        raise LlamactlError(f"{data.split} split has {data.num_tokens} tokens, fewer than one window of "
                            f"{seq_len + 1} ({data.dir}); lower --seq-len")
    total, count = 0.0, 0
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    loss_fn = lm_output_loss(ctx, head=model.output)  # the training loss: the fused head on the last stage
    with progress(disable=not show_progress) as bar:
        task = bar.add_task("eval", total=len(windows))
        for i in range(0, len(windows), batch_size):
            b = Batch.from_windows(np.stack(windows[i:i + batch_size])).to(device)
            # forwards through the pipeline (one stage at pp 1); the last stage scores, every stage gets the
            # sum; every dp replica scores the same windows, so forward_only's dp sum counts them dp times
            total += forward_only(model, [b], ctx, loss_fn, autocast=amp).loss / ctx.dp
            count += b.num_valid
            bar.advance(task, min(batch_size, len(windows) - i))
    model.train(was_training)
    loss = total / count
    return EvalResult(loss, math.exp(min(loss, 700.0)), count, data.split, seq_len)


def resolve_checkpoint(path: Path) -> Path:
    from llamactl import checkpoint

    return checkpoint.resolve(path)


def run_eval(model_dir: Path, data_dir: Path, *, split: str = "val", seq_len: int | None = None,
             batch_size: int = 8, max_tokens: int | None = None, device: str = "cpu") -> EvalResult:
    """Load a checkpoint, check the data was made with its tokenizer, score the split."""
    from llamactl import checkpoint
    from llamactl.data import TokenData, check_tokenizer, sha256_file

    model_dir = resolve_checkpoint(Path(model_dir))
    data = TokenData(data_dir, split)
    model, meta = checkpoint.load_model(model_dir, device=device, flag="--model")  # verifies each file once
    tok = checkpoint.tokenizer_path(model_dir)
    tok_sha = meta.get("files", {}).get(checkpoint.TOKENIZER_FILE, {}).get("sha256")  # verified by the load
    check_tokenizer(data.index, Path(data_dir), model.cfg.vocab_size, tok_sha or sha256_file(tok))
    seq_len = seq_len or min(model.cfg.max_seq_len, int(meta.get("extra", {}).get("seq_len", 0) or model.cfg.max_seq_len))
    return evaluate_model(model, model.ctx, data, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens,
                          show_progress=True)
