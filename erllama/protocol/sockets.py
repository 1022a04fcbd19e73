"""The one socket factory and the endpoint naming.

Every process creates its sockets here, so linger, maximum message size,
identities and ROUTER options are set the same way everywhere.

Endpoints are ``ipc://`` files inside a private run directory (mode 0700).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import zmq

from erllama.protocol.codec import MAX_BODY_BYTES

ENDPOINT_ENV = "ERLLAMA_ENDPOINT"
RUN_DIR_ENV = "ERLLAMA_RUN_DIR"
LINGER_MS = 1000
MAX_MESSAGE_BYTES = MAX_BODY_BYTES + 4096

CLIENT_SOCK = "client.sock"
WORKERS_SOCK = "workers.sock"
CONTROL_SOCK = "control.sock"
META_SOCK = "meta.sock"
EVENTS_SOCK = "events.sock"
SCHEDULER_SOCK = "scheduler.sock"
# The scheduler's run-time settings (enable/disable, watermarks), kept across its own
# restarts; the root removes it at start and stop, so it lives as long as one daemon.
SCHEDULER_STATE = "scheduler.json"


def default_run_dir() -> Path:
    """``$ERLLAMA_RUN_DIR``, else ``$XDG_RUNTIME_DIR/erllama``, else ``/tmp/erllama-<uid>``."""
    env = os.environ.get(RUN_DIR_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "erllama"
    return Path(f"/tmp/erllama-{os.getuid()}")


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` with mode 0700 (or check an existing one is ours and private)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(f"run directory {path} belongs to uid {st.st_uid}, not us")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def ipc_endpoint(run_dir: Path | str, name: str) -> str:
    return f"ipc://{Path(run_dir) / name}"


def default_client_endpoint() -> str:
    """The endpoint ``Client()`` and ``erllama serve`` share (``$ERLLAMA_ENDPOINT`` wins)."""
    env = os.environ.get(ENDPOINT_ENV)
    if env:
        return env
    return ipc_endpoint(default_run_dir(), CLIENT_SOCK)


def make_socket(
    ctx: zmq.Context[zmq.Socket[bytes]],
    sock_type: int,
    *,
    bind: str | None = None,
    connect: str | None = None,
    identity: bytes | None = None,
    linger_ms: int = LINGER_MS,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    hwm: int = 0,
) -> zmq.Socket[bytes]:
    """Create a socket with our options, then bind or connect it.

    ``hwm`` 0 (the default) means no high-water mark: a reply is never dropped
    or refused because a queue is full (a dropped ``done`` would hang its
    client). Every stream is bounded by its request's ``response_tokens``.
    """
    sock = ctx.socket(sock_type)
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if sock_type == zmq.ROUTER:
        # a restarted worker reconnects with the same identity: the new pipe wins
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # unroutable replies (client gone) raise instead of vanishing silently
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if bind is not None:
        sock.bind(bind)
    if connect is not None:
        sock.connect(connect)
    return sock


def remove_socket_file(path: str, ino: int | None) -> None:
    """libzmq (4.3.5) leaves a bound ipc file behind: remove ours, never a successor's.

    ``ino`` is the inode the file had right after our bind (None: nothing to remove).
    """
    if ino is None:
        return
    try:
        if os.stat(path).st_ino == ino:
            os.unlink(path)
    except OSError:
        pass
