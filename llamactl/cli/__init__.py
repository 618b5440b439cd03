"""The `llamactl` command line: parse, validate, call one stage function. No logic lives here.

One module per command group; importing them registers their commands, and their order here is the order
`llamactl --help` lists the commands in. Errors a user can cause are printed as one line,
`error: <what> (<where>)`, with exit code 1; `llamactl --debug ...` shows the traceback instead (main.py).
"""
from llamactl.cli.app import app
from llamactl.cli import (  # noqa: F401  (imported to register their commands)
    plan, data, train, evals, tokenizer, generate, checkpoints, bench, reward, rlhf, gatt, demo,
)
from llamactl.cli.main import main

__all__ = ["app", "main"]
