"""`llamactl sft`: loss only on answers (decoded back), packing per epoch and the step count, packed rows
without cross-attention equal each sample alone, training losses at tp 2 / pp 2 / dp 2 equal one process,
bit-exact resume after SIGTERM, the checkpoint answering in chat, one-line errors and the dry run."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_utils import spawn
from llamactl.errors import LlamactlError

WORDS = ["amber", "basil", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper", "kettle",
         "lantern", "meadow", "nutmeg", "orchid", "pebble", "quartz", "raven", "saffron", "thistle"]


def _dialogs() -> list[dict]:
    """Single- and multi-turn dialogues (system prompts, prompt/response lines), answers easy to recognise."""
    out = []
    for i in range(18):
        a, b, c = WORDS[i % 20], WORDS[(i + 7) % 20], WORDS[(i + 13) % 20]
        if i % 3 == 0:
            out.append({"prompt": f"Which word comes after {a}?", "response": f"The word {b} comes after it."})
        elif i % 3 == 1:
            out.append({"messages": [{"role": "system", "content": "Answer in a few words."},
                                     {"role": "user", "content": f"Say {a} twice."},
                                     {"role": "assistant", "content": f"{a} {a}"},
                                     {"role": "user", "content": f"Now name {b}."},
                                     {"role": "assistant", "content": f"{c} and {b}"}]})
        else:
            out.append({"messages": [{"role": "user", "content": f"Pick {c} or {a}"},
                                     {"role": "assistant", "content": f"I pick {c}."}]})
    return out


def _answers(d: dict) -> list[str]:
    if "response" in d:
        return [d["response"]]
    return [m["content"] for m in d["messages"] if m["role"] == "assistant"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny shapes: one thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def files(tiny_tokenizer, tmp_path_factory) -> dict:
    """A pretrained-checkpoint stand-in (seeded random weights, vocab of the tiny tokenizer), SFT and val data."""
    from llamactl import checkpoint
    from llamactl.config import ModelConfig
    from llamactl.model import build_model

    root = tmp_path_factory.mktemp("sft")
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=2048, multiple_of=16, max_seq_len=128)
    init = checkpoint.save(root / "init", build_model(cfg, seed=0), tokenizer=tiny_tokenizer, stage="pretrain")
    dialogs = _dialogs()
    data, val = root / "train.jsonl", root / "val.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in dialogs))
    val.write_text("".join(json.dumps(d) + "\n" for d in dialogs[::4]))
    return {"init": str(init), "data": str(data), "val": str(val), "dialogs": dialogs, "root": root}


def _flags(files, out, **kw) -> dict:
    f = dict(init=files["init"], data=files["data"], out=str(out), seq_len=32, batch_size=4, micro_batch=1,
             lr=1e-2, steps=4, peak_flops=1e11, save_dtype="float32")
    f.update(kw)
    return f


def _rows(run: Path, split: str = "train") -> list[dict]:
    return [r for r in (json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


# ---- data: masks and packing --------------------------------------------------------------------------
def test_loss_falls_exactly_on_the_answers(files, tmp_path):
    """Decode the loss-carrying targets of every packed sample (the batch the trainer receives): they are the
    sample's answers, each followed by EOS, in order, every assistant turn of multi-turn dialogues included;
    every other target is ignored."""
    from llamactl.data import IGNORE
    from llamactl.sft_data import SFTBatches
    from llamactl.stages import sft
    from llamactl.tokenizer import Tokenizer

    plan = sft.resolve(_flags(files, tmp_path, seq_len=128, steps=None), None, {})
    tok = Tokenizer.load(plan.tokenizer)
    assert plan.stats.truncated == 0 and plan.stats.samples == len(files["dialogs"])
    src = SFTBatches(plan.samples, 128, pad_id=tok.eos_id, micro_batch=1, seed=0)
    b = src.rows().batch()  # all rows of epoch 0, as next_step cuts them
    assert torch.equal(b.targets == IGNORE, ~b.loss_mask)
    n_loss = 0
    for i, d in enumerate(files["dialogs"]):
        ids = b.targets[(b.doc_ids == i) & b.loss_mask].tolist()  # a loss target's input is of the same sample
        assert ids and ids[-1] == tok.eos_id, i
        runs, cur = [], []
        for t in ids:
            if t == tok.eos_id:
                runs.append(tok.decode(cur).strip())
                cur = []
            else:
                cur.append(t)
        assert runs == _answers(d), (i, runs)
        n_loss += len(ids)
    assert n_loss == int(b.loss_mask.sum()) == plan.stats.answer_tokens


def test_packing_per_epoch_and_steps_from_the_data_size(files, tmp_path):
    """Every sample lies whole (a longer one truncated to a row) inside one row once per epoch, starting with BOS at RoPE position 0 of its own;
    epochs are reshuffled; the default steps are 2 epochs of packed rows over the batch, rounded up."""
    from llamactl.sft_data import SFTBatches
    from llamactl.stages import sft
    from llamactl.tokenizer import Tokenizer

    plan = sft.resolve(_flags(files, tmp_path, steps=None, seq_len=48, batch_size=3, micro_batch=None), None, {})
    tok = Tokenizer.load(plan.tokenizer)
    c = plan.cfg
    assert c.epochs == 2 and c.lr == 1e-2 and c.micro_batch == 3 and plan.accum == 1
    assert c.steps == math.ceil(sum(plan.stats.rows_per_epoch) / 3)
    src = SFTBatches(plan.samples, 48, pad_id=tok.eos_id, micro_batch=1, seed=0)
    orders = []
    for epoch in (0, 1):
        src.load_state_dict({"seed": 0, "epoch": epoch, "position": 0})
        rows = src.rows()
        assert rows.tokens.shape[1] == 49 and len(rows) == plan.stats.rows_per_epoch[epoch]
        b = rows.batch()
        pos = sft.packed_inputs(False)(b)[1]["positions"]
        order = []
        for r in range(len(rows)):
            docs = rows.doc_ids[r]
            for d in dict.fromkeys(docs.tolist()):
                if d < 0:
                    assert (docs[list(docs).index(d):] == -1).all(), "padding only at the end of a row"
                    continue
                at = (docs == d).nonzero()[0]
                assert at.tolist() == list(range(at[0], at[-1] + 1)), "a sample is contiguous"
                assert rows.tokens[r, at].tolist() == plan.samples[d][0][:49], "whole (or cut to one row)"
                assert rows.tokens[r, at[0]] == tok.bos_id
                if at[-1] < 48:
                    assert pos[r, at].tolist() == list(range(len(at)))
                order.append(d)
        assert sorted(order) == list(range(len(plan.samples))), "each sample once per epoch"
        orders.append(order)
    assert orders[0] != orders[1]


def test_no_cross_attention_rows_equal_each_sample_alone(files, tmp_path):
    """With --no-cross-attention, the logits of a packed row equal each sample run alone (fp32, 1e-5); with
    the default plain concatenation the later samples of a row see the earlier ones and differ."""
    from llamactl import checkpoint
    from llamactl.sft_data import SFTBatches
    from llamactl.stages import sft

    plan = sft.resolve(_flags(files, tmp_path, seq_len=64), None, {})
    model, _ = checkpoint.load_model(plan.cfg.init)
    model.eval()
    src = SFTBatches(plan.samples, 64, pad_id=2, micro_batch=1, seed=0)
    b = src.rows().batch()
    with torch.no_grad():
        ids, kw = sft.packed_inputs(False)(b)
        apart = model(ids, **kw)
        ids, kw = sft.packed_inputs(True)(b)
        together = model(ids, **kw)
    checked = later = 0
    for r in range(b.tokens.shape[0]):
        docs = b.doc_ids[r]
        for k, d in enumerate(dict.fromkeys(docs.tolist())):
            if d < 0:
                continue
            at = (docs == d).nonzero().squeeze(1)
            with torch.no_grad():
                alone = model(b.tokens[r, at][None])[0]
            torch.testing.assert_close(apart[r, at], alone, rtol=1e-5, atol=1e-5)
            checked += 1
            if k > 0:
                later += 1
                assert (together[r, at] - alone).abs().max() > 1e-3
    assert checked == len(plan.samples) and later > 0


# ---- training at every layout ---------------------------------------------------------------------------
LAYOUTS = [  # (tp, pp, cross_attention)
    (2, 1, False), (1, 2, False), (1, 1, True), (1, 1, False)]  # the last two: 2-way data parallel


def _layouts(rank, world, files, root):
    """Rank 0 trains the one-process references (with and without cross-attention); then each layout trains
    on both ranks through the stage's run, and its train and val rows equal the reference's to 1e-5."""
    import torch.distributed as dist

    from llamactl.parallel.context import ParallelContext
    from llamactl.stages import sft

    root = Path(root)
    flags = lambda out, cross: _flags(files, root / out, cross_attention=cross, val=files["val"], eval_every=2,  # noqa: E731
                                      seq_len=96)  # rows of several samples; 4 steps cross into epoch 2
    if rank == 0:
        for cross in (True, False):
            sft.run(sft.resolve(flags(f"ref-{cross}", cross), None, {}), ParallelContext.single(), show_progress=False)
    dist.barrier()
    for tp, pp, cross in LAYOUTS:
        tag = f"tp{tp}-pp{pp}-dp{world // (tp * pp)}-{cross}"
        plan = sft.resolve(flags(tag, cross), None, {"tp": tp, "pp": pp, "nproc": world})
        assert plan.dp == world // (tp * pp)
        res = sft.run(plan, ParallelContext.from_world(tp, pp), show_progress=False)
        assert res.step == 4
        dist.barrier()
        if rank != 0:
            continue
        for split in ("train", "val"):
            got, want = _rows(root / tag, split), _rows(root / f"ref-{cross}", split)
            assert [r["step"] for r in got] == [r["step"] for r in want] and got, (tag, split)
            for a, b in zip(got, want):
                assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=0), (tag, split, a["step"])
                if split == "train":
                    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5, abs=0), (tag, a["step"])
    if rank == 0:
        ref = _rows(root / "ref-True")
        assert ref[0]["loss"] - ref[-1]["loss"] > 0.1, "training must move the loss, or equality proves little"
        assert _rows(root / "ref-True")[0]["loss"] != _rows(root / "ref-False")[0]["loss"]


def test_losses_at_tp2_pp2_dp2_equal_one_process(files, tmp_path):
    spawn(_layouts, 2, files, str(tmp_path))


def test_resume_after_sigterm_is_bit_exact(files, tmp_path, monkeypatch):
    """SIGTERM after step 3 of 6: the stage saves and stops; --resume continues to the uninterrupted run's
    metrics (train and val rows) and weights, bit for bit."""
    from llamactl import checkpoint
    from llamactl.parallel.context import ParallelContext
    from llamactl.stages import sft

    ctx = ParallelContext.single()
    kw = dict(steps=6, save_every=2, val=files["val"], eval_every=2, save_dtype="bfloat16", cross_attention=False)
    straight = sft.run(sft.resolve(_flags(files, tmp_path / "straight", **kw), None, {}), ctx, show_progress=False)
    monkeypatch.setenv("LLAMACTL_FAULT_AT_STEP", "3")
    monkeypatch.setenv("LLAMACTL_FAULT_SIGNAL", "TERM")
    plan = sft.resolve(_flags(files, tmp_path / "cut", **kw), None, {})
    cut = sft.run(plan, ctx, show_progress=False)
    assert cut.stopped_by == "SIGTERM" and cut.step == 3 and cut.exit_code == 143
    monkeypatch.delenv("LLAMACTL_FAULT_AT_STEP")
    done = sft.run(sft.resolve(_flags(files, tmp_path / "cut", **kw), None, {}), ctx, resume=True,
                   show_progress=False)
    assert done.step == 6
    a = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    b = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    drop = lambda rows: [{k: v for k, v in json.loads(r).items() if k not in ("tokens_per_s", "mfu")} for r in rows]  # noqa: E731
    assert drop(a) == drop(b) and len(a) == 6 + 3
    ma, mb = checkpoint.read_meta(straight.checkpoint), checkpoint.read_meta(done.checkpoint)
    weights = [n for n in ma["files"] if n.endswith(".safetensors") or "masters" in n]
    assert weights and all(ma["files"][n] == mb["files"][n] for n in weights)
    other = tmp_path / "other.jsonl"  # resuming on other data or packing would not continue the same stream
    other.write_text(Path(files["data"]).read_text().replace("comes after", "follows"))
    for change, flag in ((dict(data=str(other)), "--data"), (dict(seq_len=48), "--seq-len"),
                         (dict(cross_attention=True), "--no-cross-attention")):
        with pytest.raises(LlamactlError, match=flag):
            sft.run(sft.resolve(_flags(files, tmp_path / "cut", **{**kw, **change}), None, {}), ctx, resume=True,
                    show_progress=False)


def test_checkpoint_is_a_chat_model(files, tmp_path):
    """A dialogue learned by SFT comes back from `llamactl chat`'s session on the written checkpoint
    (stage "sft", the --init tokenizer), in the Llama 2-Chat format it was trained in."""
    from llamactl import checkpoint
    from llamactl.chat import ChatSession, ChatSettings
    from llamactl.generation import load_for_generation
    from llamactl.parallel.context import ParallelContext
    from llamactl.stages import sft

    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"prompt": "What is the password?", "response": "quartz lantern"}) + "\n")
    plan = sft.resolve(_flags(files, tmp_path / "run", data=str(data), steps=40, schedule="constant"), None, {})
    res = sft.run(plan, ParallelContext.single(), show_progress=False)
    meta = checkpoint.read_meta(res.checkpoint)
    assert meta["stage"] == "sft" and meta["extra"]["init"] == files["init"]
    assert (res.checkpoint / "tokenizer.model").read_bytes() == (Path(files["init"]) / "tokenizer.model").read_bytes()
    model, tok = load_for_generation(tmp_path / "run", "cpu")
    answer, _ = ChatSession(model, tok, ChatSettings(temperature=0.0, max_new_tokens=8)).reply("What is the password?")
    assert answer == "quartz lantern"


# ---- user errors and the dry run ----------------------------------------------------------------------
@pytest.mark.parametrize("change, needle", [
    (dict(init=None), "--init"),
    (dict(init="/nonexistent/ckpt"), "--init"),
    (dict(data=None), "--data"),
    (dict(seq_len=129), "--seq-len"),
    (dict(batch_size=5, micro_batch=2), "--batch-size"),
    (dict(eval_every=2), "--val"),
    (dict(overflow="drop"), "--overflow"),
    (dict(lr=0.0), "--lr"),
    (dict(epochs=0, steps=None), "--epochs"),
])
def test_bad_settings_are_one_line_naming_the_flag(files, tmp_path, change, needle):
    from llamactl.stages import sft

    with pytest.raises(LlamactlError) as e:
        sft.resolve(_flags(files, tmp_path, **change), None, {})
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_data_names_file_and_line(files, tmp_path):
    from llamactl.stages import sft

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(files["dialogs"][0]) + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(LlamactlError, match=rf"{bad}:2.*--data"):
        sft.resolve(_flags(files, tmp_path, data=str(bad)), None, {})
    with pytest.raises(LlamactlError, match=rf"{bad}:2.*--val"):
        sft.resolve(_flags(files, tmp_path, val=str(bad)), None, {})
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "x " * 40, "response": "y"}) + "\n")
    with pytest.raises(LlamactlError, match="--seq-len"):
        sft.resolve(_flags(files, tmp_path, data=str(long), overflow="refuse"), None, {})


def test_cli_dry_run_and_error_line(files, tmp_path):
    """Through the command line: --dry-run prints the packing and the steps and writes nothing; a bad flag
    is one `error:` line, exit 1."""
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    base = [sys.executable, "-m", "llamactl", "sft", "--init", files["init"], "--data", files["data"],
            "--out", str(tmp_path / "run"), "--seq-len", "48", "--batch-size", "4", "--nproc", "2", "--tp", "2"]
    p = subprocess.run(base + ["--dry-run"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "packed rows per epoch" in p.stdout and "tp 2 x pp 1 x dp 1" in p.stdout
    assert not (tmp_path / "run").exists()
    p = subprocess.run(base + ["--batch-size", "3", "--tp", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 1 and p.stderr.strip().count("\n") == 0 and p.stderr.startswith("error:")
    assert "--batch-size" in p.stderr
