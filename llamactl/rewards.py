"""The RLHF reward (paper sections 3.2.2 and 3.2.3): R_c from the two reward models, WHITEN(LOGIT(R_c)).

One module serves rejection sampling, PPO and model-based comparison, so all three score the same way:

    R_h = sigma(helpfulness RM score), R_s = sigma(safety RM score)       (sigma-space, in (0, 1))
    R_c = R_s   if the prompt is tagged safety or R_s < 0.15             (SAFETY_THRESHOLD)
          R_h   otherwise
    PPO reward = WHITEN(LOGIT(R_c))                                       (ppo_reward)

Scoring goes through text: each reward model re-encodes the prompt dialogue + response with its own
tokenizer (`stages.reward.encode_response`, the tokens `rm train` trained on) and is read at the last
token (`stages.reward_eval.score_sequences`, the path of `rm score` / `rm eval`), so a policy with
another tokenizer than its reward models works, and the scores equal `rm score`'s on the same text.

Both reward models are loaded once, frozen (eval mode, no grad), in the caller's ParallelContext: at
tp > 1 each rank holds its shard (checkpoint.load reads only its slices), at pp > 1 each pipeline stage
its layers (the score is computed on the last stage and broadcast). `score` is collective over the
context: every rank calls it with the same texts and gets the same values.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from llamactl.errors import LlamactlError

SAFETY_THRESHOLD = 0.15


def combine(r_help: torch.Tensor, r_safe: torch.Tensor, safety: torch.Tensor) -> torch.Tensor:
    """R_c in sigma space: R_s where the prompt is safety-tagged or R_s < SAFETY_THRESHOLD, else R_h."""
    r_help, r_safe = torch.as_tensor(r_help), torch.as_tensor(r_safe)
    tagged = torch.as_tensor(safety, dtype=torch.bool, device=r_safe.device)
    return torch.where(tagged | (r_safe < SAFETY_THRESHOLD), r_safe, r_help)


def logit(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """log(p / (1 - p)) of p clamped to [eps, 1 - eps] (a saturated RM gives +-13.8, never inf)."""
    p = torch.as_tensor(p).clamp(eps, 1.0 - eps)
    return torch.log(p) - torch.log1p(-p)


def whiten(x: torch.Tensor, eps: float = 1e-8, group: Any = None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over all elements of the batch, with the population variance (divide by
    n, not n - 1): a batch of one whitens to 0 (not NaN), and a constant batch to zeros.

    group: a torch.distributed process group whose ranks each hold a slice of the batch (data parallel):
    mean and variance are then those of the whole batch (sum, sum of squares and count all-reduced)."""
    x = torch.as_tensor(x)
    xf = x.double()
    if group is None:
        mean = xf.mean()
        var = ((xf - mean) ** 2).mean()
    else:
        import torch.distributed as dist

        s = torch.stack([xf.sum(), torch.tensor(float(xf.numel()), dtype=torch.float64, device=xf.device)])
        dist.all_reduce(s, group=group)
        mean = s[0] / s[1]
        sq = ((xf - mean) ** 2).sum()
        dist.all_reduce(sq, group=group)
        var = sq / s[1]
    return ((xf - mean) / torch.sqrt(var + eps)).to(x.dtype if x.is_floating_point() else torch.float32)


def ppo_reward(r_c: torch.Tensor, group: Any = None) -> torch.Tensor:
    """The paper's PPO reward before the KL penalty: WHITEN(LOGIT(R_c)) over the batch."""
    return whiten(logit(r_c), group=group)


@dataclass
class Rewards:
    """Sigma-space rewards, one per response (fp32, on the CPU)."""

    helpful: torch.Tensor
    safety: torch.Tensor
    combined: torch.Tensor


KIND_FLAGS = {"helpfulness": "--rm-helpful", "safety": "--rm-safety"}


def check_reward_checkpoint(path, kind: str, flag: Optional[str] = None) -> Path:
    """The checkpoint dir of a reward model of `kind` (a run dir means its newest checkpoint), from its
    llamactl.json alone (no weights read); another head or kind is a one-line error naming the flag."""
    from llamactl.checkpoint import load_config, read_meta, resolve

    flag = flag or KIND_FLAGS[kind]
    if not Path(path).exists():
        raise LlamactlError(f"checkpoint directory not found: {path} ({flag})")
    p = resolve(path, flag)
    meta = read_meta(p)
    _, head = load_config(p, meta=meta)
    if head != "reward":
        raise LlamactlError(f"not a reward model: the checkpoint has a {head} head ({p}, {flag})")
    got = (meta.get("extra") or {}).get("rm_kind")
    if got != kind:
        what = f"a {got} reward model" if got else "a reward model of unknown kind (no rm_kind in llamactl.json)"
        raise LlamactlError(f"{flag} needs a {kind} reward model, got {what} ({p})")
    return p


