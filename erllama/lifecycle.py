"""A supervised child's life: start-up, the control channel to the root, clean exit.

Every child (meta, router, scheduler, gateway, worker) runs its ``main`` as
``lifecycle.run(role, run_dir, child_id, InitType, start)``; ``run`` does what
they all share, in this order:

1. ``set_parent_death_signal()``: die with the root (PR_SET_PDEATHSIG). The
   orphan check (``exit_if_orphaned``) runs before, in
   ``supervisor.entry.run_child``, which alone knows the parent's pid.
2. ``logs.setup(role, child_id)``.
3. SIGTERM/SIGINT handlers and a wakeup socketpair (``Child.wake_fd``): a
   handler only records the signal (and calls the ``Child.on_signal``
   listeners); the loop sees the fd readable and stops. The gateway opts out:
   uvicorn handles its signals.
4. ``ControlLink.handshake()``: connect a DEALER (identity = child id) to the
   root's ``control.sock``, send ``Hello``, receive ``Init`` within a deadline
   (no Init: ``event=handshake_failed``, exit 1); ``inits.decode_init`` types
   its payload (a bad one: ``StartFailed(bad_request, "bad <role> config: ...")``).
5. ``start(child, init)``, the child's own start work, returning ``Started(loop,
   info)``. An ``ErllamaError`` it raises is answered ``StartFailed(code,
   message)``, any other exception ``StartFailed(internal)`` with its
   traceback logged; then the child exits ``failed_status`` (0).
6. ``Ready(info)`` (unless ``info`` is None: the loop sends it, the gateway
   once uvicorn serves), then ``loop()``: its return value is the exit status.
   An exception out of the loop is logged ``event=<role>_failed``, exit 1.
7. Whatever happened: the child's ``on_exit`` callbacks (last registered
   first), the signal handlers restored, the link closed, the context
   destroyed.

In its loop a child hands every frame set received on ``link.socket`` to
``link.handle(frames)``: pings are answered there with ``Pong``; ``Stop`` and
anything else come back to the caller.

A socket belongs to the thread that uses it (sockets are not thread-safe): the
main thread creates the link and does the handshake; a worker then gives it to
its IO thread (``Child.hand_over``), the gateway to its control thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple, TypeVar

import zmq

from erllama import logs
from erllama.inits import ChildInit, decode_init
from erllama.protocol.codec import Decoder, encode
from erllama.protocol.errors import ErllamaError, ErrorCode, ProtocolError, TransportError
from erllama.protocol.messages import (
    ControlMessage,
    Hello,
    Init,
    Msg,
    Ping,
    Pong,
    Ready,
    Role,
    StartFailed,
    Stop,
)
from erllama.protocol.sockets import CONTROL_SOCK, ipc_endpoint, make_socket

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
HANDSHAKE_TIMEOUT_S = 30.0
CONTEXT_LINGER_MS = 500  # for sockets still open at exit (a start that failed half-way)

InitT = TypeVar("InitT", bound=ChildInit)


def set_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        except OSError:  # pragma: no cover - no libc symbol
            log.warning("prctl(PR_SET_PDEATHSIG) unavailable")


def exit_if_orphaned(expected_ppid: int | None) -> None:
    """The parent may have died before PDEATHSIG was armed: check it."""
    if expected_ppid is not None and os.getppid() != expected_ppid:
        log.error("event=orphaned parent %d is gone; exiting", expected_ppid)
        os._exit(1)


class ControlLink:
    """The child's DEALER to the root's control socket.

    ``progress`` gives the ``(active, progress)`` a ``Pong`` carries; a child sets
    it once it has counters (the default answers ``(0, 0)``).
    """

    def __init__(
        self, ctx: zmq.Context[zmq.Socket[bytes]], run_dir: str | Path, role: Role, child_id: str
    ) -> None:
        self.role: Role = role
        self.child_id = child_id
        self.socket = make_socket(
            ctx,
            zmq.DEALER,
            connect=ipc_endpoint(run_dir, CONTROL_SOCK),
            identity=child_id.encode(),
        )
        self._decoder: Decoder[ControlMessage] = Decoder(ControlMessage)
        self.progress: Callable[[], tuple[int, int]] = lambda: (0, 0)
        self.incarnation = 0

    def send(self, msg: Msg) -> None:
        self.socket.send_multipart(encode(msg), copy=True)

    def handshake(self, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> Init:
        """Send Hello and wait for Init (ProtocolError/TransportError on failure)."""
        self.send(Hello(role=self.role, child_id=self.child_id, pid=os.getpid()))
        if not self.socket.poll(int(timeout_s * 1000)):
            raise TransportError(
                f"no Init from the supervisor within {timeout_s}s", code=ErrorCode.TIMEOUT
            )
        msg = self._decoder.decode(self.socket.recv_multipart())
        if not isinstance(msg, Init):
            raise ProtocolError(f"expected init, got {type(msg).__name__}")
        self.incarnation = msg.incarnation
        return msg

    def ready(self, info: dict[str, Any] | None = None) -> None:
        self.send(Ready(info=info or {}))

    def handle(self, frames: list[bytes]) -> ControlMessage | None:
        """Answer pings; return any other decoded message (None for bad input)."""
        try:
            msg = self._decoder.decode(frames)
        except ProtocolError as exc:
            log.warning("bad control message dropped: %s", exc)
            return None
        if isinstance(msg, Ping):
            active, progress = self.progress()
            self.send(Pong(seq=msg.seq, active=active, progress=progress))
            return None
        return msg

    def close(self) -> None:
        self.socket.close(linger=200)


class Started(NamedTuple):
    """What a child's start function returns."""

    loop: Callable[[], int]  # the child's loop; its return value is the exit status
    info: dict[str, Any] | None  # ``Ready.info``; None: the loop sends Ready itself


