"""Logs without a terminal: with stdout piped (a cluster job's log, `| tee`) training prints a plain line every
--log-every steps (and after the first and the last) with step, loss, lr, grad norm, tokens/s, MFU, elapsed and
ETA, instead of a progress bar; an MFU above 100 % is never printed (shown as '-', the reason said once)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

LINE = re.compile(r"^pretrain step (\d+)/(\d+) \| loss (\d+\.\d{4}) \| lr (\d\.\d\de[-+]\d\d) \| grad norm (\d+\.\d{3}) \| "
                  r"([\d,]+) tokens/s \| MFU (-|\d+\.\d%) \| elapsed \d+:\d\d:\d\d \| ETA \d+:\d\d:\d\d$")


def _pretrain(data, run, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.pop("FORCE_COLOR", None)
    env.pop("FORCE_TERMINAL", None)
    cmd = [sys.executable, "-m", "llamactl", "pretrain", "--data", str(data), "--out", str(run), "--size", "tiny",
           "--steps", "5", "--seq-len", "32", "--batch-tokens", "128", "--micro-batch", "4", "--eval-tokens", "0",
           "--warmup", "0", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _lines(out: str) -> list[re.Match]:
    return [m for m in map(LINE.match, out.splitlines()) if m]


def test_piped_stdout_gets_a_line_every_n_steps(tiny_data, tmp_path):
    p = _pretrain(tiny_data, tmp_path / "run", "--log-every", "2")
    assert p.returncode == 0, p.stderr[-3000:]
    lines = _lines(p.stdout)
    assert [int(m[1]) for m in lines] == [1, 2, 4, 5], p.stdout     # the first, every 2nd, the last
    assert {int(m[2]) for m in lines} == {5}
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for m in lines:                                                   # the line shows the step's own figures
        row = rows[int(m[1]) - 1]
        assert m[3] == f"{row['loss']:.4f}" and m[4] == f"{row['lr']:.2e}" and m[5] == f"{row['grad_norm']:.3f}"
        assert m[6] == f"{row['tokens_per_s']:,.0f}"
        # the peak was measured: MFU is a percentage, never above 100 %, and the metrics agree
        assert m[7] != "-" and 0 < float(m[7][:-1]) <= 100 and m[7] == f"{100 * row['mfu']:.1f}%"
    assert "━" not in p.stderr and "ETA" not in p.stderr and "MFU shown as" not in p.stdout   # no bar, no note


def test_mfu_above_100_percent_is_never_printed(tiny_data, tmp_path):
    """A peak far too low (1 MFLOP/s) makes every step 'above 100 %': '-' on every line, the reason once,
    null in metrics.jsonl."""
    p = _pretrain(tiny_data, tmp_path / "run", "--log-every", "1", "--peak-tflops", "1e-6")
    assert p.returncode == 0, p.stderr[-3000:]
    lines = _lines(p.stdout)
    assert [int(m[1]) for m in lines] == [1, 2, 3, 4, 5] and {m[7] for m in lines} == {"-"}
    notes = [x for x in p.stdout.splitlines() if x.startswith("MFU shown as '-'")]
    assert len(notes) == 1 and "--peak-tflops" in notes[0], p.stdout
    assert not re.search(r"MFU (\d{4,}|[2-9]\d\d|1\d\d)\.\d%", p.stdout)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["mfu"] for r in rows] == [None] * 5


def test_progress_lines_and_mfu_text(capsys):
    from llamactl.ui import TrainProgress

    with TrainProgress("sft", 30, 10, every=10, plain=True, peak=2e12, measured=True) as bar:
        assert bar.mfu_text(0.4123) == "41.2%" and bar.mfu_text(None) == "-"
        for step in range(11, 31):
            bar.step(step, loss=1.0, lr=1e-5, grad_norm=0.5, tokens_per_s=1000.0, mfu=0.5 if step < 25 else 1.7)
    out = capsys.readouterr().out.splitlines()
    steps = [int(x.split()[2].split("/")[0]) for x in out if x.startswith("sft step")]
    assert steps == [11, 20, 30]                                      # resumed at 10: its first step, every 10th, last
    assert [x for x in out if x.startswith("sft step 20/30")][0].count("MFU 50.0%") == 1
    assert "MFU -" in [x for x in out if x.startswith("sft step 30/30")][0]
    notes = [x for x in out if x.startswith("MFU shown as")]
    assert len(notes) == 1 and "170%" in notes[0] and "2 TFLOP/s" in notes[0] and "measured too low" in notes[0]
    with TrainProgress("sft", 3, every=1, plain=True, enabled=False) as quiet:  # other ranks, show_progress off
        quiet.step(1, loss=1.0, lr=1e-5, grad_norm=0.5, tokens_per_s=1.0, mfu=5.0)
    assert capsys.readouterr().out == ""


def test_peak_is_measured_long_enough(monkeypatch):
    """One warm-up, then at least min_reps timed matmuls and at least `seconds`: best of them."""
    import torch

    from llamactl import flops

    calls = []
    real = torch.mm
    monkeypatch.setattr(flops.torch, "mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    peak = flops.measure_peak_flops("cpu", seconds=0.0, min_reps=3)
    assert len(calls) == 1 + 3 and peak > 0
    assert flops.PEAK_MIN_REPS >= 10 and flops.PEAK_MIN_SECONDS >= 1.0
    assert flops.mfu(100.0, 1e9, 1e12, 1) == pytest.approx(0.1)
    assert flops.mfu(100.0, 1e9, 1e10, 1) is None and flops.mfu(100.0, None, 1e12, 1) is None


@pytest.mark.parametrize("args,msg", [(("--log-every", "0"), r"log_every must be >= 1, got 0 \(--log-every\)"),
                                      (("--peak-tflops", "1", "--peak-flops", "1e12"), r"give the peak once"),
                                      (("--peak-tflops", "-1"), r"peak TFLOP/s must be > 0, got -1.0 \(--peak-tflops\)")])
def test_bad_log_flags_are_one_line(tiny_data, tmp_path, capsys, args, msg):
    from llamactl.cli import main

    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--data", str(tiny_data), "--out", str(tmp_path / "r"), "--steps", "2", *args])
    assert e.value.code == 1
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and re.search(msg, err[0]), err
    assert not (tmp_path / "r").exists()
