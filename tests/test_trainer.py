"""Trainer pieces: schedule, decay groups, accumulation == one big batch, clipping folded into AdamW,
non-finite stop; the step API (Trainer.step == fit, the old step path bit for bit), validation rows,
callbacks, per-batch model inputs."""
from __future__ import annotations

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
from llamactl.optim import clipped_step, lr_at, make_adamw, param_groups, takes_grad_scale
from llamactl.parallel.pipeline import pipeline_step
from llamactl.trainer import TrainConfig, Trainer, fit, lm_loss

CTX = ParallelContext.single()


def _cfg():
    return preset("tiny", vocab_size=96, n_layers=2)


def default_grad_norm(params):
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


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
    losses = []
    for model, parts in zip(models, splits):
        micro = [Batch.from_windows(windows[s], mask[s]) for s in parts]
        denom = sum(b.num_valid for b in micro)
        assert denom == int(mask.sum())
        losses.append(pipeline_step(model, micro, CTX, lm_loss(model, CTX), denom).loss)
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

    opt = make_adamw(param_groups(ref, cfg.weight_decay), cfg)
    source, norms = _ListSource(windows), []
    for _ in range(cfg.steps):
        micro = source.next_step()
        pipeline_step(ref, micro, CTX, lm_loss(ref, CTX), sum(b.num_valid for b in micro))
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
    assert checkpoint.read_meta(tmp_path / "run" / "step-000005")["dtype"] == "bfloat16"   # --save-dtype default
    with pytest.raises(LlamactlError, match="--resume"):
        fit(build_model(_cfg(), CTX, seed=0), CTX, cfg, _ListSource(windows), run_dir=tmp_path / "run",
            tokenizer=None, show_progress=False)


def test_non_finite_loss_stops_naming_the_step(tmp_path):
    from llamactl import checkpoint

    windows, _ = _batches(n=16)
    calls = {"n": 0}
    model = build_model(_cfg(), CTX, seed=0)
    lm = lm_loss(model, CTX)

    def loss_fn(hidden, batch):
        calls["n"] += 1
        loss = lm(hidden, batch)
        return loss * float("nan") if calls["n"] > 6 else loss   # step 4 (2 micro-batches per step)

    loss_fn.needs_hidden = True
    cfg = TrainConfig(steps=6, lr=1e-2, save_every=2, save_dtype="float32")
    with pytest.raises(LlamactlError, match=r"loss is nan at step 4.*last good checkpoint: .*step-000002"):
        fit(model, CTX, cfg, _ListSource(windows), run_dir=tmp_path / "run", loss_fn=loss_fn,
            tokenizer=None, show_progress=False)
    assert sorted(p.name for p in (tmp_path / "run").glob("step-*")) == ["step-000002"]
    assert checkpoint.verify(tmp_path / "run" / "step-000002") == []
    assert checkpoint.read_meta(tmp_path / "run" / "step-000002")["dtype"] == "float32"
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3


class _InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss whose gradient norm is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def test_non_finite_grad_norm_stops_before_the_update(tmp_path):
    """A finite loss with an inf gradient norm stops the run at that step, before the optimizer touches the
    weights (and leaves no gradient behind)."""
    windows, _ = _batches(n=16)
    model = build_model(_cfg(), CTX, seed=0)
    lm, seen = lm_loss(model, CTX), {"calls": 0}

    def loss_fn(hidden, batch):
        seen["calls"] += 1
        if seen["calls"] == 5:  # first micro-batch of step 3
            seen["weights"] = [p.detach().clone() for p in model.parameters()]
            hidden = _InfGrad.apply(hidden)
        return lm(hidden, batch)

    loss_fn.needs_hidden = True
    with pytest.raises(LlamactlError, match=r"gradient norm is (inf|nan) at step 3"):
        fit(model, CTX, TrainConfig(steps=5, lr=1e-2), _ListSource(windows), run_dir=tmp_path / "run",
            loss_fn=loss_fn, tokenizer=None, show_progress=False)
    assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), seen["weights"]))
    assert all(p.grad is None for p in model.parameters())
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


# ---- the step API -------------------------------------------------------------------------------------
def test_trainer_step_twice_equals_two_steps_of_fit(tmp_path):
    """Driving Trainer.step from one's own loop (as PPO does) is bit for bit what fit does."""
    windows, mask = _batches(n=8)
    cfg = TrainConfig(steps=2, lr=1e-2, warmup=1, clip=0.5, seed=3)
    model = build_model(_cfg(), CTX, seed=0)
    mine = copy.deepcopy(model)
    res = fit(model, CTX, cfg, _ListSource(windows), run_dir=tmp_path / "run", show_progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]

    from llamactl.trainer import seed_everything

    trainer, source = Trainer(mine, CTX, cfg), _ListSource(windows)
    seed_everything(cfg.seed)
    outs = [trainer.step(source.next_step()) for _ in range(2)]
    assert [o.loss for o in outs] == [r["loss"] for r in rows]
    assert [o.grad_norm for o in outs] == [r["grad_norm"] for r in rows]
    assert [o.lr for o in outs] == [r["lr"] for r in rows] == [lr_at(0, cfg), lr_at(1, cfg)]
    assert (trainer.global_step, trainer.tokens) == (res.step, res.tokens) == (2, rows[-1]["tokens"])
    for (name, a), (_, b) in zip(model.named_parameters(), mine.named_parameters()):
        assert torch.equal(a, b), name
    st = trainer.state_dict()
    assert st["step"] == 2 and st["tokens"] == res.tokens and st["optimizer"]["state"]


