"""One PPO iteration of `llamactl rlhf ppo` (stages/ppo.py): rollouts, scoring, minibatch steps.

The pieces the stage's loop, its tests and bench/ppo_throughput.py share: the trainer batches and the
two loss functions (policy: clipped surrogate through the fused vocab-parallel head; value: clipped value
loss), the prompt order, the five models (`Models`) with the policy's decode-layout copy that samples
(CPU), rollout / scoring / held-out evaluation, and `iteration`, which returns one metrics row. The
per-token arithmetic is llamactl/ppo.py.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llamactl.errors import LlamactlError

# ---- batches ----------------------------------------------------------------------------------------
class PPOBatch:
    """A micro-batch of rollouts for Trainer.step: right-padded tokens (B, T) with lengths, and per-token
    (B, T-1) tensors aligned with token_logprobs: mask (response tokens), old log-probs, advantages,
    old values, returns."""

    def __init__(self, tokens, lengths, mask, old_logprobs, advantages, old_values, returns):
        self.tokens, self.lengths, self.mask = tokens, lengths, mask
        self.old_logprobs, self.advantages = old_logprobs, advantages
        self.old_values, self.returns = old_values, returns

    @property
    def num_valid(self) -> int:
        return int(self.mask.sum())

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def model_inputs(self) -> dict:
        return {}  # right padding: the plain causal path (model.padding_layout)

    def to(self, device) -> "PPOBatch":
        return PPOBatch(*(x.to(device) for x in (self.tokens, self.lengths, self.mask, self.old_logprobs,
                                                  self.advantages, self.old_values, self.returns)))


def make_batches(roll: dict, rows: list[int], micro: int) -> list[PPOBatch]:
    """Micro-batches of `micro` rows of the rollout tensors, each cut to its longest row."""
    out = []
    for k in range(0, len(rows), micro):
        idx = torch.tensor(rows[k:k + micro], dtype=torch.long)
        lengths = roll["lengths"][idx]
        t = int(lengths.max())
        out.append(PPOBatch(roll["tokens"][idx, :t], lengths, roll["mask"][idx, :t - 1], roll["logprobs"][idx, :t - 1],
                            roll["advantages"][idx, :t - 1], roll["values"][idx, :t - 1], roll["returns"][idx, :t - 1]))
    return out


ENTROPY_BLOCK = 1024  # tokens per block of the entropy metric (logits of one block at a time)


def policy_loss_fn(model, ctx, cliprange: float):
    """loss_fn for the policy's Trainer: the clipped surrogate from the final hidden states (the fused,
    vocab-parallel head: no full logits), plus entropy (a metric) of the current policy on response tokens."""
    from llamactl import ppo
    from llamactl.scoring import hidden_logprobs

    def loss_fn(hidden, batch: PPOBatch):
        tokens = batch.tokens
        logp = hidden_logprobs(hidden[:, :-1], model.output, tokens[:, 1:], batch.mask, ctx)
        loss, extras = ppo.policy_loss(logp, batch.old_logprobs, batch.advantages, batch.mask, cliprange)
        with torch.no_grad():
            h = hidden[:, :-1][batch.mask]
            ent = torch.zeros((), dtype=torch.float32, device=h.device)
            group = ctx.tp_group if ctx.tp > 1 else None
            for s in range(0, h.shape[0], ENTROPY_BLOCK):
                ent = ent + ppo.entropy_from_logits(model.output(h[s:s + ENTROPY_BLOCK]), group).sum()
        return loss, {**extras, "entropy": ent}

    loss_fn.needs_hidden = True
    return loss_fn


def value_loss_fn(cliprange_value: float):
    from llamactl import ppo

    def loss_fn(values, batch: PPOBatch):
        return ppo.value_loss(values[:, :-1].float(), batch.old_values, batch.returns, batch.mask, cliprange_value)

    return loss_fn


class PromptOrder:
    """Prompt indices in a seeded order per epoch; every iteration takes the next batch_size of them."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.position = n, seed, 0, 0
        self._order: np.ndarray | None = None

    def order(self) -> np.ndarray:
        if self._order is None:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        return self._order

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            if self.position >= self.n:
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
            out.append(int(self.order()[self.position]))
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "n": self.n, "seed": self.seed}

    def load_state_dict(self, s: dict) -> None:
        if int(s["n"]) != self.n or int(s["seed"]) != self.seed:
            raise LlamactlError(f"resume with {self.n} prompts and --seed {self.seed}, but the run had {int(s['n'])} "
                                f"prompts and seed {int(s['seed'])} (--prompts / --seed)")
        self.epoch, self.position, self._order = int(s["epoch"]), int(s["position"]), None


