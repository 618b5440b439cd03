"""User errors and their one-line form: the CLI prints each as `error: <what> (<where>)`.

LlamactlError is the one exception type for mistakes a user can make in files, data or values;
usage_error_line() gives command-line usage errors (found by click while parsing) the same form,
naming the flag instead of click's multi-line usage block.
"""
from __future__ import annotations

import difflib


class LlamactlError(Exception):
    """A user-facing error; its message names what is wrong and where (file, flag, step)."""


def one_line(text: str) -> str:
    """Any message squeezed onto one line (the CLI never prints more than one for an error)."""
    return " ".join(str(text).split())


def usage_error_line(e: Exception, args: list[str]) -> str:
    """`<what> (<flag>)` for a click usage error (typer vendors click as typer._click: match by name).

    args is the command line given (without the program) so a bad value can be quoted as typed.
    """
    kinds = {c.__name__ for c in type(e).__mro__}
    param = getattr(e, "param", None)
    if "MissingParameter" in kinds:
        if param is not None and getattr(param, "param_type_name", "") == "argument":
            return f"missing argument {_param_name(param)} ({_command(e)} {_param_name(param)})"
        return f"missing option ({_param_name(param) if param is not None else _hint(e)})"
    if "BadParameter" in kinds:
        flag = _param_name(param) if param is not None else _hint(e)
        value = _value_of(args, param) if param is not None else None
        what = f"invalid value {value!r}" if value is not None else "invalid value"
        return f"{what}: {_sentence(e.message)} ({flag})"
    if "NoSuchOption" in kinds:
        name = getattr(e, "option_name", "")
        close = difflib.get_close_matches(name.lstrip("-"), [p.lstrip("-") for p in e.possibilities or ()],
                                          n=1, cutoff=0.6)
        hint = f"; did you mean --{close[0]}?" if close else f"; see {_command(e)} --help"
        return f"no such option of {_command(e)}{hint} ({name})"
    if "BadOptionUsage" in kinds:
        return f"{_sentence(e.format_message())} ({e.option_name})"
    return f"{_sentence(e.format_message())} ({_command(e)})"


def _command(e: Exception) -> str:
    """`llamactl data prepare`: the command path, whatever the program was called (python -m, script)."""
    names, ctx = [], getattr(e, "ctx", None)
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    return " ".join(["llamactl", *reversed(names)])


def _param_name(param) -> str:
    """The flag a user types (--lr), or an argument's metavar (CKPT)."""
    opts = [o for o in getattr(param, "opts", []) if o.startswith("--")] or list(getattr(param, "opts", []))
    if getattr(param, "param_type_name", "") == "argument" or not opts:
        return (getattr(param, "metavar", None) or param.name or "argument").upper()
    return max(opts, key=len)


def _hint(e: Exception) -> str:
    hint = getattr(e, "param_hint", None)
    if isinstance(hint, (list, tuple)):
        return " / ".join(hint)
    return hint or "command line"


def _value_of(args: list[str], param) -> str | None:
    """The value typed after one of param's flags (`--lr abc` or `--lr=abc`), the last one given."""
    found = None
    for i, a in enumerate(args):
        name, eq, val = a.partition("=")
        if name in getattr(param, "opts", []):
            found = val if eq else (args[i + 1] if i + 1 < len(args) else None)
    return found


def _sentence(msg: str) -> str:
    """A click / pydantic message as a clause: one line, no trailing period, lower-case start."""
    msg = one_line(msg).rstrip(".")
    if len(msg) > 1 and msg[0].isupper() and not msg[1].isupper():
        msg = msg[0].lower() + msg[1:]
    return msg