class Child:
    """What a child's start function and loop are given: its context, link and signals."""

    def __init__(self, role: Role, run_dir: str, child_id: str, *, handle_signals: bool) -> None:
        self.role: Role = role
        self.run_dir = run_dir
        self.child_id = child_id
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.link = ControlLink(self.ctx, run_dir, role, child_id)
        self._send: Callable[[Msg], None] = self.link.send
        self._owns_link = True
        self._term_context = True
        self._cleanup = contextlib.ExitStack()
        self._signals: list[int] = []
        self._listeners: list[Callable[[int], None]] = []
        self._old_handlers: dict[int, Any] = {}
        self._old_fd = -1
        self._wake: tuple[socket.socket, socket.socket] | None = None
        if handle_signals:
            self._install_signals()

    # ------------------------------------------------------------ signals
    def _install_signals(self) -> None:
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        self._wake = r, w
        self._old_fd = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)  # only record: the wakeup fd wakes the loop
        for listener in self._listeners:
            listener(signum)

    @property
    def wake_fd(self) -> int:
        """An fd to poll: readable once SIGTERM or SIGINT has arrived."""
        assert self._wake is not None, "this child does not handle signals"
        return self._wake[0].fileno()

    def signalled(self) -> bool:
        """Empty the wakeup fd; whether SIGTERM or SIGINT has arrived."""
        if self._wake is not None:
            with contextlib.suppress(BlockingIOError):
                while self._wake[0].recv(512):
                    pass
        return bool(self._signals)

    def watch(self, poller: zmq.Poller) -> None:
        """Register the control socket and the wakeup fd (``should_stop`` reads both)."""
        poller.register(self.link.socket, zmq.POLLIN)
        if self._wake is not None:
            poller.register(self.wake_fd, zmq.POLLIN)

    def should_stop(
        self,
        events: Mapping[Any, int],
        on_message: Callable[[ControlMessage], None] | None = None,
    ) -> bool:
        """After a poll of ``watch``'s poller: whether to stop (a signal or ``Stop``, logged
        ``event=stop``). Pings are answered; other control messages go to ``on_message``."""
        if self._wake is not None and events.get(self.wake_fd) and self.signalled():
            log.info("event=stop reason=signal")
            return True
        if events.get(self.link.socket):
            while self.link.socket.poll(0):
                msg = self.link.handle(self.link.socket.recv_multipart())
                if isinstance(msg, Stop):
                    log.info("event=stop reason=control")
                    return True
                if msg is not None and on_message is not None:
                    on_message(msg)
                elif msg is not None:
                    log.debug("control message %s ignored", type(msg).__name__)
        return False

    def on_signal(self, listener: Callable[[int], None]) -> None:
        """Also call ``listener(signum)`` from the handler (it must only enqueue), and now
        for each signal that came before (twice at worst, never missed)."""
        self._listeners.append(listener)
        for signum in list(self._signals):
            listener(signum)

    # ------------------------------------------------------------ ownership
    def on_exit(self, callback: Callable[..., object], *args: Any) -> None:
        """Call ``callback(*args)`` at exit, before the link and the context close."""
        self._cleanup.callback(callback, *args)

    def hand_over(self, send: Callable[[Msg], None]) -> None:
        """The link now belongs to another thread, which closes it: from here on
        ``Ready`` / ``StartFailed`` go through ``send``."""
        self._send = send
        self._owns_link = False

    def keep_context(self) -> None:
        """Exit without ending the context: a thread still holds its sockets (it would hang)."""
        self._term_context = False

    def send(self, msg: Msg) -> None:
        """A message to the root, through whichever thread owns the link."""
        self._send(msg)

    def bad_config(self, exc: Exception) -> ErllamaError:
        """The ``bad_request`` start failure for a config this child cannot use."""
        text = exc.message if isinstance(exc, ErllamaError) else str(exc)
        return ErllamaError(f"bad {self.role} config: {text}", code=ErrorCode.BAD_REQUEST)

    def start_failed(self, code: str, message: str) -> None:
        log.error("event=start_failed code=%s %s", code, message)
        self.send(StartFailed(code=code, message=message))

    def close(self) -> None:
        try:
            self._cleanup.close()
        finally:
            if self._wake is not None:
                for sig, old in self._old_handlers.items():
                    signal.signal(sig, old)
                signal.set_wakeup_fd(self._old_fd)
                for s in self._wake:
                    s.close()
                self._wake = None
            if self._owns_link:
                self.link.close()
            if self._term_context:
                self.ctx.destroy(linger=CONTEXT_LINGER_MS)  # also what a failed start left open


