"""Training throughput: llamactl vs Hugging Face LlamaForCausalLM on the same `small` config.

Same shapes (~60M parameters, vocab 32000), same batch, fp32, same AdamW (0.9, 0.95, 1e-5, wd 0.1 on
matrices, fused kernel for both), clip 1.0. Each side steps as its users do: llamactl runs `Trainer.step`,
what trainer.fit runs (forward + backward through the one pipeline step, the gradient norm, then the clip
coefficient folded into the fused AdamW step as its grad_scale, schedule and counters), transformers runs
backward, clip_grad_norm_ (a pass scaling every gradient in place) then the step, as its Trainer does. The two are timed alternately in one process, one step at a time, many rounds, warm-up
steps excluded; the ratio reported is the median of the per-round ratios (other processes share the
cores, so single timings are noisy). MFU is against the measured fp32 matmul peak.

    python bench/train_throughput.py [--rounds 6] [--steps 3] [--micro-batch 4] [--seq-len 256] [--compile]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def hf_clip_step(params, opt) -> None:
    """What a transformers user (and its Trainer) runs: clip_grad_norm_ scales the gradients, then the step."""
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
    opt.step()


def update(loss, params, opt, clip_step) -> float:
    """transformers' side after its forward: backward, clip 1.0 + AdamW, drop the grads."""
    loss.backward()
    clip_step(params, opt)
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def llamactl_step_factory(cfg, batch, compile_: bool):
    from llamactl.data import Batch
    from llamactl.model import build_model
    from llamactl.parallel.context import ParallelContext
    from llamactl.trainer import TrainConfig, Trainer

    ctx = ParallelContext.single()
    model = build_model(cfg, ctx, seed=0)
    # the lm head fused into the loss (trainer.lm_loss), clip 1.0, AdamW (0.9, 0.95, 1e-5), wd 0.1
    trainer = Trainer(model, ctx, TrainConfig(steps=10**9, lr=1e-4, schedule="constant", compile=compile_))
    micro = [Batch.from_windows(batch.numpy())]

    def step():
        return trainer.step(micro).loss

    return step, sum(p.numel() for p in model.parameters())


def hf_step_factory(cfg, batch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamactl.optim import make_adamw, param_groups
    from llamactl.trainer import TrainConfig

    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_seq_len,
                         rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
                         attention_bias=False, mlp_bias=False, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_cfg).float()
    model.train()
    opt = make_adamw(param_groups(model, 0.1), TrainConfig(lr=1e-4))
    x = batch[:, :-1].contiguous()
    labels = batch[:, 1:].contiguous()
    params = list(model.parameters())

    def step():
        # labels already shifted: pass logits' loss exactly as HF computes it (fp32 cross-entropy)
        logits = model(input_ids=x, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1))
        return update(loss, params, opt, hf_clip_step)

    return step, sum(p.numel() for p in params)


def timed(step, n: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per step: CPU time is far less sensitive to other processes
    taking the cores, wall time is what a user waits for; both are reported."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


def cpu_time_peak(n: int = 1536, reps: int = 6) -> float:
    """sgemm FLOPs per process CPU-second (best of reps): the peak in the unit CPU-time MFU uses."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        c0 = time.process_time()
        torch.mm(a, b)
        best = min(best, time.process_time() - c0)
    return 2.0 * n**3 / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=3, help="steps per round per side")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="torch.compile the llamactl model")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from llamactl.config import preset
    from llamactl.flops import measure_peak_flops, model_flops_per_token

    cfg = preset("small")
    batch = torch.randint(0, cfg.vocab_size, (a.micro_batch, a.seq_len + 1), generator=torch.Generator().manual_seed(0))
    ours, n_ours = llamactl_step_factory(cfg, batch, a.compile)
    theirs, n_theirs = hf_step_factory(cfg, batch)
    assert n_ours == n_theirs == cfg.num_params(), (n_ours, n_theirs, cfg.num_params())
    for _ in range(a.warmup):
        ours(), theirs()
    tokens = a.micro_batch * a.seq_len
    t_ours, t_theirs, ratios, cpu_ratios, c_ours, c_theirs, peaks = [], [], [], [], [], [], []
    for r in range(a.rounds):
        # one step of each side in turn (order flipped every round): slow drifts of the shared machine
        # hit both sides alike
        pair = [("ours", ours), ("theirs", theirs)] if r % 2 == 0 else [("theirs", theirs), ("ours", ours)]
        res = {"ours": [0.0, 0.0], "theirs": [0.0, 0.0]}
        peaks.append(measure_peak_flops("cpu", seconds=0.3))  # best of all rounds: neighbours only slow it
        for _ in range(a.steps):
            for name, fn in pair:
                wall, cpu = timed(fn, 1)
                res[name][0] += wall / a.steps
                res[name][1] += cpu / a.steps
        t_ours.append(res["ours"][0])
        t_theirs.append(res["theirs"][0])
        ratios.append(res["theirs"][0] / res["ours"][0])
        cpu_ratios.append(res["theirs"][1] / res["ours"][1])
        c_ours.append(res["ours"][1])
        c_theirs.append(res["theirs"][1])
        print(f"round {r}: llamactl {tokens / res['ours'][0]:,.0f} tok/s, transformers {tokens / res['theirs'][0]:,.0f} "
              f"tok/s, ratio {ratios[-1]:.3f} (CPU-time ratio {cpu_ratios[-1]:.3f})", flush=True)
    peak = max(peaks + [measure_peak_flops("cpu", seconds=2.0)])
    cpu_peak = cpu_time_peak()
    fpt = model_flops_per_token(cfg, a.seq_len)
    tps_ours = tokens / statistics.median(t_ours)
    tps_theirs = tokens / statistics.median(t_theirs)
    mfu_ours, mfu_theirs = tps_ours * fpt / peak, tps_theirs * fpt / peak
    cpu_mfu = {k: tokens * fpt / statistics.median(v) / cpu_peak for k, v in (("ours", c_ours), ("theirs", c_theirs))}
    print(f"config: small ({cfg.num_params():,} params), batch {a.micro_batch}x{a.seq_len}, fp32, "
          f"{a.threads} threads, compile={a.compile}")
    print(f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s; {fpt / 1e6:.1f} MFLOP/token")
    print(f"llamactl     {tps_ours:8,.0f} tok/s  MFU {100 * mfu_ours:.1f} %")
    print(f"transformers {tps_theirs:8,.0f} tok/s  MFU {100 * mfu_theirs:.1f} %")
    ratio = statistics.median(ratios)
    print(f"fp32 matmul peak per CPU-second {cpu_peak / 1e9:.1f} GFLOP; MFU by CPU time: llamactl "
          f"{100 * cpu_mfu['ours']:.1f} %, transformers {100 * cpu_mfu['theirs']:.1f} %")
    print(f"median CPU-time ratio {statistics.median(cpu_ratios):.3f} (robust to other processes on the cores)")
    print(f"train tokens/s: {ratio:.2f}x transformers ({tps_ours:,.0f} vs {tps_theirs:,.0f}, "
          f"MFU {100 * mfu_ours:.0f} % vs {100 * mfu_theirs:.0f} %, median of {a.rounds} rounds)")


if __name__ == "__main__":
    main()
