"""`llamactl chat`: an interactive REPL (and a one-shot mode) over a Llama 2-Chat checkpoint.

The history is kept as messages and re-encoded each turn with Meta's chat template (encode_dialog),
so what the model sees is exactly Llama 2-Chat's format. When the prompt would leave less than
max_new_tokens of context, the oldest finished user/assistant pairs are dropped; the system message
always stays. Messages with [INST] / <<SYS>> tags are refused as Meta's reference refuses them.

Streaming: the answer's ids are decoded as a whole after every token and only the new suffix is
printed, so SentencePiece's leading-space pieces ("▁word") and multi-byte characters split over byte
pieces come out right (a trailing U+FFFD means an incomplete character: it waits for the next token).
Ctrl-C during an answer stops that answer (the partial answer stays in the history); Ctrl-C or
Ctrl-D at the prompt leaves. Reserved tags the model itself generates are removed from the stored
answer (kept, they would make every later prompt a refused dialog).
"""
from __future__ import annotations

import json
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from llamactl.errors import LlamactlError
from llamactl.generation import generate, sequence_seed
from llamactl.tokenizer import SPECIAL_TAGS

HELP = "commands: /system TEXT (set the system prompt; empty clears it), /reset, /save FILE, /exit"


@dataclass
class ChatSettings:
    temperature: float = 0.6
    top_p: float = 0.9
    max_new_tokens: int = 256
    seed: int = 0
    system: str | None = None