def run(
    role: Role,
    run_dir: str,
    child_id: str,
    init_type: type[InitT],
    start: Callable[[Child, InitT], Started],
    *,
    handle_signals: bool = True,
    failed_status: int = 0,
) -> int:
    """Run a child's life (see the module docstring); returns its exit status.

    Args:
        role, run_dir, child_id: who the child is and where the root's sockets are.
        init_type: the ``Init`` payload the child expects (``inits``).
        start: the child's start work; raises to refuse (``StartFailed``).
        handle_signals: False when the loop handles SIGTERM/SIGINT itself (uvicorn).
        failed_status: the exit status after ``StartFailed``.
    """
    set_parent_death_signal()
    logs.setup(role, child_id)
    child = Child(role, run_dir, child_id, handle_signals=handle_signals)
    try:
        try:
            init = child.link.handshake()
        except ErllamaError as exc:
            log.error("event=handshake_failed reason=%s", exc)
            return 1
        try:
            try:
                payload = decode_init(init.config, init_type)
            except ProtocolError as exc:
                raise child.bad_config(exc) from None
            started = start(child, payload)
        except ErllamaError as exc:
            child.start_failed(exc.code, exc.message)
            return failed_status
        except Exception as exc:
            log.exception("%s start crashed", role)
            child.start_failed(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            return failed_status
        if started.info is not None:
            child.send(Ready(info=started.info))
        try:
            return started.loop()
        except ErllamaError as exc:
            log.error("event=%s_failed reason=%s", role, exc)
            return 1
        except Exception:
            log.exception("event=%s_failed", role)
            return 1
    finally:
        child.close()


def run_module(
    package: str,
    main: Callable[[str, str], int],
    argv: list[str],
    *,
    default_child_id: str | None = None,
) -> int:
    """``python -m <package> RUN_DIR CHILD_ID``: a child run by hand (normally the root runs it)."""
    if len(argv) == 2 or (len(argv) == 1 and default_child_id is not None):
        return main(argv[0], argv[1] if len(argv) == 2 else str(default_child_id))
    child = "[CHILD_ID]" if default_child_id is not None else "CHILD_ID"
    sys.stderr.write(f"usage: python -m {package} RUN_DIR {child}\n")
    return 2