# ---- one iteration's pieces -------------------------------------------------------------------------
@dataclass
class Models:
    policy: Any
    reference: Any
    value: Any
    rewards: Any          # rewards.RewardModels (or anything with its score())
    tok: Any
    ctx: Any
    sampler: Any = None   # CPU: the policy's weights in decode layout (see decode_copy); else the policy


def decode_copy(policy):
    """On CPU, a second instance of this rank's policy shard whose weights are kept in `decode_layout`
    (column-major, fused q|k|v and w1|w3, huge pages): what `llamactl generate` samples with.

    The training tensors themselves must stay contiguous: torch's fused CPU AdamW (the trainer's) pairs
    parameter, gradient and moment elements by memory order, so it mis-updates a column-major or fused
    view parameter whose gradient is row-major. The copy has the same layout (tp / pp shard) and is
    refreshed in place from the training weights before every rollout (`sync_sampler`): no gather, no
    consolidation. On GPU decode_layout changes nothing, so the training model samples itself."""
    from llamactl.generation import decode_layout
    from llamactl.model import Transformer

    p0 = next(policy.parameters())
    if p0.device.type != "cpu":
        return policy
    with torch.device("meta"):
        copy = Transformer(policy.cfg, policy.ctx, policy.head, dtype=p0.dtype)
    copy.to_empty(device=p0.device)
    with torch.no_grad():
        for a, b in zip(copy.parameters(), policy.parameters()):
            a.copy_(b)
    copy.requires_grad_(False)
    decode_layout(copy)
    return copy.eval()


@torch.no_grad()
def sync_sampler(m: "Models") -> None:
    """Copy the training policy's current weights into the decode copy (in place: fused views stay fused)."""
    if m.sampler is m.policy:
        return
    for a, b in zip(m.sampler.parameters(), m.policy.parameters()):
        a.copy_(b)
    drop_packed_weights(m.sampler)


def _dp_sum(values: list[float], ctx) -> list[float]:
    """Sum floats over data-parallel ranks (identity at dp 1)."""
    if ctx.dp == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=ctx.dp_group)
    return t.tolist()


def drop_packed_weights(model) -> None:
    """Forget the oneDNN-packed copies inference keeps of the decode-layout weights (model.packed_weight).

    A packed copy is re-made when its source tensor's version moves, but the fused q|k|v and w1|w3
    matrices of `fuse_projections` are written through the parameters (views set with `.data =`), whose
    in-place writes (`sync_sampler`) do not move the fused matrix's version counter: after a training
    step its packed copy would be stale. Dropping them after every sync re-packs from the current
    weights (once per iteration; weights below model.PACK_MIN_ELEMENTS have no packed copy)."""
    for mod in model.modules():
        mod.__dict__.pop("_llamactl_packed", None)


def rollout(m: Models, prompts: list[list[int]], seeds: list[int], c: Any, *, temperature: float):
    """Sample every prompt from the training policy in its training layout; (Samples, generated tokens)."""
    from llamactl.generation import generate

    sync_sampler(m)
    amp = torch.bfloat16 if next(m.policy.parameters()).device.type == "cuda" else None
    samples = generate(m.sampler, prompts, max_new_tokens=c.max_new_tokens, temperature=temperature, top_p=c.top_p,
                       seeds=seeds, eos_id=m.tok.eos_id, ctx=m.ctx, batch_size=c.rollout_batch or None,
                       autocast_dtype=amp)
    return samples, sum(len(s.tokens) for s in samples)