class StreamDecoder:
    """Incremental detokenizer: feed ids, get the newly printable text."""

    def __init__(self, tok):
        self.tok, self.ids, self.shown = tok, [], ""

    def feed(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its other bytes
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """What is left at the end (e.g. bytes that never formed a character, shown as U+FFFD)."""
        return self._advance(self.tok.decode(self.ids))

    def _advance(self, text: str) -> str:
        new = text[len(self.shown):] if text.startswith(self.shown) else text
        self.shown = text
        return new


class ChatSession:
    """Dialog state plus one `reply` per user message; no terminal I/O (the REPL does that)."""

    def __init__(self, model, tok, settings: ChatSettings):
        self.model, self.tok, self.s = model, tok, settings
        self.system = settings.system or None
        self.turns: list[dict] = []  # finished user / assistant messages
        self.n_replies = 0
        self.dropped = 0

    def dialog(self, user: str | None = None) -> list[dict]:
        d = [{"role": "system", "content": self.system}] if self.system else []
        d += self.turns
        if user is not None:
            d.append({"role": "user", "content": user})
        return d

    def reset(self) -> None:
        self.turns, self.dropped = [], 0

    def prompt_ids(self, user: str) -> list[int]:
        """The encoded dialog, dropping the oldest finished pairs until max_new_tokens fit in the context."""
        from llamactl.tokenizer import encode_dialog, validate_dialog

        validate_dialog(self.dialog(user), last="user")  # refuses special tags before anything is dropped
        budget = self.model.cfg.max_seq_len - self.s.max_new_tokens
        if budget < 1:
            raise LlamactlError(f"--max-new-tokens {self.s.max_new_tokens} leaves no room in the model context "
                                f"of {self.model.cfg.max_seq_len}")
        while True:
            ids = encode_dialog(self.tok, self.dialog(user))
            if len(ids) <= budget:
                return ids
            if not self.turns:
                raise LlamactlError(f"message of {len(ids)} tokens does not fit the context of "
                                    f"{self.model.cfg.max_seq_len} minus --max-new-tokens {self.s.max_new_tokens}")
            self.turns = self.turns[2:]
            self.dropped += 1

    def reply(self, user: str, on_text: Callable[[str], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> tuple[str, str]:
        """Answer `user`, streaming text pieces to on_text; returns (answer, finish_reason)."""
        ids = self.prompt_ids(user)
        dec = StreamDecoder(self.tok)
        eos = self.tok.eos_id

        def on_step(rows, toks):
            if toks[0] != eos and on_text is not None:
                piece = dec.feed(toks[0])
                if piece:
                    on_text(piece)
            return bool(should_stop and should_stop())

        s = generate(self.model, [ids], max_new_tokens=self.s.max_new_tokens, temperature=self.s.temperature,
                     top_p=self.s.top_p, eos_id=eos, seeds=[sequence_seed(self.s.seed, self.n_replies)],
                     on_step=on_step)[0]
        self.n_replies += 1
        rest = dec.flush()
        if rest and on_text is not None:
            on_text(rest)
        answer = self.tok.decode([t for t in s.tokens if t != eos]).strip()
        for tag in SPECIAL_TAGS:  # a generated tag would make every later turn a refused dialog
            answer = answer.replace(tag, "")
        self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return answer, s.finish_reason

    def save(self, path) -> Path:
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.dialog(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path


class _StopOnSigint:
    """While active, Ctrl-C sets a flag (the answer stops at the next token) instead of raising."""

    def __init__(self):
        self.hit = False

    def __enter__(self):
        self.hit = False
        self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.hit = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._old)
        return False


class _Ranks:
    """Keeps tensor-parallel ranks in lock step: rank 0 owns the terminal, the others follow its input
    and its Ctrl-C. At tp == 1 every method is the plain local operation."""

    def __init__(self, ctx, device):
        self.ctx, self.device = ctx, device
        self.multi = ctx is not None and ctx.world_size > 1

    def read(self, prompt_text: str) -> str | None:
        """A line typed on rank 0 (None at end of input), the same on every rank."""
        line = None
        if not self.multi or self.ctx.rank == 0:
            try:
                line = input(prompt_text)
            except (EOFError, KeyboardInterrupt):
                line = None
        if self.multi:
            import torch.distributed as dist

            box = [line]
            dist.broadcast_object_list(box, src=0)
            line = box[0]
        return line

    def agree_stop(self, hit: bool) -> bool:
        """Stop the answer on every rank when rank 0 saw Ctrl-C (ranks must take the same steps)."""
        if not self.multi:
            return hit
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if (hit and self.ctx.rank == 0) else 0.0], device=self.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())


def run_chat(model_dir, settings: ChatSettings, *, prompt: str | None = None, device: str = "auto",
             ctx=None) -> None:
    """The REPL, or with `prompt` one answer printed to stdout (banners go to stderr).

    With a tensor-parallel `ctx` (launched by --nproc or torchrun) every rank holds its weight slices;
    rank 0 reads and prints, the others follow."""
    from llamactl.generation import load_for_generation
    from llamactl.tokenizer import validate_dialog
    from rich.markup import escape

    from llamactl.ui import console, err_console

    if settings.temperature < 0:
        raise LlamactlError(f"--temperature must be >= 0, got {settings.temperature}")
    if not 0.0 < settings.top_p <= 1.0:
        raise LlamactlError(f"--top-p must be in (0, 1], got {settings.top_p}")
    if settings.system:
        validate_dialog([{"role": "system", "content": settings.system}, {"role": "user", "content": "x"}])
    model, tok = load_for_generation(model_dir, device, ctx)
    session = ChatSession(model, tok, settings)
    ranks = _Ranks(ctx, next(model.parameters()).device)
    quiet = ranks.multi and ctx.rank != 0

    def out(piece: str) -> None:
        if quiet:
            return
        console.file.write(piece)
        console.file.flush()

    if prompt is not None:  # one-shot
        with _StopOnSigint() as stop:
            session.reply(prompt, out, lambda: ranks.agree_stop(stop.hit))
        out("\n")
        return
    if quiet:
        err_console.quiet = True
        console.quiet = True

    err_console.print(f"[bold]llamactl chat[/bold] {model_dir} ({model.cfg.num_params() / 1e6:,.1f}M parameters, "
                      f"context {model.cfg.max_seq_len}). {HELP}")
    while True:
        line = ranks.read("you> ")
        if line is None:
            out("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            arg = arg.strip()
            if cmd == "/exit" or cmd == "/quit":
                return
            if cmd == "/reset":
                session.reset()
                console.print("[dim](history cleared)[/dim]")
            elif cmd == "/system":
                try:
                    if arg:
                        validate_dialog([{"role": "system", "content": arg}, {"role": "user", "content": "x"}])
                except LlamactlError as e:
                    err_console.print(f"[red]error:[/red] {escape(str(e))}")
                    continue
                session.system = arg or None
                console.print(f"[dim](system prompt {'set' if arg else 'cleared'})[/dim]")
            elif cmd == "/save":
                if not arg:
                    err_console.print("[red]error:[/red] /save needs a file name")
                    continue
                try:
                    if not quiet:
                        console.print(f"[dim](saved {session.save(arg)})[/dim]")
                except OSError as e:
                    err_console.print(f"[red]error:[/red] {escape(f'cannot write {arg}: {e}')}")
            else:
                err_console.print(escape(f"unknown command {cmd}; {HELP}"))
            continue
        dropped = session.dropped
        try:
            validate_dialog(session.dialog(text), last="user")
        except LlamactlError as e:
            err_console.print(f"[red]error:[/red] {escape(str(e))}")
            continue
        out("assistant> ")
        try:
            with _StopOnSigint() as stop:
                _, reason = session.reply(text, out, lambda: ranks.agree_stop(stop.hit))
        except LlamactlError as e:
            out("\n")
            err_console.print(f"[red]error:[/red] {escape(str(e))}")
            continue
        out("\n")
        if reason == "interrupted":
            console.print("[dim](stopped)[/dim]")
        elif reason == "length":
            console.print(f"[dim](cut at --max-new-tokens {settings.max_new_tokens})[/dim]")
        if session.dropped > dropped:
            console.print(f"[dim](dropped the oldest {session.dropped - dropped} turn(s) to fit the context)[/dim]")
