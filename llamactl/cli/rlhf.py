"""`llamactl rlhf ...`: rejection sampling, PPO and model-based comparison of two checkpoints."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from llamactl.cli.app import SIZES, StageOptions, rlhf_app, stage_command
from llamactl.ui import console, table


# ---- rlhf rs (rejection sampling) ----
@rlhf_app.command("rs")
@stage_command("rs", "sft", "parallel")
def rlhf_rs(
    policy: Optional[Path] = typer.Option(None, "--policy", help="Current policy: a chat checkpoint (or run dir: its latest)."),
    rm_helpful: Optional[Path] = typer.Option(None, "--rm-helpful", help="Helpfulness reward model (checkpoint or run dir; kind helpfulness)."),
    rm_safety: Optional[Path] = typer.Option(None, "--rm-safety", help="Safety reward model (checkpoint or run dir; kind safety)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help='Prompt JSONL: {"prompt"|"messages", "safety"?: bool, ...}; safety-tagged prompts are rewarded by the safety RM alone.'),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory: samples.json, sft_data.jsonl, rs.json, PNGs, sft/ (default runs/rs)."),
    pool: Optional[Path] = typer.Option(None, "--pool", help="Pool directory: the best answer per prompt across all iterations so far (default RUN/pool; share it between iterations)."),
    k: Optional[int] = typer.Option(None, "--k", help="Samples per prompt at each temperature (default 10; the paper plots N up to 100)."),
    temperature: Optional[str] = typer.Option(None, "--temperature", help="Sampling temperature, or several as a comma list (K samples at each, Figure 8; 0 adds the greedy answer as a candidate); default 1.0."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling mass (default 1.0)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Most tokens per answer (default 48)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the samples (each has its own generator) and of the SFT data order."),
    iteration: Optional[int] = typer.Option(None, "--iteration", help="Iteration number recorded in the pool (default: the next after the pool's)."),
    gen_batch: Optional[int] = typer.Option(None, "--gen-batch", help="Sequences decoded and scored together (default 64)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="SFT peak learning rate (default 2e-5)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="SFT passes over the pool (default 2)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="SFT optimizer steps (overrides --epochs)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="SFT packed rows per step over all dp ranks (default 64)."),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="SFT rows per forward/backward."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="SFT tokens per packed row (default min(4096, context))."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="SFT warmup steps (default 0)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="SFT schedule: cosine (default) or constant."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="SFT checkpoint every N steps."),
    keep: Optional[int] = typer.Option(None, "--keep", help="SFT checkpoints kept."),
    save_dtype: Optional[str] = typer.Option(None, "--save-dtype", help="SFT stored weights: bfloat16 (default), float32 or float16."),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="When stdout is not a terminal (a cluster job's log, | tee): a plain log line every N steps instead of the progress bar (default 10)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda."),
    *,
    opts: StageOptions,
):
    """Rejection-sampling fine-tuning (paper 3.2.3): K samples per prompt from the policy, scored by R_c (safety RM if the prompt is tagged safety or R_s < 0.15, else helpfulness RM); the best per prompt joins the pool (best across all iterations); then SFT on the pool into RUN/sft.

    Reports Figure 7 (max and median reward among N samples, N = 1..K) and Figure 8 (reward per temperature) as tables, RUN/rs.json and PNGs. A rerun reuses this run's samples (RUN/samples.json); --resume continues its SFT.

    Exit status: 0 when the run finished; 130 / 143 when SIGINT / SIGTERM stopped the SFT after a checkpoint (continue with --resume); 1 on an error.
    """
    import functools

    from llamactl.stages import rejection as stage
    from llamactl.stages.runner import run_stage

    def s(p):
        return str(p) if p is not None else None

    flags = dict(policy=s(policy), rm_helpful=s(rm_helpful), rm_safety=s(rm_safety), prompts=s(prompts), out=s(out),
                 pool=s(pool), k=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                 iteration=iteration, gen_batch=gen_batch, device=device)
    sft_flags = dict(lr=lr, epochs=epochs, steps=steps, batch_size=batch_size, micro_batch=micro_batch, seq_len=seq_len,
                     warmup=warmup, schedule=schedule, save_every=save_every, keep=keep, save_dtype=save_dtype,
                     seed=seed, log_every=log_every)
    run_stage(functools.partial(stage.resolve, sft_flags=sft_flags), stage.describe, stage.run, flags=flags,
              launch=opts.launch, config=opts.config, dry_run=opts.dry_run, resume=opts.resume)


# ---- rlhf ppo ----
@rlhf_app.command("ppo")
@stage_command("ppo", "parallel")
def rlhf_ppo(
    size: Optional[str] = typer.Option(None, "--size", help=f"Model preset the policy must have ({SIZES}); sets beta (0.01 for 7b/13b and smaller, 0.005 for 34b/70b). Default: the policy's own shape."),
    policy: Optional[Path] = typer.Option(None, "--policy", help="Initial policy (rejection-sampling or SFT checkpoint, or its run dir); also the frozen reference pi_0."),
    rm_helpful: Optional[Path] = typer.Option(None, "--rm-helpful", help="Helpfulness reward model (rm train --kind helpfulness); the value model starts from it."),
    rm_safety: Optional[Path] = typer.Option(None, "--rm-safety", help="Safety reward model (rm train --kind safety)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help='Training prompts JSONL ({"prompt"|"messages", "safety"?, ...}; e.g. a suite\'s prompts.train.jsonl).'),
    val_prompts: Optional[Path] = typer.Option(None, "--val-prompts", help="Held-out prompts answered greedily every --eval-every iterations (reward, KL; early stopping)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory: policy/ and value/ checkpoints (policy/latest is the result), metrics.jsonl, config.toml (default runs/ppo)."),
    iterations: Optional[int] = typer.Option(None, "--iterations", help="PPO iterations (default 100)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Prompts (rollouts) per iteration over all data-parallel ranks (paper: 512)."),
    minibatch: Optional[int] = typer.Option(None, "--minibatch", help="Rollouts per optimizer step, one step per minibatch for policy and value (paper: 64)."),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="Rows per forward/backward within a minibatch (default 8)."),
    ppo_epochs: Optional[int] = typer.Option(None, "--ppo-epochs", help="Passes over an iteration's rollouts (default 1)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Constant learning rate of policy and value (paper: 1e-6)."),
    value_lr: Optional[float] = typer.Option(None, "--value-lr", help="Constant learning rate of the value model (default: --lr)."),
    freeze_policy: Optional[int] = typer.Option(None, "--freeze-policy", help="First N iterations train only the value model, so its baseline (started from the RM's untrained per-token outputs) settles before it steers the policy (default 0)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay on matrices (paper: 0.1)."),
    clip: Optional[float] = typer.Option(None, "--clip", help="Gradient-norm clip (paper: 1.0; 0: off)."),
    beta: Optional[float] = typer.Option(None, "--beta", help="KL penalty coefficient (default by --size: 0.01 or 0.005)."),
    cliprange: Optional[float] = typer.Option(None, "--cliprange", help="PPO ratio clip epsilon (default 0.2)."),
    cliprange_value: Optional[float] = typer.Option(None, "--cliprange-value", help="Value-loss clip around the rollout's values (default 0.2)."),
    gamma: Optional[float] = typer.Option(None, "--gamma", help="Discount (default 1.0)."),
    lam: Optional[float] = typer.Option(None, "--lam", help="GAE lambda (default 0.95)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Rollout sampling temperature (default 1.0)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Rollout nucleus mass (default 1.0)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Most tokens per response (default 128)."),
    rollout_batch: Optional[int] = typer.Option(None, "--rollout-batch", help="Rows decoded together (0: the rank's whole batch; default 0)."),
    truncated: Optional[str] = typer.Option(None, "--truncated", help="Responses that hit --max-new-tokens without EOS: score (as they are, default) or penalize (--truncated-reward)."),
    truncated_reward: Optional[float] = typer.Option(None, "--truncated-reward", help="Whitened reward of a truncated response under --truncated penalize (default -3)."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help='Held-out evaluation every N iterations (and before the first), rows with "split": "val" (0: off).'),
    val_limit: Optional[int] = typer.Option(None, "--val-limit", help="Use only the first N held-out prompts (0: all)."),
    patience: Optional[int] = typer.Option(None, "--patience", help="Stop after this many evaluations without a better held-out R_c (0: never; default 3)."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Save policy, value and state every N iterations (0: only at the end; default 10)."),
    keep: Optional[int] = typer.Option(None, "--keep", help="Saved iterations kept (default 3)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of prompt order, rollouts and minibatches."),
    save_dtype: Optional[str] = typer.Option(None, "--save-dtype", help="Stored weights: bfloat16 (default), float32 or float16; exact fp32 masters stay in train_state."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda."),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="GPUs the --dry-run plan assumes (default: the layout's, at least 8; 64 for 34b/70b)."),
    *,
    opts: StageOptions,
):
    """PPO with the paper's reward: WHITEN(LOGIT(R_c)) at the last token minus beta * KL to the initial policy per token; rollouts in the training layout.

    Exit status: 0 when the run finished (or stopped early on held-out reward); 130 / 143 when SIGINT / SIGTERM stopped it after saving (continue with --resume); 1 on an error.
    """
    from llamactl.stages import ppo as stage
    from llamactl.stages.runner import resolve_parallel, run_stage

    flags = dict(size=size, policy=str(policy) if policy else None, rm_helpful=str(rm_helpful) if rm_helpful else None,
                 rm_safety=str(rm_safety) if rm_safety else None, prompts=str(prompts) if prompts else None,
                 val_prompts=str(val_prompts) if val_prompts else None, out=str(out) if out else None,
                 iterations=iterations, batch_size=batch_size, minibatch=minibatch, micro_batch=micro_batch,
                 ppo_epochs=ppo_epochs, lr=lr, value_lr=value_lr, freeze_policy=freeze_policy, weight_decay=weight_decay, clip=clip, beta=beta, cliprange=cliprange,
                 cliprange_value=cliprange_value, gamma=gamma, lam=lam, temperature=temperature, top_p=top_p,
                 max_new_tokens=max_new_tokens, rollout_batch=rollout_batch, truncated=truncated,
                 truncated_reward=truncated_reward, eval_every=eval_every, val_limit=val_limit, patience=patience,
                 save_every=save_every, keep=keep, seed=seed, save_dtype=save_dtype, device=device)
    if opts.dry_run and policy is None and opts.config is None:
        pflags = opts.launch.parallel_flags()
        pflags.setdefault("nproc", (pflags.get("tp") or 1) * (pflags.get("pp") or 1))  # a plan needs no processes
        stage.dry_run_without_checkpoints(flags, resolve_parallel({}, pflags), gpus)
        return
    run_stage(stage.resolve, lambda plan: stage.describe(plan, gpus), stage.run, flags=flags, launch=opts.launch,
              config=opts.config, dry_run=opts.dry_run, resume=opts.resume)


# ---- rlhf compare ----
@rlhf_app.command("compare")
def rlhf_compare(
    a: Path = typer.Option(..., "--a", help="Checkpoint (or run dir) A: the model whose win rate is reported."),
    b: Path = typer.Option(..., "--b", help="Checkpoint (or run dir) B: the model A is compared with (e.g. the previous stage)."),
    prompts: Path = typer.Option(..., "--prompts", help='Prompts JSONL: {"prompt", "safety"?}; a task suite\'s prompts.heldout.jsonl (with its task fields) adds the ground-truth judge.'),
    rm_helpful: Path = typer.Option(..., "--rm-helpful", help="Helpfulness reward model: judges prompts not tagged safety."),
    rm_safety: Path = typer.Option(..., "--rm-safety", help="Safety reward model: judges safety-tagged prompts."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the result (win / tie / loss per judge and kind, per-prompt answers) as JSON."),
    samples: int = typer.Option(1, "--samples", help="Answers per prompt and model; a judge compares their means."),
    temperature: float = typer.Option(0.0, "--temperature", help="Sampling temperature (0: greedy; --samples > 1 needs > 0)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", help="Most tokens per answer."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampled answers (the same for A and B)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N prompts of each family (of each kind without families)."),
    raw_a: bool = typer.Option(False, "--raw-a", help='Prompt A as a base model ("Question: ... Answer:", first sentence kept) instead of the chat template.'),
    raw_b: bool = typer.Option(False, "--raw-b", help='Prompt B as a base model (e.g. the pretrained checkpoint against SFT).'),
    batch_size: int = typer.Option(32, "--batch-size", help="Answers decoded together."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, or auto."),
):
    """Win rate of A over B judged by the reward models and by the task suite's ground-truth scorer, helpfulness and safety separately (paper 3.4.1, Figure 11). A tie: judged values within 0.01."""
    from llamactl.stages.compare import result_rows, run_compare

    r = run_compare(a, b, prompts, rm_helpful, rm_safety, samples=samples, temperature=temperature, top_p=top_p,
                    max_new_tokens=max_new_tokens, seed=seed, limit=limit, batch_size=batch_size, device=device,
                    raw_a=raw_a, raw_b=raw_b, out=out)
    cols, rows = result_rows(r)
    console.print(table(f"A = {a} vs B = {b} on {r['prompts']} prompts of {prompts}" + (f" -> {out}" if out else ""),
                        cols, rows))
    if r.get("ground_truth_absent"):
        console.print(f"ground truth absent: {r['ground_truth_absent']}")