def test_one_loss_signature_gives_the_old_step_bit_for_bit():
    """The old plain path, written out: per micro-batch hidden states -> fused head loss (summed) / denom ->
    backward; torch's total norm; fused AdamW with 1/coef as grad_scale. Trainer.step (loss_fn(output, batch)
    through the one pipeline step at pp 1) gives the same losses, norms and weights, bit for bit."""
    from llamactl.parallel.head_loss import lm_head_cross_entropy

    windows, mask = _batches(n=8)
    cfg = TrainConfig(steps=3, lr=1e-2, warmup=2, clip=0.5)
    model = build_model(_cfg(), CTX, seed=0)
    ref = copy.deepcopy(model)
    trainer = Trainer(model, CTX, cfg)
    opt = torch.optim.AdamW(param_groups(ref, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-5, fused=True)
    source_a, source_b = _ListSource(windows), _ListSource(windows)
    for step in range(cfg.steps):
        got = trainer.step(source_a.next_step())
        micro = source_b.next_step()
        denom = sum(b.num_valid for b in micro)
        total = torch.zeros((), dtype=torch.float64)
        for b in micro:
            loss = lm_head_cross_entropy(ref(b.tokens, return_hidden=True), ref.output, b.targets, CTX, reduction="sum")
            (loss / denom).backward()
            total += loss.detach().double()
        params = list(ref.parameters())
        norm = default_grad_norm(params)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        opt.grad_scale = torch.reciprocal(torch.clamp(cfg.clip / (norm + 1e-6), max=1.0)).float()
        opt.step()
        opt.grad_scale = None
        opt.zero_grad(set_to_none=True)
        assert got.loss == float(total) / denom and got.grad_norm == float(norm), step
    for (name, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), name


class _PositionsBatch(Batch):
    """A batch that asks for explicit RoPE positions (as packed SFT samples will: positions restart at every
    document of length `doc`)."""

    def __init__(self, b, doc):
        super().__init__(b.tokens, b.targets, b.loss_mask)
        self.doc = doc

    def model_inputs(self):
        t = self.tokens.shape[1]
        return {"positions": (torch.arange(t) % self.doc).expand(self.tokens.shape[0], t)}

    def to(self, device):
        return self


def test_per_batch_model_inputs_reach_the_forward():
    """batch.model_inputs() keywords go to the model's forward: positions 0..T-1 change nothing, per-document
    positions give exactly the loss of calling the model with them."""
    from llamactl.parallel.head_loss import lm_head_cross_entropy

    windows, mask = _batches(n=4)
    model = build_model(_cfg(), CTX, seed=0)
    plain = Batch.from_windows(windows, mask)
    denom = plain.num_valid
    base = pipeline_step(model, [plain], CTX, lm_loss(model, CTX), denom).loss
    same = pipeline_step(model, [_PositionsBatch(plain, 10**6)], CTX, lm_loss(model, CTX), denom).loss
    shifted = pipeline_step(model, [_PositionsBatch(plain, 5)], CTX, lm_loss(model, CTX), denom).loss
    with torch.no_grad():
        pos = _PositionsBatch(plain, 5).model_inputs()["positions"]
        h = model(plain.tokens, return_hidden=True, positions=pos)
        want = float(lm_head_cross_entropy(h, model.output, plain.targets, CTX, reduction="sum")) / denom
    assert same == base and shifted != base
    assert shifted == pytest.approx(want, rel=1e-12)


class _Windows:
    def __init__(self, windows):
        self.windows = windows

    def __call__(self):
        return [Batch.from_windows(self.windows[i:i + 2]) for i in range(0, len(self.windows), 2)]


def test_validation_rows_and_callbacks(tmp_path):
    """--eval-every: rows with "split": "val" every N steps and after the last, the mean loss over the held-out
    tokens (as a direct forward computes it); training rows carry "split": "train". A callback sees every
    row and can stop the run: it stops after that step with a checkpoint, stopped_by "callback"."""
    from llamactl.parallel.head_loss import lm_head_cross_entropy

    windows, _ = _batches(n=8)
    held_out, _ = _batches(seed=9, n=6)
    seen = []
    cfg = TrainConfig(steps=5, lr=1e-2, eval_every=2)
    model = build_model(_cfg(), CTX, seed=0)
    res = fit(model, CTX, cfg, _ListSource(windows), run_dir=tmp_path / "run", eval_batches=_Windows(held_out),
              callbacks=[lambda tr, row: seen.append((row["split"], row["step"], tr.global_step))],
              show_progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["step"]) for r in rows] == [("train", 1), ("train", 2), ("val", 2), ("train", 3),
                                                       ("train", 4), ("val", 4), ("train", 5), ("val", 5)]
    assert seen == [(r["split"], r["step"], r["step"]) for r in rows]
    full = Batch.from_windows(held_out)
    with torch.no_grad():
        want = float(lm_head_cross_entropy(model(full.tokens, return_hidden=True), model.output, full.targets, CTX,
                                           reduction="sum")) / full.num_valid
    assert rows[-1]["loss"] == pytest.approx(want, rel=1e-6) and rows[-1]["eval_tokens"] == full.num_valid
    assert model.training and res.stopped_by is None and res.exit_code == 0

    stop_at_3 = lambda tr, row: row["split"] == "train" and row["step"] == 3  # noqa: E731
    res = fit(build_model(_cfg(), CTX, seed=0), CTX, TrainConfig(steps=6, lr=1e-2), _ListSource(windows),
              run_dir=tmp_path / "stopped", callbacks=[stop_at_3], show_progress=False)
    assert (res.step, res.stopped_by, res.exit_code, res.checkpoint.name) == (3, "callback", 0, "step-000003")
    with pytest.raises(LlamactlError, match="--eval-every"):
        fit(model, CTX, TrainConfig(steps=2, eval_every=1), _ListSource(windows), run_dir=tmp_path / "x",
            show_progress=False)


