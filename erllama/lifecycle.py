"""The child side of the control channel: handshake, heartbeats, stop.

Every supervised child (meta, router, scheduler, worker) does the same
thing at start:

1. ``set_parent_death_signal()``: die with the root (PR_SET_PDEATHSIG), then
   check that the parent is still there.
2. ``ControlLink.handshake()``: connect a DEALER (identity = child id) to the
   root's ``control.sock``, send ``Hello``, receive ``Init`` (its config
   section) within a deadline.
3. Do its start work, then ``ready(info)`` (or ``start_failed(code, message)``).
4. In its loop, hand every frame set received on ``link.socket`` to
   ``link.handle(frames)``: pings are answered here with ``Pong``; ``Stop`` and
   anything else come back to the caller.

The socket belongs to the thread that created the link (sockets are not
thread-safe); a worker creates it in its IO thread.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from erllama.protocol.codec import Decoder, encode
from erllama.protocol.errors import ErrorCode, ProtocolError, TransportError
from erllama.protocol.messages import (
    ControlMessage,
    Hello,
    Init,
    Ping,
    Pong,
    Ready,
    Role,
    StartFailed,
)
from erllama.protocol.sockets import CONTROL_SOCK, ipc_endpoint, make_socket

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


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
    """The child's DEALER to the root's control socket."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        run_dir: str | Path,
        role: Role,
        child_id: str,
        *,
        progress: Callable[[], tuple[int, int]] | None = None,
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
        self._progress = progress or (lambda: (0, 0))
        self.incarnation = 0

    def send(self, msg: Any) -> None:
        self.socket.send_multipart(encode(msg), copy=True)

    def handshake(self, timeout_s: float = 30.0) -> Init:
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

    def start_failed(self, code: str, message: str) -> None:
        self.send(StartFailed(code=code, message=message))

    def handle(self, frames: list[bytes]) -> ControlMessage | None:
        """Answer pings; return any other decoded message (None for bad input)."""
        try:
            msg = self._decoder.decode(frames)
        except ProtocolError as exc:
            log.warning("bad control message dropped: %s", exc)
            return None
        if isinstance(msg, Ping):
            active, progress = self._progress()
            self.send(Pong(seq=msg.seq, active=active, progress=progress))
            return None
        return msg

    def close(self) -> None:
        self.socket.close(linger=200)
