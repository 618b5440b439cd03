"""The checkpoint format: round trip, atomic writes, hashes, one-line errors, and any-layout reading.

Layout-independence is checked two ways: loading at tp/pp > 1 with a context that has no process groups
(loading needs no communication), and one gloo run that saves at tp=2 x pp=2 and at tp=4 (GQA kv heads
replicated) and must write exactly the tensors of the single-process save.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import make_token_data
import torch
from safetensors import safe_open

from llamactl import checkpoint as C
from llamactl.config import ModelConfig
from llamactl.errors import LlamactlError
from llamactl.model import build_model
from llamactl.parallel.context import ParallelContext
from llamactl.parallel.tensor import shard_specs

# odd-ish shape: GQA, 3 layers (uneven over pp=2), ffn 176 = 11 * 16, vocab of the tiny tokenizer
CFG = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=2048, multiple_of=16, max_seq_len=64)


def _model(head="lm", seed=1, cfg=CFG, ctx=None):
    return build_model(cfg, ctx, head, seed=seed)


def _params(m):
    return {k: v.detach().clone() for k, v in m.named_parameters()}


def _file_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as s:
            for k in s.keys():
                out[k] = s.get_tensor(k)
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_tokenizer):
    """A tp=1 lm checkpoint split into 3 files (small max_shard_bytes) with a train state."""
    m = _model()
    state = {"optimizer": {"state": {0: {"exp_avg": torch.randn(3)}},
                           "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95)}]},
             "rng": {"torch": torch.get_rng_state(), "python": [3, list(range(5)), None]}, "step": 7}
    path = C.save(tmp_path_factory.mktemp("run") / "step-000007", m, tokenizer=tiny_tokenizer, stage="pretrain",
                  step=7, tokens=7000, train_state=state, extra={"note": "x"}, max_shard_bytes=700_000)
    return path, _params(m), state


def test_directory_contents_and_meta(saved, tiny_tokenizer):
    path, params, _ = saved
    names = sorted(p.name for p in path.iterdir())
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) == 3 and shards[0] == "model-00001-of-00003.safetensors"
    assert {"config.json", "model.safetensors.index.json", "tokenizer.model", "llamactl.json",
            "train_state"} <= set(names)
    meta = C.read_meta(path)
    assert (meta["stage"], meta["step"], meta["tokens"], meta["head"]) == ("pretrain", 7, 7000, "lm")
    assert meta["model"] == CFG.to_dict() and meta["parallel"]["tp"] == 1 and meta["extra"] == {"note": "x"}
    assert meta["parameters"] == sum(p.numel() for p in params.values()) == CFG.num_params()
    listed = set(meta["files"])
    on_disk = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} - {"llamactl.json"}
    assert listed == on_disk
    assert (path / "tokenizer.model").read_bytes() == Path(tiny_tokenizer).read_bytes()
    # every tensor under its HF name, whole, equal to the parameter
    tensors = _file_tensors(path)
    assert set(tensors) == {C.to_hf_name(n) for n in params}
    for n, p in params.items():
        assert torch.equal(tensors[C.to_hf_name(n)], p), n
    idx = json.loads((path / "model.safetensors.index.json").read_text())
    assert idx["metadata"]["total_size"] == 4 * CFG.num_params()
    cfg_json = json.loads((path / "config.json").read_text())
    assert cfg_json["intermediate_size"] == CFG.ffn_dim == 176 and cfg_json["architectures"] == ["LlamaForCausalLM"]
    assert C.verify(path) == []


def test_round_trip_and_train_state(saved):
    path, params, state = saved
    m, meta = C.load_model(path)
    assert meta["step"] == 7
    got = _params(m)
    assert got.keys() == params.keys() and all(torch.equal(got[k], params[k]) for k in params)
    st = C.load_train_state(path, ParallelContext.single())
    assert st["step"] == 7 and st["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert torch.equal(st["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert torch.equal(st["rng"]["torch"], state["rng"]["torch"]) and st["rng"]["python"] == [3, list(range(5)), None]
    with pytest.raises(LlamactlError, match="same layout"):
        C.load_train_state(path, ParallelContext(tp=2, rank=1, tp_ranks=[0, 1]))
    assert C.tokenizer_path(path) == path / "tokenizer.model"
    assert C.load_config(path) == (CFG, "lm")


def test_load_reads_only_slices_for_any_layout(saved):
    """tp=2, tp=4 (kv heads replicated on 2 ranks each), pp=2 and tp=2 x pp=2: each rank's slices."""
    path, params, _ = saved
    layouts = [(2, 1), (4, 1), (1, 2), (2, 2)]
    for tp, pp in layouts:
        for rank in range(tp * pp):
            ctx = ParallelContext(tp=tp, pp=pp, rank=rank, tp_ranks=list(range(tp)))
            ctx._kv_groups[CFG.kv_heads] = None  # no process groups: loading needs no communication
            m = build_model(CFG, ctx)
            C.load(path, m, ctx)
            specs = shard_specs(m)
            for n, p in m.named_parameters():
                full = params[n]
                s = specs.get(n)
                want = full if s is None else full.narrow(s.dim, s.start, s.length)
                assert torch.equal(p, want), (tp, pp, rank, n)
            if tp == 4:  # GQA: ranks 0,1 share kv head 0; 2,3 share kv head 1
                s = specs["layers.0.attention.wk.weight"]
                assert (s.start, s.length) == ((rank // 2) * CFG.head_dim, CFG.head_dim)


def test_overwrite_refused_then_replaced(tmp_path):
    a, b = _model(seed=1), _model(seed=2)
    p = C.save(tmp_path / "ck", a)
    with pytest.raises(LlamactlError, match="already exists"):
        C.save(tmp_path / "ck", b)
    C.save(tmp_path / "ck", b, overwrite=True)
    got, _ = C.load_model(p)
    assert torch.equal(got.layers["0"].attention.wq.weight, b.layers["0"].attention.wq.weight)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ck"]  # no temporary or old directories left


def test_failure_after_first_shard_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch as st

    real, calls = st.save_file, []

    def failing(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(st, "save_file", failing)
    with pytest.raises(OSError):
        C.save(tmp_path / "ck", _model(), max_shard_bytes=700_000)
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def test_killed_mid_write_never_looks_complete(tmp_path):
    """A process killed (os._exit) after its first shard: the old checkpoint stays the latest."""
    run = tmp_path / "run"
    first = C.save(run / "step-000001", _model(seed=1), step=1)
    C.set_latest(run, first)
    code = textwrap.dedent(f"""
        import os, safetensors.torch as st
        from llamactl import checkpoint as C
        from llamactl.config import ModelConfig
        from llamactl.model import build_model
        real, n = st.save_file, []
        def dying(t, p, metadata=None):
            real(t, p, metadata=metadata); n.append(p)
            if len(n) == 1: os._exit(9)
        st.save_file = dying
        cfg = ModelConfig(**{CFG.to_dict()!r})
        C.save({str(run / 'step-000002')!r}, build_model(cfg, seed=2), step=2, max_shard_bytes=700_000)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 9, r.stderr
    leftovers = [p for p in run.iterdir() if p.name.startswith(".step-000002.tmp-")]
    assert len(leftovers) == 1 and not (run / "step-000002").exists()
    assert any(leftovers[0].glob("*.safetensors"))  # it really was killed mid-write
    assert C.latest(run) == first
    (run / "latest").unlink()
    assert C.latest(run) == first  # the scan ignores the temporary directory too
    with pytest.raises(LlamactlError, match="incomplete checkpoint"):
        C.load_model(leftovers[0])


def test_corrupted_shard_named(tmp_path, saved, capsys):
    import shutil

    from llamactl.cli import main

    src, _, _ = saved
    path = tmp_path / "ck"
    shutil.copytree(src, path)
    shard = path / "model-00002-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert C.verify(path) == ["shard model-00002-of-00003.safetensors is corrupted (sha256 mismatch)"]
    with pytest.raises(LlamactlError, match="model-00002-of-00003.safetensors is corrupted"):
        C.load_model(path)
    C.load_model(path, verify=False)  # the damage is in the data, not the header
    with pytest.raises(SystemExit) as e:
        main(["info", str(path)])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: shard model-00002-of-00003.safetensors is corrupted (sha256 mismatch) ({path})"
    (path / "model-00003-of-00003.safetensors").unlink()
    assert "shard model-00003-of-00003.safetensors is missing" in C.verify(path)


def test_info_shows_contents(saved, capsys):
    from llamactl.cli import main

    path, _, _ = saved
    main(["info", str(path)])
    out = capsys.readouterr().out
    n_files = len(C.read_meta(path)["files"])
    for s in ("pretrain", "7,000", f"{CFG.num_params():,}", "model-00003-of-00003.safetensors",
              f"all {n_files} files verified"):
        assert s in out, s


def test_one_line_errors(tmp_path, saved, tiny_tokenizer):
    path, _, _ = saved
    with pytest.raises(LlamactlError, match="checkpoint directory not found"):
        C.load_model(tmp_path / "nope")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hi")
    with pytest.raises(LlamactlError, match="not a checkpoint directory"):
        C.load_model(junk)
    (junk / "llamactl.json").write_text("{not json")
    with pytest.raises(LlamactlError, match="llamactl.json is not valid JSON"):
        C.read_meta(junk)
    # wrong model config: the field is named
    other = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=2048, multiple_of=16)
    with pytest.raises(LlamactlError, match="n_layers=3 but the model has n_layers=2"):
        C.load(path, build_model(other))
    # a tokenizer whose vocabulary does not match the model
    small = ModelConfig(dim=64, n_layers=1, n_heads=4, vocab_size=1000, multiple_of=16)
    with pytest.raises(LlamactlError, match="2,048 pieces but the model's vocab_size is 1,000"):
        C.save(tmp_path / "s", build_model(small, seed=0), tokenizer=tiny_tokenizer)
    ck = C.save(tmp_path / "s", build_model(small, seed=0))
    (ck / "tokenizer.model").write_bytes(Path(tiny_tokenizer).read_bytes())
    with pytest.raises(LlamactlError, match="2,048 pieces"):
        C.load_model(ck)
    (ck / "tokenizer.model").write_text("not a model")
    with pytest.raises(LlamactlError, match="not a SentencePiece model"):
        C.load_model(ck)
    # heads: an lm checkpoint is no reward model unless asked for a fresh head
    with pytest.raises(LlamactlError, match="lm head but the model a reward head"):
        C.load(path, build_model(CFG, head="reward"))
    rm, _ = C.load_model(path, head="reward")
    assert rm.score.weight.abs().sum() > 0 and torch.isfinite(rm.score.weight).all()
    # train state values torch.load(weights_only=True) could not read are refused up front
    import numpy as np

    with pytest.raises(LlamactlError, match=r"train_state\['rng'\] is a ndarray"):
        C.save(tmp_path / "t", build_model(small, seed=0), train_state={"rng": np.zeros(3)})
    assert not (tmp_path / "t").exists()


def test_latest_pointer(tmp_path):
    """`latest` is written after each checkpoint, but the newest complete checkpoint wins over a stale one."""
    run = tmp_path / "run"
    assert C.latest(run) is None
    a = C.save(run / "step-000002", _model(), step=2)
    b = C.save(run / "step-000010", _model(), step=10)
    assert C.latest(run) == b  # no pointer: the highest step
    C.set_latest(run, a)
    assert (run / "latest").read_text().strip() == "step-000002"
    assert C.latest(run) == b  # a kill between publishing step 10 and rewriting `latest`: still step 10
    assert C.resolve(run) == b and C.resolve(run / "latest") == b
    (run / ".step-000011.tmp-x").mkdir()  # a half-written newer one does not count
    (run / "step-000012").mkdir()         # nor a directory without llamactl.json
    assert C.latest(run) == b
    outside = C.save(tmp_path / "elsewhere", _model(), step=20)
    C.set_latest(run, outside)            # a pointer out of the run dir is one more candidate
    assert C.latest(run) == outside
    import shutil

    shutil.rmtree(outside)
    shutil.rmtree(b)
    assert C.latest(run) == a  # pointer to a deleted checkpoint: the newest complete one left


def test_reward_head_round_trip(tmp_path):
    m = _model("reward", seed=3)
    p = C.save(tmp_path / "rm", m, stage="reward")
    cfg_json = json.loads((p / "config.json").read_text())
    assert cfg_json["architectures"] == ["LlamaForSequenceClassification"] and cfg_json["num_labels"] == 1
    assert "score.weight" in _file_tensors(p)
    v, meta = C.load_model(p, head="value")  # a value model starts from the reward model
    assert v.head == "value" and torch.equal(v.score.weight, m.score.weight)
    assert meta["parameters"] == sum(x.numel() for x in m.parameters())


def test_ffn_rule_inference():
    from llamactl.config import PRESETS

    for name, cfg in PRESETS.items():
        mult_of, mult = C.infer_ffn_rule(cfg.dim, cfg.ffn_dim)
        again = ModelConfig(dim=cfg.dim, n_layers=1, n_heads=cfg.n_heads, multiple_of=mult_of, ffn_dim_multiplier=mult)
        assert again.ffn_dim == cfg.ffn_dim, name
    assert C.infer_ffn_rule(8192, 28672) == (4096, 1.3)  # Llama 2 70B
    assert C.infer_ffn_rule(4096, 11008) == (256, None)  # 7B
    for dim, size in [(64, 100), (64, 171), (100, 300), (96, 7)]:
        mult_of, mult = C.infer_ffn_rule(dim, size)
        assert ModelConfig(dim=dim, n_layers=1, n_heads=2, multiple_of=mult_of, ffn_dim_multiplier=mult).ffn_dim == size


# ---- saving at tp > 1 / pp > 1 needs real processes ---------------------------------------------------
MQA = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=1, vocab_size=2048, multiple_of=16, max_seq_len=64)
DIST_CASES = [("tp2", CFG, 2, 1, 700_000), ("pp2", CFG, 1, 2, C.DEFAULT_MAX_SHARD_BYTES),
              ("tp2-mqa", MQA, 2, 1, C.DEFAULT_MAX_SHARD_BYTES)]  # one kv head replicated on both tp ranks


def _dist_save(rank, world, out: str):
    import torch.distributed as dist

    for name, cfg, tp, pp, max_bytes in DIST_CASES:
        ctx = ParallelContext.from_world(tp=tp, pp=pp)
        m = build_model(cfg, ctx, seed=1)
        state = {"rank": torch.tensor([rank]), "layout": [tp, pp]}
        p = C.save(Path(out) / name, m, ctx, stage="pretrain", step=3, train_state=state, max_shard_bytes=max_bytes)
        assert p.is_dir()  # every rank returns after the rename
        m2 = build_model(cfg, ctx)
        C.load(p, m2, ctx)
        assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))
        assert C.load_train_state(p, ctx)["rank"].item() == rank
        # bf16 weights: every rank gets its exact fp32 shard back from the masters of its (tp, pp) coordinates
        q = C.save(Path(out) / f"{name}-bf16", m, ctx, step=3, train_state=state, dtype=torch.bfloat16)
        m3 = build_model(cfg, ctx)
        C.load(q, m3, ctx)
        assert C.load_train_state(q, ctx, model=m3)["rank"].item() == rank
        assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m3.parameters()))
        dist.barrier()


def test_save_at_tp_and_pp_equals_single_process(tmp_path):
    from dist_utils import spawn

    spawn(_dist_save, 2, str(tmp_path))
    for name, cfg, tp, pp, max_bytes in DIST_CASES:
        ref = C.save(tmp_path / f"ref-{name}", _model(seed=1, cfg=cfg), max_shard_bytes=max_bytes)
        want = _file_tensors(ref)
        p = tmp_path / name
        assert len(list(p.glob("*.safetensors"))) == len(list(ref.glob("*.safetensors"))) * pp
        got = _file_tensors(p)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
        meta = C.read_meta(p)
        assert meta["parallel"] == {"tp": tp, "pp": pp, "dp": 1, "virtual_stages": 1, "world_size": 2}
        assert len(list((p / "train_state").iterdir())) == 2 and C.verify(p) == []
    # stage files: the first holds the embedding and the first layers, the last the norm and head
    wm = json.loads((tmp_path / "pp2" / "model.safetensors.index.json").read_text())["weight_map"]
    first = "model-00001-of-00002.safetensors"
    assert wm["model.embed_tokens.weight"] == wm["model.layers.0.self_attn.q_proj.weight"] == first
    assert wm["lm_head.weight"] == wm["model.norm.weight"] == "model-00002-of-00002.safetensors"


# ---- save dtype: narrow exported weights, exact fp32 masters in the train state ---------------------------
def test_bf16_save_keeps_fp32_masters_for_exact_resume(tmp_path, tiny_tokenizer):
    """Two AdamW steps, a bf16 save with train state, two more steps == the same four steps resumed from it."""
    torch.manual_seed(0)
    tokens = torch.randint(0, CFG.vocab_size, (2, 17))

    def train(m, opt, n):
        for _ in range(n):
            loss = torch.nn.functional.cross_entropy(m(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    m = _model(seed=4)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    train(m, opt, 2)
    p = C.save(tmp_path / "ck", m, tokenizer=tiny_tokenizer, dtype=torch.bfloat16,
               train_state={"optimizer": opt.state_dict()})
    train(m, opt, 2)
    # the exported weights are bf16 (files, config.json, llamactl.json) and differ from the fp32 masters
    assert {t.dtype for t in _file_tensors(p).values()} == {torch.bfloat16}
    assert json.loads((p / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert C.read_meta(p)["dtype"] == "bfloat16" and C.verify(p) == []
    r, _ = C.load_model(p)
    assert next(r.parameters()).dtype == torch.float32
    narrowed = _params(r)
    st = C.load_train_state(p, ParallelContext.single(), model=r)
    restored = _params(r)
    assert any(not torch.equal(narrowed[k], restored[k]) for k in restored)
    assert all(torch.equal(restored[k].bfloat16(), narrowed[k].bfloat16()) for k in restored)
    opt2 = torch.optim.AdamW(r.parameters(), lr=1e-2)
    opt2.load_state_dict(st["optimizer"])
    train(r, opt2, 2)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), r.parameters()))


def test_save_dtype_without_train_state_and_same_dtype(tmp_path):
    m = _model(seed=5)
    p = C.save(tmp_path / "h", m, dtype=torch.float16)  # no train state: no masters written
    assert {t.dtype for t in _file_tensors(p).values()} == {torch.float16}
    assert not (p / "train_state").exists()
    q = C.save(tmp_path / "f", m, dtype=torch.float32, train_state={"step": 1})  # lossless: no masters either
    assert sorted(x.name for x in (q / "train_state").iterdir()) == ["rank00000.pt"]
    assert {t.dtype for t in _file_tensors(C.save(tmp_path / "b", m, dtype="bf16")).values()} == {torch.bfloat16}
    for bad in (torch.int8, "int8"):
        with pytest.raises(LlamactlError, match="unknown dtype .*int8.*; one of float32, bfloat16, float16 .--save-dtype."):
            C.save(tmp_path / "i", m, dtype=bad)
    assert not (tmp_path / "i").exists()


# ---- one verification per load, one policy for every loader ---------------------------------------------
@pytest.fixture(scope="module")
def token_data(tiny_corpus, tiny_tokenizer, tmp_path_factory) -> Path:
    return make_token_data(tiny_corpus, tiny_tokenizer, tmp_path_factory, 300, 0.2)


def test_eval_load_hashes_each_file_once(tmp_path, tiny_tokenizer, token_data, monkeypatch):
    """`eval --model RUN`: every model file hashed exactly once, llamactl.json parsed once, no train state."""
    import collections

    import llamactl.checkpoint.read as R
    import llamactl.data as D
    from llamactl.stages.evaluate import run_eval

    run = tmp_path / "run"
    C.save(run / "step-000001", _model(), tokenizer=tiny_tokenizer, step=1, train_state={"step": 1})
    ck = C.save(run / "step-000002", _model(), tokenizer=tiny_tokenizer, step=2, train_state={"step": 2},
                max_shard_bytes=700_000)
    C.set_latest(run, ck)
    want = [n for n in C.read_meta(ck)["files"] if not n.startswith("train_state/")]
    assert len(want) == 6  # 3 shards, config.json, the index, tokenizer.model
    hashed, parsed = collections.Counter(), collections.Counter()
    for mod, fn in [(R, "sha256_file"), (D, "sha256_file")]:
        real = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda p, real=real: hashed.update([str(p)]) or real(p))
    real_json = R.read_json
    monkeypatch.setattr(R, "read_json", lambda p, what: parsed.update([str(p)]) or real_json(p, what))
    res = run_eval(run, token_data, seq_len=32, max_tokens=64)
    assert res.tokens == 64
    assert hashed == collections.Counter(str(ck / n) for n in want)
    assert parsed[str(ck / "llamactl.json")] == 1 and not any("step-000001" in p for p in parsed)


def test_missing_config_json_refused_by_every_loader(tmp_path, tiny_tokenizer, token_data):
    """A llamactl checkpoint without its config.json is damaged: eval, generate and load all say so."""
    import shutil

    from llamactl.generation import load_for_generation
    from llamactl.stages.evaluate import run_eval

    ck = C.save(tmp_path / "ck", _model(), tokenizer=tiny_tokenizer)
    (ck / "config.json").unlink()
    msg = f"file config.json is missing ({ck}"
    for load in (lambda: C.load_model(ck), lambda: load_for_generation(ck, device="cpu"),
                 lambda: run_eval(ck, token_data, seq_len=32, max_tokens=64)):
        with pytest.raises(LlamactlError) as e:
            load()
        assert str(e.value).startswith(msg), str(e.value)
    assert str(e.value) == f"file config.json is missing ({ck}, --model)"
    # a plain Hugging Face directory (no llamactl.json) still loads: its config.json is the description
    hf = tmp_path / "hf"
    shutil.copytree(C.save(tmp_path / "ck2", _model(seed=2)), hf)
    (hf / "llamactl.json").unlink()
    assert C.read_meta(hf)["format"] == "hf" and torch.equal(C.load_model(hf)[0].norm.weight, _model(seed=2).norm.weight)


# ---- a run dir after kills: stale `latest`, re-saved steps, leftovers -------------------------------------
def test_stale_latest_resave_and_leftovers(tmp_path):
    """Issue 13's reproduction at the API: delete the last step, point `latest` two steps back; resume must
    take the newest complete step, and saving the next steps (even one that exists) must work."""
    from llamactl import rundir

    run = tmp_path / "run"
    m = _model()
    for s in (1, 2, 3):
        rundir.set_latest(run, C.save(run / f"step-00000{s}", m, step=s, train_state={"step": s}))
    import shutil

    shutil.rmtree(run / "step-000003")
    rundir.set_latest(run, run / "step-000001")
    (run / ".step-000003.tmp-dead").mkdir()                  # a killed save
    (run / ".step-000002.old-dead").mkdir()                  # a killed replace / delete
    (run / ".latest.dead").write_text("step-000003\n")       # a killed pointer update
    assert C.latest(run).name == "step-000002"
    assert rundir.recover(run).name == "step-000002"
    assert sorted(p.name for p in run.iterdir()) == ["latest", "step-000001", "step-000002"]
    assert (run / "latest").read_text().strip() == "step-000002"
    # the same step saved again (a resume that recomputed it) replaces it atomically; another path is refused
    m2 = _model(seed=9)
    C.save(run / "step-000002", m2, step=2, train_state={"step": 2})
    assert torch.equal(C.load_model(run / "step-000002")[0].norm.weight, m2.norm.weight)
    with pytest.raises(LlamactlError, match="already exists"):
        C.save(run / "step-000001", m2, step=2)
    # leftovers are removed by the run's next save, not by readers
    (run / ".step-000004.tmp-dead").mkdir()
    assert C.latest(run).name == "step-000002" and (run / ".step-000004.tmp-dead").exists()
    C.save(run / "step-000003", m, step=3)
    assert sorted(p.name for p in run.iterdir()) == ["latest", "step-000001", "step-000002", "step-000003"]
    rundir.remove_checkpoint(run / "step-000001")
    assert [p.name for p in rundir.list_checkpoints(run)] == ["step-000002", "step-000003"]


def test_truncate_metrics_is_atomic_and_drops_torn_rows(tmp_path, monkeypatch):
    from llamactl import rundir

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    rundir.truncate_metrics(path, 1)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n'
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')

    def killed(*a, **k):
        raise KeyboardInterrupt  # stands for a kill while the new file is written

    monkeypatch.setattr(rundir.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        rundir.truncate_metrics(path, 1)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
