"""Multi-node launch for real: two torchrun agents on this machine, joined by node 0's rendezvous endpoint
(--nnodes 2 --node-rank r --master-addr --master-port, what a cluster's nodes run), train a tp 2 x dp 2
pretrain through the CLI, stop on SIGTERM after a checkpoint, resume with --resume on both agents and end
with exactly the losses of the same run launched on one node (--nproc 4)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from dist_utils import free_port
from llamactl.parallel.launch import LaunchConfig, torchrun_args


def test_rendezvous_arguments_for_several_nodes():
    """nnodes > 1: torchrun's static rendezvous at node 0's address; never --standalone (a private endpoint)."""
    args = torchrun_args(["pretrain", "--nnodes", "2", "--node-rank=1", "--tp", "2", "--master-port", "2951"],
                         LaunchConfig(nproc=4, nnodes=2, node_rank=1, master_addr="10.1.2.3", master_port=2951))
    assert args[:5] == ["--nproc-per-node=4", "--nnodes=2", "--node-rank=1", "--master-addr=10.1.2.3",
                        "--master-port=2951"]
    assert "--standalone" not in args and args[5:] == ["-m", "llamactl", "pretrain", "--tp", "2"]
    one = torchrun_args(["pretrain"], LaunchConfig(nproc=2))
    assert one[:3] == ["--nproc-per-node=2", "--nnodes=1", "--standalone"]


def test_several_nodes_need_the_master_address(tiny_data, tmp_path, capsys):
    """torchrun's default master address is 127.0.0.1: node 1 would wait for a rendezvous on itself."""
    from llamactl.cli import main

    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--tp", "2", "--nproc", "2",
              "--nnodes", "2", "--node-rank", "1"])
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert e.value.code == 1 and err == ["error: --nnodes 2 needs --master-addr: the address of node 0, the same on "
                                         "every node (--master-addr)"]
    assert not (tmp_path / "run").exists()


def _pretrain(data, run, *launch: str) -> list[str]:
    return [sys.executable, "-m", "llamactl", "pretrain", "--data", str(data), "--out", str(run), "--size", "tiny",
            "--steps", "4", "--seq-len", "32", "--batch-tokens", "256", "--micro-batch", "2", "--eval-tokens", "0",
            "--warmup", "0", "--peak-flops", "1e11", "--save-every", "100000", "--seed", "3", "--tp", "2", *launch]


def _two_agents(data, run, *extra: str, env: dict) -> list[subprocess.CompletedProcess]:
    """The same command on 'node' 0 and 'node' 1, two processes each, as two nodes of a cluster run it."""
    port = str(free_port())
    procs = [subprocess.Popen(_pretrain(data, run, "--nproc", "2", "--nnodes", "2", "--node-rank", str(r),
                                        "--master-addr", "127.0.0.1", "--master-port", port, *extra),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in (0, 1)]
    out = []
    for p in procs:
        o, e = p.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, o, e))
    return out


def _rows(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_agents_train_stop_and_resume_like_one_node(tiny_data, tmp_path):
    import torch

    from llamactl import checkpoint
    from llamactl.model import build_model

    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    # the same run on one node: the figures two nodes must reproduce
    one = subprocess.run(_pretrain(tiny_data, tmp_path / "one", "--nproc", "4"), capture_output=True, text=True,
                         env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    want = _rows(tmp_path / "one")

    # two nodes; every rank gets SIGTERM after step 2: both agents stop with 143 after saving step 2
    run = tmp_path / "two"
    stopped = _two_agents(tiny_data, run, env=dict(env, LLAMACTL_FAULT_AT_STEP="2", LLAMACTL_FAULT_SIGNAL="TERM"))
    for p in stopped:
        assert p.returncode == 128 + signal.SIGTERM, p.stderr[-3000:]
        assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert (run / "latest").read_text().strip() == "step-000002"
    assert [r["step"] for r in _rows(run)] == [1, 2]

    # --resume on both agents finishes the run: the same losses and gradient norms, bit for bit
    done = _two_agents(tiny_data, run, "--resume", env=env)
    for p in done:
        assert p.returncode == 0, p.stderr[-3000:]
    got = _rows(run)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert [(r["loss"], r["grad_norm"], r["tokens"]) for r in got] == \
        [(r["loss"], r["grad_norm"], r["tokens"]) for r in want]
    assert got[-1]["loss"] < got[0]["loss"]                                  # it trains
    assert got[-1]["tokens"] == 4 * 256

    # the checkpoint loads in one process and gives the loss the run saw on a batch of its own data
    ckpt = checkpoint.latest(run)
    assert ckpt is not None and ckpt.name == "step-000004"
    assert checkpoint.verify(ckpt) == []
    cfg, head = checkpoint.load_config(ckpt)
    model = build_model(cfg, seed=1)
    checkpoint.load(ckpt, model)
    ref = build_model(cfg, seed=1)
    checkpoint.load(checkpoint.latest(tmp_path / "one"), ref)
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name                                       # two nodes == one node, weights too
