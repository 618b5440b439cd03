"""`main()`, the console-script entry: runs the app and turns every error a user can cause into one line."""
from __future__ import annotations

import sys
from typing import Optional

import typer

from llamactl.cli.app import app
from llamactl.errors import LlamactlError
from llamactl.parallel.context import LayoutError
from llamactl.ui import err_console


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry: every error a user can cause is one line `error: <what> (<where>)`.

    Exit codes: 2 usage errors (click's convention: bad or missing flag, unknown option), 1 other user
    errors, 130 / 143 stops by SIGINT / SIGTERM, a failed rank's own code under --nproc (whose line the
    launcher prints once, not once per rank). `llamactl --debug ...` shows tracebacks instead.
    """
    import os

    from rich.markup import escape  # messages may hold "[/INST]", paths with brackets, ...

    from llamactl.errors import one_line, usage_error_line
    from llamactl.parallel.launch import RanksFailed

    try:
        from typer._click import exceptions as usage  # typer >= 0.24 vendors its own click
    except ImportError:  # pragma: no cover - older typer uses the click package
        from click import exceptions as usage
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args

    def fail(line: str | None, code: int, *, user: bool = True):
        """Print the line (a rank started by --nproc leaves it to the launcher instead) and exit."""
        if line is not None:
            left = False
            if "RANK" in os.environ:
                from llamactl.parallel.launch import report_rank_error

                left = report_rank_error(line, code, user=user)
            if not left:
                err_console.print(f"[red]error:[/red] {escape(line)}", markup=True, soft_wrap=True)
        raise SystemExit(code)

    try:
        code = app(args=args, standalone_mode=False)
    except usage.NoArgsIsHelpError as e:  # `llamactl data`: the help was printed; still a usage error
        if e.format_message().strip():
            e.show()
        raise SystemExit(e.exit_code)
    except usage.ClickException as e:
        if debug:
            raise
        fail(usage_error_line(e, args), e.exit_code)
    except typer.Abort:
        fail("aborted", 1)
    except (LlamactlError, LayoutError) as e:
        if debug:
            raise
        fail(one_line(str(e)), 1)
    except RanksFailed as e:  # this process launched the ranks: their one line, their exit code
        fail(e.message, e.exit_code)
    except KeyboardInterrupt:
        fail(None, 130)
    except SystemExit:
        raise
    except Exception as e:  # a bug rather than a user error: still one line unless --debug
        if debug:
            raise
        fail(f"{type(e).__name__}: {one_line(str(e))} (run with --debug for the traceback)", 1, user=False)
    if isinstance(code, int) and code:  # typer.Exit(n) and Ctrl-C (130) come back as a return value
        raise SystemExit(code)
    # every rank finished: leave the process group together. Left to interpreter exit, gloo's threads are
    # torn down by static destructors and a rank can abort ("terminate called without an active exception")
    from llamactl.parallel.launch import shutdown

    shutdown()