# ---- several models in one run (PPO: policy and value) -----------------------------------------------
def _value_loss(values, batch):
    """Squared error of a value head's per-token outputs against targets drawn by the loop (its RNG)."""
    err = (values - batch.value_targets) * batch.loss_mask
    return (err * err).sum()


class _ValueBatch(Batch):
    def __init__(self, b, targets):
        super().__init__(b.tokens, b.targets, b.loss_mask)
        self.value_targets = targets

    def to(self, device):
        return self


def _two_model_run(root, steps, *, stop_after=None, resume=False):
    """A PPO-shaped loop: policy and value trainers stepped in turn; value targets come from the process RNG
    and the data from a resumable source, both kept in the shared train state; saved every 2 steps."""
    from llamactl.runstate import load_run_state, save_run_state
    from llamactl.trainer import rng_state, seed_everything, set_rng_state

    windows, _ = _batches(n=8)
    seed = 99 if resume else 0  # a resumed run starts from other weights: everything must come from disk
    policy = Trainer(build_model(_cfg(), CTX, seed=seed), CTX, TrainConfig(steps=steps, lr=1e-2, warmup=1))
    value = Trainer(build_model(_cfg(), CTX, "value", seed=seed + 1), CTX,
                    TrainConfig(steps=steps, lr=5e-3, schedule="constant"), _value_loss)
    source = _ListSource(windows)
    trainers = {"policy": policy, "value": value}
    seed_everything(5)
    if resume:
        shared = load_run_state(root, trainers, CTX)
        source.load_state_dict(shared["data"])
        set_rng_state(shared["rng"])
    losses = []
    while policy.global_step < steps:
        micro = source.next_step()
        p = policy.step(micro)
        v = value.step([_ValueBatch(b, torch.randn(b.tokens.shape)) for b in micro])
        losses.append((policy.global_step, p.loss, v.loss, p.grad_norm, v.grad_norm))
        if policy.global_step % 2 == 0:
            save_run_state(root, trainers, {"data": source.state_dict(), "rng": rng_state()}, CTX, keep=2)
        if policy.global_step == stop_after:
            break
    return losses, trainers


def test_exact_resume_of_two_trainers_in_one_run(tmp_path):
    """Policy and value trainers saved together (run/policy/, run/value/, one shared state) resume exactly:
    the continued run's losses, norms and final weights of both models equal an uninterrupted run's, bit for
    bit (weights stored in bf16, fp32 masters restored from train_state)."""
    from llamactl import checkpoint
    from llamactl.runstate import state_steps

    import shutil

    straight, ref = _two_model_run(tmp_path / "straight", 5)
    first, _ = _two_model_run(tmp_path / "cut", 5, stop_after=4)
    # killed after both models' step-4 checkpoints, before the shared state of step 4 was complete
    shutil.rmtree(tmp_path / "cut" / "state" / "step-000004")
    assert state_steps(tmp_path / "cut") == [2]
    rest, got = _two_model_run(tmp_path / "cut", 5, resume=True)
    assert [r[0] for r in rest] == [3, 4, 5]
    assert first[:2] + rest == straight and first[2:] == straight[2:4]
    for name in ("policy", "value"):
        assert (got[name].global_step, got[name].tokens) == (ref[name].global_step, ref[name].tokens)
        for (n, a), (_, b) in zip(got[name].model.named_parameters(), ref[name].model.named_parameters()):
            assert torch.equal(a, b), (name, n)
        ck = checkpoint.latest(tmp_path / "cut" / name)   # each model directory is a usable --model
        assert ck.name == "step-000004" and checkpoint.read_meta(ck)["dtype"] == "bfloat16"
    assert state_steps(tmp_path / "straight") == [2, 4]  # keep=2
    assert sorted(p.name for p in (tmp_path / "straight" / "policy").glob("step-*")) == ["step-000002", "step-000004"]
