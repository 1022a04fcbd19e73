"""The lifecycle event stream: a PUB socket on ``ipc://<run_dir>/events.sock``.

Each event is two frames: ``[event word, msgpack dict]``. The first frame lets
a subscriber filter by word (``sub.subscribe(b"ready")``); the dict always has
``event``, ``child``, ``pid`` and ``ts`` (wall clock, for humans), plus fields
of that event. The words are stable:

========  ============================================================
spawn     a child process was started (``incarnation``)
ready     a child finished its handshake; ``child="root"``: the daemon is up
exit      a child process exited (``code``, ``reason``)
restart   a child is being started again after a crash (``restarts``)
backoff   a restart was scheduled (``delay_s``)
failed    a child exceeded its restart intensity or could not start (``reason``)
stop      a child stopped by request; ``child="root"``: the daemon is stopping
sleep     a worker stopped to sleep (``reason``: keep_alive, pressure, request);
          its model stays registered as ``sleeping``
wake      a sleeping model's worker is being started again (a ``spawn`` follows)
========  ============================================================

Every event is also logged as ``event=<word> child=<id> pid=<pid> ...``. PUB
never blocks: with no subscriber, events are dropped.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import msgspec
import zmq

from erllama.protocol.sockets import make_socket

log = logging.getLogger(__name__)

EVENT_WORDS = frozenset(
    {"spawn", "ready", "exit", "restart", "backoff", "failed", "stop", "sleep", "wake"}
)

_encoder = msgspec.msgpack.Encoder()


class EventPublisher:
    """Owns the PUB socket (bound by the root)."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
        self.socket = make_socket(ctx, zmq.PUB, bind=endpoint, linger_ms=200)
        self.socket.setsockopt(zmq.SNDHWM, 10_000)

    def publish(self, event: str, child: str, pid: int | None = None, **fields: Any) -> None:
        """Log and publish one lifecycle event (never raises on a full or absent subscriber)."""
        if event not in EVENT_WORDS:
            raise ValueError(f"unknown event word {event!r}")
        body: dict[str, Any] = {"event": event, "child": child, "pid": pid, **fields}
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        log.info("event=%s child=%s pid=%s %s", event, child, pid, extra)
        body["ts"] = time.time()
        with contextlib.suppress(zmq.Again):  # PUB drops rather than blocks
            self.socket.send_multipart([event.encode(), _encoder.encode(body)], flags=zmq.NOBLOCK)

    def close(self) -> None:
        self.socket.close(linger=200)


def decode_event(frames: list[bytes]) -> dict[str, Any]:
    """Decode ``[word, body]`` as published above (for subscribers and tests)."""
    body = msgspec.msgpack.decode(frames[-1])
    if not isinstance(body, dict):
        raise ValueError("event body is not a map")
    return body
