"""The `small` training step with the fused kernels vs the reference, alternately in one process.

    python bench/kernels_train_step.py [--batch 4] [--seq 256] [--steps 5] [--malloc-tune]

Two identical models (build_model(preset("small"), seed=0)) with their own AdamW, the loss the trainer
uses (lm head fused into the cross-entropy); each timed step switches LLAMACTL_KERNELS between `auto`
(fused) and `reference`. Ends with
`small train step: <ratio>x reference (<details>)`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from llamactl.config import preset
from llamactl.kernels import dispatch
from llamactl.kernels.bench import tune_malloc
from llamactl.model import build_model
from llamactl.parallel.context import ParallelContext
from llamactl.parallel.head_loss import lm_head_cross_entropy
from llamactl.ui import console, progress, table


CTX = ParallelContext.single()


def _step(model, opt, x, y, mode: str) -> float:
    os.environ["LLAMACTL_KERNELS"] = mode
    dispatch.reset()
    t0 = time.perf_counter()
    loss = lm_head_cross_entropy(model(x, return_hidden=True), model.output, y, CTX, reduction="mean")
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode (after one warm-up step each)")
    p.add_argument("--malloc-tune", action="store_true", help="keep freed memory in glibc's heap (see kernels/bench.py)")
    a = p.parse_args()
    tuned = a.malloc_tune and tune_malloc()
    cfg = preset("small")
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (a.batch, a.seq + 1), generator=g)
    x, y = data[:, :-1], data[:, 1:]
    runs = {}
    for mode in ("auto", "reference"):
        model = build_model(cfg, seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
        runs[mode] = (model, opt)
    os.environ.pop("LLAMACTL_KERNELS", None)
    assert dispatch.backend("cpu").fused, "the fused CPU backend did not build"
    times = {m: [] for m in runs}
    with progress() as bar:
        task = bar.add_task("train steps", total=2 * (a.steps + 1))
        for i in range(a.steps + 1):
            for mode, (model, opt) in runs.items():
                dt = _step(model, opt, x, y, mode)
                if i > 0:
                    times[mode].append(dt)
                bar.advance(task)
    os.environ.pop("LLAMACTL_KERNELS", None)
    dispatch.reset()
    med = {m: statistics.median(v) for m, v in times.items()}
    tok = a.batch * a.seq
    rows = [[("fused (" + dispatch.backend("cpu").name + ")") if m == "auto" else m, f"{med[m]:.3f}",
             f"{tok / med[m]:,.0f}", " ".join(f"{t:.2f}" for t in times[m])] for m in runs]
    console.print(table(f"small train step, batch {a.batch} x seq {a.seq}, {torch.get_num_threads()} threads"
                        + (", glibc malloc tuned" if tuned else ""), ["kernels", "s/step (median)", "tokens/s", "all steps (s)"], rows))
    console.print(f"small train step: {med['reference'] / med['auto']:.3f}x reference (fused {med['auto']:.3f} vs "
                  f"{med['reference']:.3f} s/step, {tok / med['auto']:,.0f} vs {tok / med['reference']:,.0f} tokens/s, "
                  f"batch {a.batch} x seq {a.seq}, cpu {torch.get_num_threads()} threads)", highlight=False, soft_wrap=True)


if __name__ == "__main__":
    main()
