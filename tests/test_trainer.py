"""Trainer pieces: schedule, decay groups, accumulation == one big batch, non-finite stop, vocab checks."""
from __future__ import annotations

import contextlib
import copy
import json
import math

import numpy as np
import pytest
import torch

from llamactl.config import preset
from llamactl.data import Batch
from llamactl.errors import LlamactlError
from llamactl.model import build_model
from llamactl.parallel.context import ParallelContext
from llamactl.trainer import (Hooks, TrainConfig, fit, lm_loss, lr_at, make_adamw, make_default_step, param_groups)

CTX = ParallelContext.single()


def _cfg():
    return preset("tiny", vocab_size=96, n_layers=2)


def test_lr_schedule_warmup_cosine_to_ten_percent():
    c = TrainConfig(steps=110, lr=1e-3, warmup=10)
    assert [lr_at(s, c) for s in range(3)] == pytest.approx([1e-4, 2e-4, 3e-4], rel=1e-12)
    assert lr_at(9, c) == pytest.approx(1e-3, rel=1e-12)
    assert lr_at(10, c) == pytest.approx(1e-3, rel=1e-12)       # peak right after warmup
    mid = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert lr_at(60, c) == pytest.approx(mid, rel=1e-12)          # half way through the decay
    assert lr_at(110, c) == pytest.approx(1e-4, rel=1e-12)        # ends at 10 % of peak
    assert all(lr_at(s, c) >= lr_at(s + 1, c) for s in range(10, 110))
    const = TrainConfig(steps=50, lr=2e-5, warmup=0, schedule="constant")
    assert {lr_at(s, const) for s in range(50)} == {2e-5}


def test_weight_decay_only_on_matrices():
    model = build_model(_cfg(), CTX, seed=0)
    groups = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    plain = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert plain == {n for n, _ in model.named_parameters() if n.endswith("norm.weight")}
    assert "tok_embeddings.weight" in decayed and "output.weight" in decayed and "layers.1.feed_forward.w2.weight" in decayed
    assert len(decayed) + len(plain) == len(list(model.parameters()))
    opt = make_adamw(groups, TrainConfig(lr=1e-3))
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-5


def _batches(seed=0, n=8, t=12, vocab=96):
    rng = np.random.default_rng(seed)
    windows = rng.integers(0, vocab, size=(n, t + 1))
    mask = rng.random((n, t)) > 0.3          # uneven numbers of valid tokens per row
    mask[:, 0] = True
    return windows, mask


def test_grad_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    windows, mask = _batches()
    base = build_model(_cfg(), CTX, seed=1)
    models = [copy.deepcopy(base) for _ in range(2)]
    splits = [[slice(0, 8)], [slice(0, 1), slice(1, 4), slice(4, 6), slice(6, 8)]]
    step = make_default_step(lambda m, b: lm_loss(m, b, CTX), CTX, contextlib.nullcontext)
    losses = []
    for model, parts in zip(models, splits):
        micro = [Batch.from_windows(windows[s], mask[s]) for s in parts]
        denom = sum(b.num_valid for b in micro)
        assert denom == int(mask.sum())
        losses.append(step(model, micro, denom).loss)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    # the big batch loss is the mean over valid tokens, like F.cross_entropy with ignore_index
    full = Batch.from_windows(windows, mask)
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(base(full.tokens).flatten(0, 1), full.targets.flatten())
    assert losses[0] == pytest.approx(float(ref), rel=1e-6)
    for (n, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        assert a.grad.abs().max() > 0
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, msg=n)


class _ListSource:
    """A batch source over fixed windows: enough for the loop, with a resumable position."""

    def __init__(self, windows, micro=2, accum=2):
        self.windows, self.micro, self.accum, self.pos = windows, micro, accum, 0

    def next_step(self):
        out = []
        for _ in range(self.accum):
            idx = [(self.pos + i) % len(self.windows) for i in range(self.micro)]
            self.pos += self.micro
            out.append(Batch.from_windows(self.windows[idx]))
        return out

    def state_dict(self):
        return {"position": self.pos}

    def load_state_dict(self, s):
        self.pos = int(s["position"])


def test_fit_writes_metrics_and_checkpoints(tmp_path):
    from llamactl import checkpoint

    windows, _ = _batches(n=4)  # the same 4 windows every step: the loss must fall
    model = build_model(_cfg(), CTX, seed=0)
    cfg = TrainConfig(steps=5, lr=1e-2, warmup=2, save_every=2, keep=2)
    cfg.peak_flops = 1e12
    res = fit(model, CTX, cfg, _ListSource(windows), run_dir=tmp_path / "run", tokenizer=None,
              flops_per_token=1e6, show_progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["tokens"] for r in rows] == [48 * (i + 1) for i in range(5)]
    assert [r["lr"] for r in rows] == [lr_at(s, cfg) for s in range(5)]
    assert all({"loss", "grad_norm", "tokens_per_s", "mfu"} <= set(r) for r in rows)
    assert all(r["mfu"] == pytest.approx(r["tokens_per_s"] * 1e6 / 1e12) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    ckpts = sorted(p.name for p in (tmp_path / "run").glob("step-*"))
    assert ckpts == ["step-000004", "step-000005"]            # keep the last 2
    assert checkpoint.latest(tmp_path / "run").name == "step-000005" and res.step == 5
    with pytest.raises(LlamactlError, match="--resume"):
        fit(build_model(_cfg(), CTX, seed=0), CTX, cfg, _ListSource(windows), run_dir=tmp_path / "run",
            tokenizer=None, show_progress=False)


def test_non_finite_loss_stops_naming_the_step(tmp_path):
    from llamactl import checkpoint

    windows, _ = _batches(n=16)
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = lm_loss(model, batch, CTX)
        return loss * float("nan") if calls["n"] > 6 else loss   # step 4 (2 micro-batches per step)

    model = build_model(_cfg(), CTX, seed=0)
    cfg = TrainConfig(steps=6, lr=1e-2, save_every=2)
    with pytest.raises(LlamactlError, match=r"loss is nan at step 4.*last good checkpoint: .*step-000002"):
        fit(model, CTX, cfg, _ListSource(windows), run_dir=tmp_path / "run", loss_fn=loss_fn,
            tokenizer=None, show_progress=False)
    assert sorted(p.name for p in (tmp_path / "run").glob("step-*")) == ["step-000002"]
    assert checkpoint.verify(tmp_path / "run" / "step-000002") == []
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3


def test_step_fn_hook_replaces_forward_backward(tmp_path):
    """Pipeline parallel plugs in here: the hook sees the micro-batches and the global normaliser."""
    windows, _ = _batches(n=16)
    seen = []
    default = make_default_step(lambda m, b: lm_loss(m, b, CTX), CTX, contextlib.nullcontext)

    def step_fn(model, micro, denom):
        seen.append((len(micro), denom))
        return default(model, micro, denom)

    fit(build_model(_cfg(), CTX, seed=0), CTX, TrainConfig(steps=2, lr=1e-3), _ListSource(windows),
        run_dir=tmp_path / "run", hooks=Hooks(step_fn=step_fn), tokenizer=None, show_progress=False)
    assert seen == [(2, 48), (2, 48)]
