"""``python -m erllama chat`` on a real pseudo-terminal against a real daemon (stub models).

The chat runs as the session leader of a pty (``pty.fork``), so a ``\\x03``
written to the master is a real Ctrl-C (SIGINT from the line discipline) and
``\\x04`` at an empty line a real EOF. Every wait reads the pty until the
expected text appears, with a deadline.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import select
import signal
import struct
import sys
import termios
import time
from collections.abc import Callable, Iterator

import pytest

from erllama import Client
from tests.support.daemon import (
    REPO,
    Daemon,
    DaemonFactory,
    daemon_factory,  # noqa: F401
    stub_model,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

# The stub "says" this after any prompt (no ':', the template's). The leading space: the
# template renders "assistant: " + the stripped reply, the very tokens the stub generated.
SCRIPT = " Hello there, this is the stub speaking to you."
WAIT_S = 30.0


class PtyChat:
    """``python -m erllama ARGS`` on a pty; ``expect`` reads until a text appears."""

    def __init__(self, args: list[str]) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ERLLAMA_")}
        env.update({"PYTHONPATH": str(REPO), "TERM": "dumb", "PYTHONUNBUFFERED": "1"})
        argv = [sys.executable, "-m", "erllama", *args]
        pid, fd = pty.fork()
        if pid == 0:  # the child: exec at once
            try:
                os.chdir(REPO)
                os.execve(sys.executable, argv, env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.buf = b""
        self.pos = 0  # what expect() has consumed
        self.status: int | None = None

    def _read(self, deadline: float, what: str) -> bool:
        """Read what is there (False at EOF: the child closed the pty)."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{what} not seen within the deadline; got {self.rest()!r}")
        ready, _, _ = select.select([self.fd], [], [], left)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the slave side is closed
            data = b""
        self.buf += data
        return bool(data)

    def rest(self) -> str:
        return self.buf[self.pos :].decode(errors="replace")

    def expect(self, text: str, timeout: float = WAIT_S) -> str:
        """Everything up to and including the next ``text``."""
        deadline = time.monotonic() + timeout
        needle = text.encode()
        while (i := self.buf.find(needle, self.pos)) < 0:
            if not self._read(deadline, repr(text)):
                raise AssertionError(f"EOF before {text!r}; got {self.rest()!r}")
        seen = self.buf[self.pos : i + len(needle)].decode(errors="replace")
        self.pos = i + len(needle)
        return seen

    def expect_re(self, pattern: str, timeout: float = WAIT_S) -> re.Match[bytes]:
        """The next match of ``pattern`` (consumed up to its end)."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern.encode())
        while (m := rx.search(self.buf, self.pos)) is None:
            if not self._read(deadline, repr(pattern)):
                raise AssertionError(f"EOF before {pattern!r}; got {self.rest()!r}")
        self.pos = m.end()
        return m

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait_exit(self, timeout: float = WAIT_S) -> int:
        """Read to EOF, then reap the child: its exit status."""
        deadline = time.monotonic() + timeout
        while self._read(deadline, "EOF"):
            pass
        _, status = os.waitpid(self.pid, 0)
        self.status = os.waitstatus_to_exitcode(status)
        return self.status

    def close(self) -> None:
        if self.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
        os.close(self.fd)


Spawn = Callable[[list[str]], PtyChat]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    chats: list[PtyChat] = []

    def start(args: list[str]) -> PtyChat:
        chat = PtyChat(args)
        chats.append(chat)
        return chat

    yield start
    for chat in chats:
        chat.close()


@pytest.fixture
def chat_daemon(daemon_factory: DaemonFactory) -> Daemon:  # noqa: F811
    # "m" replies the script at once; "slow" streams one token every 25 ms
    return daemon_factory(
        [stub_model("m", script=SCRIPT), stub_model("slow", token_delay_ms=25)],
        env={"ERLLAMA_LOG_LEVEL": "DEBUG"},  # the worker logs how each request finished
    )


FINISH = re.compile(r"event=finish request=\S+ reason=(\w+) .* prompt=(\d+) gen=")
CACHE = re.compile(r"\[cache: (\w+)(?: (\d+) tokens)?, prefill \d+ ms, (\d+) tokens [\d.]+ m?s")


def test_two_turns_then_ctrl_c_at_the_prompt_and_ctrl_d(chat_daemon: Daemon, spawn: Spawn) -> None:
    chat = spawn(["chat", "m", "--endpoint", chat_daemon.endpoint, "--system", "be brief"])
    chat.expect("chatting with m")
    chat.expect("> ")
    chat.send("hi\r")
    chat.expect(SCRIPT.strip())
    first = chat.expect("]")
    m = CACHE.search(first)
    assert m is not None and m.group(1) == "cold", first
    assert int(m.group(3)) == len(SCRIPT) + 1  # the script's bytes and the EOS
    chat.expect("> ")

    chat.send("and again\r")
    chat.expect(SCRIPT.strip())
    second = chat.expect("]")
    m = CACHE.search(second)
    assert m is not None, second
    # the whole first exchange (BOS, the rendered turn, the reply) is still live on the worker
    first_prompt = 1 + len("system: be brief\nuser: hi\nassistant:")
    assert m.group(1) == "partial" and int(m.group(2)) == first_prompt + len(SCRIPT), second
    chat.expect("> ")

    # Ctrl-C at the prompt: a hint, a fresh prompt. The text first, and its echo: a ^C that
    # reaches the pty before line editing reads the line flushes it with the input queue.
    chat.send("half a line")
    chat.expect("half a line")
    chat.send("\x03")
    chat.expect("Ctrl-D quits")
    chat.expect("> ")
    chat.send("\x04")  # Ctrl-D at an empty line
    assert chat.wait_exit() == 0


def test_ctrl_c_cancels_a_streaming_reply_and_the_chat_goes_on(
    chat_daemon: Daemon, spawn: Spawn
) -> None:
    chat = spawn(["chat", "slow", "--endpoint", chat_daemon.endpoint, "--response-tokens", "200"])
    chat.expect("> ")
    chat.send("talk for a while\r")
    chat.expect("talk for a while")  # the echo
    chat.expect_re(r"\S")  # the reply streams
    with Client(chat_daemon.endpoint, timeout=10) as c:
        assert c.status("slow") == "generating"
        chat.send("\x03")
        chat.expect("[cancelled]")
        chat.expect("> ")
        # the worker ended the request as cancelled (not at its 200 tokens, 5 s)
        wait_until(
            lambda: "reason=cancelled" in chat_daemon.log_path.read_text(errors="replace"),
            WAIT_S,
            what="the worker's cancelled finish",
        )
        wait_until(lambda: c.status("slow") == "idle", WAIT_S, what="slow idle")
        assert c.queue_depth("slow") == 0

    chat.send("now finish\r")
    chat.expect("now finish")
    chat.expect("[cache:")  # the random reply may hold a ']' but not this
    done = "[cache:" + chat.expect("]")
    m = CACHE.search(done)
    assert m is not None and m.group(3) == "200", done
    assert "finish length" in done
    # the cancelled turn left no trace: the prompt is this one user line alone
    finished = FINISH.findall(chat_daemon.log_path.read_text(errors="replace"))
    assert [r for r, _ in finished] == ["cancelled", "length"], finished
    assert int(finished[-1][1]) == 1 + len("user: now finish\nassistant:")
    chat.expect("> ")
    chat.send("\x04")
    assert chat.wait_exit() == 0


def test_an_unknown_model_fails_the_start_with_its_code(chat_daemon: Daemon, spawn: Spawn) -> None:
    chat = spawn(["chat", "nope", "--endpoint", chat_daemon.endpoint])
    chat.expect("error: model_not_loaded:")
    assert chat.wait_exit() == 1
    assert "> " not in chat.buf.decode(errors="replace")


def test_the_model_defaults_to_default(chat_daemon: Daemon, spawn: Spawn) -> None:
    chat = spawn(["chat", "--endpoint", chat_daemon.endpoint])
    chat.expect("error: model_not_loaded:")
    chat.expect("default")
    assert chat.wait_exit() == 1