def load_reward_model(path, kind: str, *, ctx=None, device: str = "cpu", flag: Optional[str] = None):
    """(frozen model, tokenizer, checkpoint dir) of a reward checkpoint of `kind` (check_reward_checkpoint),
    this rank's shard of it in `ctx`'s layout."""
    from llamactl.checkpoint import load_config, load_model, tokenizer_path
    from llamactl.parallel.context import ParallelContext
    from llamactl.plan import layout_error
    from llamactl.tokenizer import Tokenizer

    flag = flag or KIND_FLAGS[kind]
    p = check_reward_checkpoint(path, kind, flag)
    cfg, _ = load_config(p)
    ctx = ctx or ParallelContext.single()
    err = layout_error(cfg, ctx.tp, ctx.pp)
    if err:
        raise LlamactlError(f"{err} ({p}, {flag})")
    device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_model(p, ctx, device=device, flag=flag)
    model.eval()
    model.requires_grad_(False)
    return model, Tokenizer.load(tokenizer_path(p)), p


class RewardModels:
    """The helpfulness and safety reward models, frozen, scoring (prompt dialogue, response) texts."""

    def __init__(self, helpful, helpful_tok, safety, safety_tok, *, paths: tuple[Path, Path] = (Path(), Path())):
        self.helpful, self.helpful_tok = helpful, helpful_tok
        self.safety, self.safety_tok = safety, safety_tok
        self.paths = paths

    @classmethod
    def load(cls, helpful: Path, safety: Path, *, ctx=None, device: str = "cpu") -> "RewardModels":
        """Load both once, frozen, in `ctx`'s layout (each rank its tp shard / pp stage)."""
        h, ht, hp = load_reward_model(helpful, "helpfulness", ctx=ctx, device=device)
        s, st, sp = load_reward_model(safety, "safety", ctx=ctx, device=device)
        return cls(h, ht, s, st, paths=(hp, sp))

    @staticmethod
    def _raw(model, tok, dialogs, responses, batch_size: int, flag: str) -> torch.Tensor:
        from llamactl.stages.reward import encode_response
        from llamactl.stages.reward_eval import score_sequences

        seqs = [encode_response(tok, d, r) for d, r in zip(dialogs, responses)]
        limit = model.cfg.max_seq_len
        for i, s in enumerate(seqs):
            if len(s) > limit:
                raise LlamactlError(f"response {i + 1} with its prompt has {len(s)} tokens, more than the reward "
                                    f"model's context of {limit} ({flag}; lower --max-new-tokens)")
        return torch.tensor(score_sequences(model, seqs, batch_size), dtype=torch.float32)

    def raw_scores(self, dialogs: Sequence[list[dict]], responses: Sequence[str], *,
                   batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """(helpfulness, safety) RM scores before the sigmoid."""
        if len(dialogs) != len(responses):
            raise ValueError(f"{len(dialogs)} dialogues but {len(responses)} responses")
        with torch.no_grad():
            h = self._raw(self.helpful, self.helpful_tok, dialogs, responses, batch_size, "--rm-helpful")
            s = self._raw(self.safety, self.safety_tok, dialogs, responses, batch_size, "--rm-safety")
        return h, s

    def score(self, dialogs: Sequence[list[dict]], responses: Sequence[str], safety: Sequence[bool], *,
              batch_size: int = 16) -> Rewards:
        """R_h, R_s and R_c of each response to its prompt dialogue (a list of {"role", "content"} ending
        with the user turn); safety[i]: prompt i is safety-tagged. Collective over the context's ranks."""
        if len(safety) != len(dialogs):
            raise ValueError(f"{len(dialogs)} dialogues but {len(safety)} safety tags")
        h, s = self.raw_scores(dialogs, responses, batch_size=batch_size)
        rh, rs = torch.sigmoid(h), torch.sigmoid(s)
        tags = torch.tensor([bool(x) for x in safety], dtype=torch.bool)
        return Rewards(rh, rs, combine(rh, rs, tags))
