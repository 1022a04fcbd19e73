"""``erllama chat``: an interactive multi-turn chat in the terminal, through the model's template.

This module owns the chat loop and its terminal output; ``erllama/cli.py`` wires
it in as the ``chat`` verb (the endpoint and auth options, the client, the
``error: <code>: <message>`` exit of a failed start).

Each turn reads one line (prompt ``> ``), appends ``{"role": "user", ...}`` to
the history, renders the WHOLE history with ``Client.apply_chat_template`` (the
optional ``--system`` text folded in), streams the reply with ``Client.infer``
over those tokens, printing text as it arrives, and appends
``{"role": "assistant", "content": reply}`` (the reply's outer whitespace
stripped, as chat templates render it). A status line follows each reply::

    [cache: partial 412 tokens, prefill 35 ms, 64 tokens 1.2 s]

(the done event's ``cache_hit_kind``, ``cache_delta.read`` = the warm prefix
restored, ``prefill_ms``, ``completion_tokens`` and ``generation_ms``), dim on
a colour terminal (not with ``NO_COLOR`` or ``TERM=dumb``).

Keys: Ctrl-C while a reply streams cancels it (the stream is closed, which
sends ``Cancel``; then a ``cancel`` call waits for the daemon's answer) and
drops the turn (the partial reply and its user line: roles keep alternating);
Ctrl-C at the prompt clears the line and prints a hint; Ctrl-D (EOF) at the
prompt ends the chat with status 0. A daemon error in a turn prints one line
``error: <code>: <message>`` and drops the turn. Before the first prompt a
one-message chat is rendered (not generated), so an unknown model
(``model_not_loaded``) or a GGUF without a template (``no_template``) fails the
start with that error.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import os
import select
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from erllama.client import Client
from erllama.protocol.errors import ErllamaError
from erllama.protocol.messages import Stats

PROMPT = "> "
DEFAULT_MODEL = "default"
DEFAULT_RESPONSE_TOKENS = 512  # ``infer`` alone would stop at 64
HINT = "(Ctrl-D quits; Ctrl-C stops a reply)"
_DIM, _RESET = "\x1b[2m", "\x1b[0m"


def _duration(ms: float) -> str:
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.1f} s"


def status_line(stats: Stats) -> str:
    """The line after a reply: cache hit kind and warm tokens, prefill and generation times."""
    hit: str = stats.cache_hit_kind
    if stats.cache_delta.read:
        hit += f" {stats.cache_delta.read} tokens"
    parts = [
        f"cache: {hit}",
        f"prefill {_duration(stats.prefill_ms)}",
        f"{stats.completion_tokens} tokens {_duration(stats.generation_ms)}",
    ]
    if stats.finish_reason != "stop":
        parts.append(f"finish {stats.finish_reason}")
    return "[" + ", ".join(parts) + "]"


def use_colour(out: TextIO) -> bool:
    """Dim status lines only on a terminal that wants colour."""
    term = os.environ.get("TERM", "")
    return out.isatty() and "NO_COLOR" not in os.environ and term not in ("", "dumb")


@dataclass
class Chat:
    """One chat: its history and the terminal it talks on.

    Attributes:
        client: an open ``Client`` of the daemon.
        model: the model id.
        system: the system text, or None.
        options: the ``infer`` options of every turn (``response_tokens``, ...).
        read_line: prints the prompt, reads one line (``run_chat`` gives a ``LineReader``).
        out: the conversation and status lines.
        err: error lines.
        history: the turns so far (``{"role", "content"}`` dicts, alternating).
    """

    client: Client
    model: str
    system: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    read_line: Callable[[str], str] = input
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    history: list[dict[str, str]] = field(default_factory=list)

    def run(self) -> int:
        """Chat until EOF at the prompt.

        Returns:
            0 (Ctrl-D at the prompt).

        Raises:
            ErllamaError: the start failed (``model_not_loaded``, ``no_template``, ...).
        """
        self._render([{"role": "user", "content": "hello"}])  # the model and its template
        self._write(f"chatting with {self.model} {HINT}\n", dim=True)
        while True:
            try:
                with sigint_allowed():
                    line = self.read_line(PROMPT)
            except EOFError:
                self._write("\n")
                return 0
            except KeyboardInterrupt:
                self._write(f"\n{HINT}\n", dim=True)
                continue
            before = len(self.history)
            try:
                if line.strip():
                    self.turn(line)
            except KeyboardInterrupt:  # a streaming reply is cancelled already (_reply)
                del self.history[before:]
                self._write("\n[cancelled]\n", dim=True)

    def turn(self, text: str) -> None:
        """One exchange: render the history with ``text``, stream and record the reply.

        On Ctrl-C (raised on) or a daemon error (printed) the history is left as it was.
        """
        before = len(self.history)
        try:
            self.history.append({"role": "user", "content": text})
            reply, stats = self._reply(self._render(self.history))
            self.history.append({"role": "assistant", "content": reply.strip()})
        except BaseException as exc:
            del self.history[before:]
            if not isinstance(exc, ErllamaError):
                raise
            self.out.flush()
            self.err.write(f"error: {exc.code}: {exc.message}\n")
            self.err.flush()
            return
        if stats is not None:
            self._write(status_line(stats) + "\n", dim=True)

    def _render(self, messages: list[dict[str, str]]) -> list[int]:
        request: dict[str, Any] = {"messages": messages}
        if self.system is not None:
            request["system"] = self.system
        return self.client.apply_chat_template(self.model, request)

    def _reply(self, tokens: list[int]) -> tuple[str, Stats | None]:
        """Stream the reply to ``tokens``; on Ctrl-C cancel it for sure, then re-raise."""
        parts: list[str] = []
        stats: Stats | None = None
        stream = self.client.infer(self.model, tokens, **self.options)
        interrupted = False
        try:
            with sigint_allowed():
                for event in stream:
                    if event.kind == "token" and event.text:
                        parts.append(event.text)
                        self.out.write(event.text)
                        self.out.flush()
                    elif event.kind == "done":
                        stats = event.stats
        except KeyboardInterrupt:
            interrupted = True  # the caller's "[cancelled]" ends the line
            stream.close()  # sends Cancel without waiting
            # ... and this waits until the daemon has it (a second Ctrl-C skips the wait)
            with contextlib.suppress(ErllamaError, KeyboardInterrupt):
                self.client.cancel(stream.request_id)
            raise
        finally:
            stream.close()
            if parts and not interrupted and not parts[-1].endswith("\n"):
                self.out.write("\n")
                self.out.flush()
        return "".join(parts), stats

    def _write(self, text: str, *, dim: bool = False) -> None:
        body = text.strip("\n")
        if dim and body and use_colour(self.out):  # newlines stay outside the escapes
            head, tail = text[: text.index(body)], text[text.index(body) + len(body) :]
            text = head + _DIM + body + _RESET + tail
        self.out.write(text)
        self.out.flush()


@contextlib.contextmanager
def sigint_blocked() -> Iterator[None]:
    """Block SIGINT in this thread, and so in every thread it starts (they inherit it).

    Ctrl-C must reach the main thread: a SIGINT the kernel hands to a ZeroMQ I/O thread
    (or pyzmq's gc thread) runs Python's handler there, while ``input()`` keeps waiting
    in ``read`` until the next line, so a Ctrl-C at the prompt would seem lost. The
    chat runs blocked and opens SIGINT only where it waits for the user or a reply
    (``sigint_allowed``); a SIGINT that came meanwhile is delivered then.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def sigint_allowed() -> Iterator[None]:
    """Let SIGINT in on this thread (inside ``sigint_blocked``), then restore the mask.

    The mask is read before SIGINT is unblocked: a pending SIGINT may raise the moment
    it is, and the ``finally`` must already hold the mask to go back to.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, ())  # reads the mask, changes nothing
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class LineReader:
    """Reads one line of the terminal for ``Chat.read_line``, and is woken by any signal.

    ``input()`` sleeps in ``read(2)`` and relies on SIGINT interrupting it (EINTR); a
    SIGINT that lands after the prompt is written but before ``read`` blocks runs
    Python's handler and leaves ``read`` waiting for the next line, so Ctrl-C at the
    prompt would do nothing. Here the wait is a ``select`` on the terminal and on a
    wakeup pipe (``signal.set_wakeup_fd``) that Python's C handler writes a byte to
    before the Python handler runs, so a signal at any moment ends the wait and the
    ``KeyboardInterrupt`` is raised from this loop. The terminal stays in canonical
    mode: its own line editing (backspace, Ctrl-U, Ctrl-W) applies, and ``read``
    returns whole lines. Use it as a context manager (the pipe, the old wakeup fd);
    main thread only.
    """

    def __init__(self, fd: int, out: TextIO) -> None:
        self._fd = fd
        self._out = out
        self._wake_r = self._wake_w = -1
        self._old_wakeup = -1

    def __enter__(self) -> LineReader:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.set_wakeup_fd(self._old_wakeup)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __call__(self, prompt: str) -> str:
        """Print ``prompt``, return the next line without its newline.

        Raises:
            EOFError: end of input (Ctrl-D at an empty line).
            KeyboardInterrupt: Ctrl-C (the line typed so far is dropped).
        """
        self._drain()  # signals handled before this prompt are not this wait's
        self._out.write(prompt)
        self._out.flush()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        parts: list[str] = []
        while True:  # each pass runs the Python handler of a signal that woke the wait
            ready, _, _ = select.select([self._fd, self._wake_r], [], [])
            if self._wake_r in ready:
                self._drain()
                continue
            data = os.read(self._fd, 65536)
            if not data:  # EOF: a partial line (Ctrl-D after text) is still a line
                parts.append(decoder.decode(b"", final=True))
                if not any(parts):
                    raise EOFError
                return "".join(parts)
            parts.append(decoder.decode(data))
            if parts[-1].endswith("\n"):
                return "".join(parts)[:-1]

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 512):
                pass


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``chat`` verb's own arguments (the connection options come from ``cli``)."""
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL", help="the model id")
    p.add_argument("--system", metavar="TEXT", help="a system message for the whole chat")
    p.add_argument(
        "--response-tokens",
        type=int,
        default=DEFAULT_RESPONSE_TOKENS,
        metavar="N",
        help=f"cap on the tokens of each reply (default: {DEFAULT_RESPONSE_TOKENS})",
    )
    p.add_argument("--temperature", type=float, help="sampling temperature (default: greedy)")
    p.add_argument("--seed", type=int, help="sampling seed (with --temperature)")


def run_chat(client: Client, args: argparse.Namespace) -> int:
    """Run the ``chat`` verb on an open client.

    Lines are read by ``LineReader``: the terminal's own line editing (backspace,
    Ctrl-U, Ctrl-W), not GNU readline, which handles each key in user space, so that a
    SIGINT landing while it does is only seen after the next key. ``LineReader`` waits
    on the terminal and a signal wakeup pipe together, so Ctrl-C at the prompt always
    works.
    """
    options: dict[str, Any] = {
        "response_tokens": args.response_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
    }
    with LineReader(sys.stdin.fileno(), sys.stdout) as read_line:
        chat = Chat(
            client,
            args.model,
            system=args.system,
            options={k: v for k, v in options.items() if v is not None},
            read_line=read_line,
        )
        return chat.run()
