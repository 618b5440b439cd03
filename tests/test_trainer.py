"""Trainer pieces: schedule, decay groups, accumulation == one big batch, clipping folded into AdamW,
non-finite stop, vocab checks."""
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
from llamactl.trainer import (Hooks, TrainConfig, clipped_step, default_grad_norm, fit, lm_loss, lr_at, make_adamw,
                              make_default_step, param_groups, takes_grad_scale)

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


# ---- clipping: the coefficient folded into the fused AdamW, or multiplied in ---------------------------
NORMS = [8.0, 0.3, 25.0, 0.6, 3.0]   # total gradient norm of each step: above and below max_norm 1


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in [(64, 32), (32,), (7, 5, 3)]]


def _steps(make_opt, clip_step, norms, max_norms):
    """Steps with gradients of the given total norms; clip_step(opt, params, max_norm) clips and steps."""
    params = _tensors()
    opt = make_opt([{"params": [params[0], params[2]], "weight_decay": 0.1},
                    {"params": [params[1]], "weight_decay": 0.0}])
    for i, (norm, max_norm) in enumerate(zip(norms, max_norms)):
        g = torch.Generator().manual_seed(100 + i)
        grads = [torch.randn(p.shape, generator=g) for p in params]
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads]))
        for p, x in zip(params, grads):
            p.grad = x * (norm / total)
        clip_step(opt, params, max_norm)
        assert getattr(opt, "grad_scale", None) is None, "grad_scale must not outlive its step"
        opt.zero_grad(set_to_none=True)
    return [p.detach() for p in params], opt


def _reference_step(opt, params, max_norm):
    if max_norm:
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    opt.step()


def _folded_step(opt, params, max_norm):
    clipped_step(opt, params, default_grad_norm(params), max_norm)


def _fused(groups):
    return make_adamw(groups, TrainConfig(lr=1e-2))


def _foreach(groups):
    return torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-5, foreach=True)


@pytest.mark.parametrize("make_opt", [_fused, _foreach], ids=["fused", "foreach"])
def test_clipped_step_equals_clip_grad_norm_then_step(make_opt):
    """Fused AdamW takes 1/coef as grad_scale, foreach AdamW gets the grads multiplied: both give the weights
    of clip_grad_norm_ + step over steps clipped and not (g / (1/coef) vs g * coef: a few ulp)."""
    want, ref_opt = _steps(make_opt, _reference_step, NORMS, [1.0] * len(NORMS))
    got, opt = _steps(make_opt, _folded_step, NORMS, [1.0] * len(NORMS))
    assert takes_grad_scale(opt) == (make_opt is _fused)
    unclipped, _ = _steps(make_opt, _reference_step, NORMS, [0.0] * len(NORMS))
    assert max((a - b).abs().max().item() for a, b in zip(want, unclipped)) > 1e-3, "clipping must matter here"
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_grad_scale_is_for_one_step_only():
    """A clipped step (norm 10 -> coef 0.1) then unclipped ones (max_norm 0): the fused optimizer must not
    keep dividing the later steps' gradients by the first step's 1/coef."""
    norms, max_norms = [10.0, 0.5, 0.5, 10.0, 0.4], [1.0, 0.0, 0.0, 1.0, 0.0]
    want, _ = _steps(_fused, _reference_step, norms, max_norms)
    got, _ = _steps(_fused, _folded_step, norms, max_norms)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_fit_clips_like_clip_grad_norm_then_step(tmp_path):
    """trainer.fit (grad_norm hook, coefficient folded into the fused AdamW) gives the grad norms and weights
    of the textbook loop: backward, clip_grad_norm_, step."""
    windows, _ = _batches(n=8)
    cfg = TrainConfig(steps=4, lr=1e-2, schedule="constant", clip=0.5)
    model = build_model(_cfg(), CTX, seed=0)
    ref = copy.deepcopy(model)
    fit(model, CTX, cfg, _ListSource(windows), run_dir=tmp_path / "run", tokenizer=None, show_progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]

    step_fn = make_default_step(lambda m, b: lm_loss(m, b, CTX), CTX, contextlib.nullcontext)
    opt = make_adamw(param_groups(ref, cfg.weight_decay), cfg)
    source, norms = _ListSource(windows), []
    for _ in range(cfg.steps):
        micro = source.next_step()
        step_fn(ref, micro, sum(b.num_valid for b in micro))
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(ref.parameters()), cfg.clip, foreach=True)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert min(norms) > cfg.clip, "clipping must be active in every step, or the fold goes untested"
    assert [r["grad_norm"] for r in rows] == pytest.approx(norms, rel=1e-5)
    # 1 ulp after one step; Adam magnifies rounding in near-zero gradients to ~2e-6 in 4 steps (fused vs
    # foreach AdamW differ as much); a missing or inverted clip moves weights by ~4e-2
    for (name, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-5, msg=name)


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


def test_non_finite_grad_norm_stops_before_the_update(tmp_path):
    """A finite loss with an inf gradient norm (the grad_norm hook's result) stops the run at that step,
    before the optimizer touches the weights."""
    windows, _ = _batches(n=16)
    model = build_model(_cfg(), CTX, seed=0)
    seen = {}

    def grad_norm(params):
        seen["calls"] = seen.get("calls", 0) + 1
        if seen["calls"] < 3:
            return default_grad_norm(params)
        seen["weights"] = [p.detach().clone() for p in model.parameters()]
        return torch.tensor(float("inf"))

    with pytest.raises(LlamactlError, match=r"gradient norm is inf at step 3"):
        fit(model, CTX, TrainConfig(steps=5, lr=1e-2), _ListSource(windows), run_dir=tmp_path / "run",
            hooks=Hooks(grad_norm=grad_norm), tokenizer=None, show_progress=False)
    assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), seen["weights"]))
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


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