def response_texts(tok, samples) -> list[str]:
    return [tok.decode(s.tokens[:-1] if s.finish_reason == "stop" else s.tokens) for s in samples]


@torch.no_grad()
def score_rollouts(m: Models, roll, micro: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log pi, log pi_0, V) per token (B, T-1) of right-padded rollouts, micro rows at a time, by the
    training models (not the sampler's numbers)."""
    from llamactl.scoring import sequence_scores, token_logprobs

    lp, ref, val = [], [], []
    for s in range(0, roll.tokens.shape[0], micro):
        tk, ln = roll.tokens[s:s + micro], roll.lengths[s:s + micro]
        lp.append(token_logprobs(m.policy, tk, ln, m.ctx).cpu())
        ref.append(token_logprobs(m.reference, tk, ln, m.ctx).cpu())
        val.append(sequence_scores(m.value, tk, ln, m.ctx, per_token=True)[:, :-1].cpu())
    return torch.cat(lp), torch.cat(ref), torch.cat(val)


def evaluate(m: Models, items, prompts: list[list[int]], c: Any) -> dict:
    """Held-out prompts answered greedily: mean R_h, R_s, R_c (sigma space), mean per-sequence KL to pi_0 and
    response length; this rank's share of the prompts, summed over dp."""
    from llamactl import ppo
    from llamactl.generation import collate

    ctx = m.ctx
    mine = list(range(len(prompts)))[ctx.dp_rank::ctx.dp]
    sums = [0.0] * 6
    if mine:
        samples, _ = rollout(m, [prompts[i] for i in mine], [0] * len(mine), c, temperature=0.0)
        r = m.rewards.score([items[i].messages for i in mine], response_texts(m.tok, samples),
                            [bool(items[i].safety) for i in mine])
        roll = collate(samples, pad_id=0)
        lp, ref, _ = score_rollouts(m, roll, c.micro_batch)
        mask = roll.mask[:, 1:]
        kl = ppo.sequence_sums(ppo.kl_per_token(lp, ref, mask), mask)
        sums = [float(r.helpful.sum()), float(r.safety.sum()), float(r.combined.sum()), float(kl.sum()),
                float(sum(len(s.tokens) for s in samples)), float(len(mine))]
    h, s, comb, kl, ln, n = _dp_sum(sums, ctx)
    n = max(n, 1.0)
    return {"reward_helpful": h / n, "reward_safety": s / n, "reward_combined": comb / n, "kl": kl / n,
            "response_len": ln / n}


def iteration(m: Models, trainers: dict, items, prompts: list[list[int]], rows: list[int], it: int,
              c: Any) -> dict:
    """One PPO iteration on this rank's prompt rows (global batch positions `rows` of iteration `it`);
    returns the metrics row (means over the global batch)."""
    from llamactl import ppo
    from llamactl.generation import collate, sequence_seed
    from llamactl.rewards import ppo_reward

    ctx = m.ctx
    group = ctx.dp_group if ctx.dp > 1 else None
    idx = [r for r in rows]
    b0 = ctx.dp_rank * (c.batch_size // ctx.dp)
    seeds = [sequence_seed(c.seed, it * c.batch_size + b0 + k) for k in range(len(idx))]
    t0 = time.perf_counter()
    samples, gen_tokens = rollout(m, [prompts[i] for i in idx], seeds, c, temperature=c.temperature)
    t1 = time.perf_counter()
    rw = m.rewards.score([items[i].messages for i in idx], response_texts(m.tok, samples),
                         [bool(items[i].safety) for i in idx])
    truncated = torch.tensor([s.finish_reason != "stop" for s in samples])
    score = ppo_reward(rw.combined, group=group).float()
    if c.truncated == "penalize":
        score = torch.where(truncated, torch.full_like(score, c.truncated_reward), score)
    roll = collate(samples, pad_id=0)
    logp, ref, values = score_rollouts(m, roll, c.micro_batch)
    mask = roll.mask[:, 1:]
    kl = ppo.kl_per_token(logp, ref, mask)
    rewards = ppo.token_rewards(score, kl, mask, c.beta)
    adv, ret = ppo.gae(rewards, values, mask, c.gamma, c.lam)
    adv = ppo.masked_whiten(adv, mask, group=group)
    data = {"tokens": roll.tokens, "lengths": roll.lengths, "mask": mask, "logprobs": logp, "advantages": adv,
            "values": values, "returns": ret}
    # explained variance over the global batch: moments of R and R - V summed over dp
    mom = [float(mask.sum()), float((ret * mask).sum()), float((ret * ret * mask).sum()),
           float(((ret - values) * mask).sum()), float(((ret - values) ** 2 * mask).sum())]
    t2 = time.perf_counter()
    per_rank_mb = c.minibatch // ctx.dp
    frozen = it < c.freeze_policy
    sums: dict[str, float] = {}
    n_steps = 0
    train_tokens = 0
    for ep in range(c.ppo_epochs):
        perm = np.random.default_rng([c.seed, it, ep, ctx.dp_rank]).permutation(len(idx)).tolist()
        for k in range(0, len(perm), per_rank_mb):
            mb = make_batches(data, perm[k:k + per_rank_mb], c.micro_batch)
            if frozen:  # the policy's loss and metrics on this minibatch, no update
                po = trainers["policy"].evaluate(mb)
                po.grad_norm, po.lr, po.tokens = 0.0, 0.0, 0
            else:
                po = trainers["policy"].step(mb)
            vo = trainers["value"].step(mb)
            n_steps += 1
            train_tokens += po.tokens
            for key, v in (("loss", po.loss), ("grad_norm", po.grad_norm), ("value_loss", vo.loss),
                           ("value_grad_norm", vo.grad_norm), *po.extras.items(), *vo.extras.items()):
                sums[key] = sums.get(key, 0.0) + float(v)
            lr = po.lr
    t3 = time.perf_counter()
    seq_kl = ppo.sequence_sums(kl, mask)
    n_resp = float(len(idx))
    glob = _dp_sum([float(rw.helpful.sum()), float(rw.safety.sum()), float(rw.combined.sum()), float(score.sum()),
                    float(seq_kl.sum()), float(sum(len(s.tokens) for s in samples)), float(truncated.sum()), n_resp,
                    float(gen_tokens), *mom], ctx)
    h, s, comb, wh, klsum, ln, tr, n, gen_all, cnt, r1, r2, d1, d2 = glob
    var_r = r2 / cnt - (r1 / cnt) ** 2
    var_d = d2 / cnt - (d1 / cnt) ** 2
    row = {"step": it + 1, "split": "train", "loss": sums["loss"] / n_steps, "value_loss": sums["value_loss"] / n_steps,
           "lr": lr, "grad_norm": sums["grad_norm"] / n_steps, "value_grad_norm": sums["value_grad_norm"] / n_steps,
           "tokens": trainers["policy"].tokens, "tokens_per_s": train_tokens / max(t3 - t0, 1e-9),
           "reward_helpful": h / n, "reward_safety": s / n, "reward_combined": comb / n, "reward_whitened": wh / n,
           "kl": klsum / n, "entropy": sums["entropy"] / n_steps, "clip_frac": sums["clip_frac"] / n_steps,
           "approx_kl": sums["approx_kl"] / n_steps, "vf_clip_frac": sums["vf_clip_frac"] / n_steps,
           "explained_var": (1.0 - var_d / var_r) if var_r > 0 else float("nan"),
           "response_len": ln / n, "truncated_frac": tr / n, "rollout_tokens": int(gen_all),
           "rollout_tokens_per_s": gen_all / max(t1 - t0, 1e-9),
           "time_generate": t1 - t0, "time_score": t2 - t1, "time_train": t3 - t2, "policy_frozen": frozen}
    return row
