"""`llamactl demo`: the whole Llama 2-Chat recipe on one machine, through the same public commands a user types.

Every step (demo_plan.plan) is printed as a shell command, then run as a child process
`python -m llamactl ...`. Child processes rather than llamactl.cli.main in this process because:
- a stage's result depends only on its command line, never on what ran before it in the same process
  (torch's global RNG, thread settings, kernel caches, module state), so a demo resumed after a crash
  computes exactly what an uninterrupted one does, and the printed command reproduces the stage alone;
- Ctrl-C reaches the running stage as it would in a terminal: a training stage saves its checkpoint and
  exits 130, and the demo stops after it; a crash of one stage (or a SIGKILL) leaves the demo's own
  state file intact;
- each stage's memory is returned to the system when it ends.
The price is a Python + torch start per command (about a second of CPU each).

State: DEMO/demo.json (written atomically after every step): the options the demo was started with and,
per step, its command, status (done / failed / interrupted) and seconds. A step recorded as done whose
output still exists is never redone; any other step runs again, a training step with --resume when its
run dir holds a checkpoint (exact resume), so an interrupted demo finishes with the same numbers as an
uninterrupted one of the same seed.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from llamactl.errors import LlamactlError
from llamactl.stages.demo_plan import CHAT_PROMPT, DemoConfig, Step, plan

STATE = "demo.json"


# ---- the state file -----------------------------------------------------------------------------------
def load_state(cfg: DemoConfig) -> dict:
    """demo.json of cfg.out, or a new state; a demo started with other options is refused."""
    path = cfg.out / STATE
    if not path.exists():
        if cfg.out.exists() and any(cfg.out.iterdir()):
            raise LlamactlError(f"{cfg.out} is not empty and holds no {STATE}; choose another --out (--out)")
        return {"format": "llamactl-demo", "version": 1, "options": cfg.options(), "stages": []}
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LlamactlError(f"cannot read {path}: {e} (--out)") from None
    if state.get("options") != cfg.options():
        was = " ".join(f"--{k} {v}" for k, v in state.get("options", {}).items())
        raise LlamactlError(f"{cfg.out} holds a demo started with {was}; run it with the same options to "
                            f"continue, or choose another --out (--out)")
    return state


def save_state(cfg: DemoConfig, state: dict) -> None:
    from llamactl.tasks.suite import write_text_atomic

    write_text_atomic(cfg.out / STATE, json.dumps(state, indent=1) + "\n")


def _record(state: dict, name: str) -> dict:
    for r in state["stages"]:
        if r["name"] == name:
            return r
    r = {"name": name}
    state["stages"].append(r)
    return r


def is_done(state: dict, step: Step) -> bool:
    r = next((r for r in state["stages"] if r["name"] == step.name), None)
    return bool(r and r.get("status") == "done" and step.output.exists())


# ---- which commands this build has ----------------------------------------------------------------------
def command_exists(path: tuple[str, ...]) -> bool:
    """Does `llamactl <path...>` exist in this build (the CLI's own command tree, nothing run)?"""
    import typer

    from llamactl.cli import app

    cmd = typer.main.get_command(app)
    for name in path:
        sub = getattr(cmd, "commands", {}).get(name)
        if sub is None:
            return False
        cmd = sub
    return True


# ---- running one step -----------------------------------------------------------------------------------
def shell_line(argv: list[str]) -> str:
    return "llamactl " + shlex.join(argv)


def has_checkpoint(step: Step) -> bool:
    """Does the step's run dir hold something to resume from (PPO: a complete shared run state)?"""
    from llamactl.rundir import list_checkpoints
    from llamactl.runstate import state_steps

    run_dir = Path(step.extra.get("run_dir", step.output))
    if not run_dir.is_dir():
        return False
    return bool(state_steps(run_dir) if step.extra.get("runstate") else list_checkpoints(run_dir))


def _argv(step: Step) -> list[str]:
    """The step's command as it runs now: + --resume for a training run with a checkpoint, + what an "adjust"
    hook adds from the outputs of earlier steps."""
    argv = list(step.argv)
    if step.train and has_checkpoint(step):
        argv.append("--resume")
    if "adjust" in step.extra:
        fn, args = step.extra["adjust"]
        argv = fn(argv, *args)
    return argv


def run_command(argv: list[str]) -> int:
    """Run `llamactl argv` as a child process sharing this terminal; its exit code (Ctrl-C: the child saves
    and exits 130, then KeyboardInterrupt is raised here)."""
    sys.stdout.flush()  # what the demo printed comes before the stage's own output (pipes are block-buffered)
    sys.stderr.flush()
    proc = subprocess.Popen([sys.executable, "-m", "llamactl", *argv], env=dict(os.environ))
    # SIGTERM (a scheduler, `kill`) is passed on to the stage, which saves and exits 143, as Ctrl-C does
    old = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # the child got the same SIGINT (same process group): let it save its checkpoint
        try:
            proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, old)


