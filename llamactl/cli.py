"""The `llamactl` command line: parse, validate, call one stage function. No logic lives here.

Errors a user can cause are printed as one line, `error: <what> (<where>)`, with exit code 1;
`llamactl --debug ...` shows the traceback instead.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from llamactl.errors import LlamactlError
from llamactl.parallel.context import LayoutError
from llamactl.ui import console, err_console, table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train Llama 2 / Llama 2-Chat models the way the paper did, from one CPU to a GPU cluster.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train, inspect and use SentencePiece tokenizers.")
app.add_typer(tokenizer_app, name="tokenizer")

_state = {"debug": False}

SIZES = "tiny, small, 7b, 13b, 34b, 70b"


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors.")):
    _state["debug"] = debug


# ---- plan -------------------------------------------------------------------------------------------
@app.command()
def plan(size: str = typer.Option("7b", "--size", help=f"Model preset: {SIZES}.")):
    """Parameter count and weight bytes per dtype of a preset (built on the meta device: instant)."""
    from llamactl.config import preset
    from llamactl.plan import param_report

    r = param_report(size, preset(size))
    console.print(f"{size}: {r.params:,} parameters (meta-device count {r.meta_params:,})")
    rows = [[k, f"{v / 2**30:,.2f} GiB"] for k, v in r.bytes_per_dtype.items()]
    console.print(table(f"weights of {size}", ["dtype", "bytes"], rows))


# ---- entry point ------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry: run the app, turning user errors into one line and exit code 1."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        app(args=argv, standalone_mode=False)
    except (LlamactlError, LayoutError) as e:
        if debug:
            raise
        err_console.print(f"[red]error:[/red] {e}", markup=True, soft_wrap=True)
        raise SystemExit(1)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise SystemExit(130)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors and the like
        import click

        if isinstance(e, click.exceptions.Abort):
            raise SystemExit(1)
        if isinstance(e, click.ClickException):
            e.show()
            raise SystemExit(e.exit_code)
        if debug:
            raise
        err_console.print(f"[red]error:[/red] {type(e).__name__}: {e} (run with --debug for the traceback)",
                          soft_wrap=True)
        raise SystemExit(1)



