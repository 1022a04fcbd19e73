"""``erllama.chat_cli.LineReader``: lines of a real pty or pipe, EOF, and Ctrl-C at any moment."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import threading
from collections.abc import Iterator

import pytest

from erllama.chat_cli import LineReader

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        with contextlib.suppress(OSError):
            os.close(fd)


def test_reads_a_line_of_a_pty_after_the_prompt() -> None:
    master, slave = os.openpty()
    try:
        out = io.StringIO()
        os.write(master, "héllo wörld\n".encode())
        with LineReader(slave, out) as read_line:
            assert read_line("> ") == "héllo wörld"
        assert out.getvalue() == "> "
    finally:
        os.close(master)
        os.close(slave)


def test_pipe_lines_then_a_partial_line_then_eof(pipe: tuple[int, int]) -> None:
    r, w = pipe
    os.write(w, b"one\n")
    with LineReader(r, io.StringIO()) as read_line:
        assert read_line("> ") == "one"
        os.write(w, b"tw\xc3\xa9")  # no newline: EOF ends the line
        os.close(w)
        assert read_line("> ") == "twé"
        with pytest.raises(EOFError):
            read_line("> ")


def test_eof_at_an_empty_line(pipe: tuple[int, int]) -> None:
    r, w = pipe
    os.close(w)
    with LineReader(r, io.StringIO()) as read_line, pytest.raises(EOFError):
        read_line("> ")


def test_the_wakeup_fd_is_restored(pipe: tuple[int, int]) -> None:
    before = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(before)
    with LineReader(pipe[0], io.StringIO()):
        during = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(during)
        assert during not in (-1, before)
    assert signal.set_wakeup_fd(before) == before


class _PromptOut(io.StringIO):
    """Sets ``prompted`` when the prompt is flushed: the reader is about to wait."""

    def __init__(self) -> None:
        super().__init__()
        self.prompted = threading.Event()

    def flush(self) -> None:
        super().flush()
        self.prompted.set()


def test_sigint_right_after_the_prompt_always_interrupts(pipe: tuple[int, int]) -> None:
    """A SIGINT landing anywhere in the wait, even before ``select`` blocks, ends it.

    ``input()`` lost the SIGINTs that came between the prompt and its blocking ``read``;
    here a thread sends one the moment each prompt is flushed, 200 times, and every
    wait must end in ``KeyboardInterrupt`` (a lost one hangs until the test's timeout).
    """
    main = threading.get_ident()
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    out = _PromptOut()
    stop = threading.Event()

    def interrupter() -> None:
        while True:
            out.prompted.wait()
            out.prompted.clear()
            if stop.is_set():
                return
            signal.pthread_kill(main, signal.SIGINT)

    t = threading.Thread(target=interrupter, daemon=True)
    t.start()
    interrupted = 0
    try:
        with LineReader(pipe[0], out) as read_line:
            for _ in range(200):
                with pytest.raises(KeyboardInterrupt):
                    read_line("> ")
                interrupted += 1
            stop.set()
            os.write(pipe[1], b"done\n")
            assert read_line("> ") == "done"
    finally:
        stop.set()
        out.prompted.set()
        t.join(10)
        signal.signal(signal.SIGINT, old)
    assert interrupted == 200


def test_sigint_allowed_restores_the_mask_it_found() -> None:
    from erllama.chat_cli import sigint_allowed, sigint_blocked

    before = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    with sigint_allowed():
        assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, ())
    assert signal.pthread_sigmask(signal.SIG_BLOCK, ()) == before
    with sigint_blocked():
        with sigint_allowed():
            assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, ())
        assert signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, ())
    assert signal.pthread_sigmask(signal.SIG_BLOCK, ()) == before