def _cpu() -> float:
    """CPU seconds (user + system) of this process and its finished children: a stage's cost on a shared machine."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _fmt(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Eta:
    """Overall time left: the remaining steps' expected seconds, scaled by how this machine compares with the
    expectation on the steps finished in this invocation."""

    def __init__(self, steps: list[Step]):
        self.expected = {s.name: s.seconds for s in steps}
        self.seen_expected = self.seen_actual = 0.0

    def done(self, name: str, seconds: float) -> None:
        self.seen_expected += self.expected[name]
        self.seen_actual += seconds

    def left(self, remaining: list[str]) -> float:
        ratio = self.seen_actual / self.seen_expected if self.seen_expected > 5 else 1.0
        return ratio * sum(self.expected[n] for n in remaining)


# ---- the demo -------------------------------------------------------------------------------------------
def run_demo(cfg: DemoConfig, *, run: Callable[[list[str]], int] = run_command, chat: bool = True) -> dict:
    """Run (or continue) the demo in cfg.out; returns the final state."""
    from rich.markup import escape

    from llamactl.ui import console

    cfg.check()
    state = load_state(cfg)
    steps, missing = plan(cfg, command_exists)
    cfg.out.mkdir(parents=True, exist_ok=True)
    state["missing"] = [{"stage": st, "command": c} for st, c in missing]
    save_state(cfg, state)
    todo = [s for s in steps if not is_done(state, s)]
    eta = Eta(steps)
    t_start = time.monotonic()
    console.rule(f"[bold]llamactl demo[/bold]: the Llama 2-Chat recipe in {cfg.out} "
                 f"({len(steps)} commands, {len(steps) - len(todo)} already done)")
    for st, c in missing:
        console.print(f"[yellow]{st}[/yellow]: not available in this build (`llamactl {c}` does not exist yet)")
    for k, step in enumerate(todo):
        left = eta.left([s.name for s in todo[k:]])
        i = steps.index(step) + 1
        console.rule(f"[bold][{i}/{len(steps)}] {step.stage}[/bold] · {_fmt(time.monotonic() - t_start)} "
                     f"elapsed · about {_fmt(left)} left", align="left")
        argv, fn = _argv(step), step.extra.get("python")
        line = f"# {step.extra['describe']}" if fn else shell_line(argv)
        console.print(f"[green]$[/green] {escape(line)}" if not fn else escape(line), soft_wrap=True, highlight=False)
        rec = _record(state, step.name)
        rec.update(stage=step.stage, command=line if fn else shell_line(step.argv), status="running")
        save_state(cfg, state)
        t0, c0 = time.monotonic(), _cpu()
        try:
            code = (fn[0](*fn[1]) or 0) if fn else run(argv)
        except KeyboardInterrupt:
            rec.update(status="interrupted", seconds=round(rec.get("seconds", 0) + time.monotonic() - t0, 1),
                       cpu_seconds=round(rec.get("cpu_seconds", 0) + _cpu() - c0, 1))
            save_state(cfg, state)
            console.print(f"[yellow]demo stopped during {step.name}[/yellow]; run the same command again to "
                          f"continue from there ({cfg.out / STATE})")
            raise
        dt = time.monotonic() - t0
        rec["seconds"] = round(rec.get("seconds", 0) + dt, 1)
        rec["cpu_seconds"] = round(rec.get("cpu_seconds", 0) + _cpu() - c0, 1)
        if code in (130, 143):  # SIGINT / SIGTERM reached the stage alone: it saved, the demo stops with it
            rec["status"] = "interrupted"
            save_state(cfg, state)
            console.print(f"[yellow]demo stopped during {step.name}[/yellow]; run the same command again to "
                          f"continue from there ({cfg.out / STATE})")
            raise SystemExit(code)
        if code != 0 or not step.output.exists():
            rec["status"] = "failed"
            save_state(cfg, state)
            why = f"exit code {code}" if code >= 0 else f"killed by signal {-code}"
            raise LlamactlError(f"demo step {step.name} stopped ({why}); run the same `llamactl demo` again to "
                                f"continue from it ({cfg.out / STATE})")
        rec["status"] = "done"
        save_state(cfg, state)
        eta.done(step.name, dt)
    state["seconds"] = round(sum(r.get("seconds", 0) for r in state["stages"]), 1)
    state["cpu_seconds"] = round(sum(r.get("cpu_seconds", 0) for r in state["stages"]), 1)
    state["final"] = str(final_model(cfg, steps))
    save_state(cfg, state)
    finish(cfg, state, steps, chat=chat, run=run)
    return state


def final_model(cfg: DemoConfig, steps: list[Step]) -> Path:
    """The last chat checkpoint the recipe produced (gatt > ppo > rs > sft)."""
    from llamactl.stages.demo_later import FINAL_MODELS

    names = {s.name for s in steps}
    for name, rel in FINAL_MODELS:
        if name in names:
            return cfg.out / rel
    return cfg.out / "sft"


def finish(cfg: DemoConfig, state: dict, steps: list[Step], *, chat: bool, run) -> None:
    """The result table (llamactl report's, when this build has it, else the demo's own), the report's path,
    and a one-shot chat answer from the final model."""
    from rich.markup import escape

    from llamactl.stages.demo_table import print_summary, write_summary
    from llamactl.ui import console

    console.rule("[bold]results[/bold]")
    summary = write_summary(cfg.out, state)
    print_summary(cfg.out, state)
    console.print(f"these tables: {summary}")
    if any(s.name == "report" for s in steps):
        console.print(f"report: {cfg.out / 'report.md'} (plots in {cfg.out / 'plots'})")
    else:
        console.print("`llamactl report` is not available in this build")
    console.print(f"total: {_fmt(state['seconds'])} of stage time ({state['cpu_seconds']:,.0f} CPU seconds); "
                  f"final chat model: {state['final']}")
    if chat:
        argv = ["chat", "--model", state["final"], "--prompt", CHAT_PROMPT, "--temperature", "0",
                "--max-new-tokens", "48"]
        console.print(f"[green]$[/green] {escape(shell_line(argv))}", soft_wrap=True, highlight=False)
        run(argv)
