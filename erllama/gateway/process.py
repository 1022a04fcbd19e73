"""The gateway child: handshake with the root, serve HTTP with uvicorn, stop on request.

Sockets:
    connects  DEALER ``control.sock`` (identity = child id; Hello/Init/Ready, pings, Stop)
    connects  DEALER the router's ipc client endpoint (through ``AsyncClient``)
    connects  with ``[http] upstreams``: a DEALER to the router and to each upstream
              (through ``AsyncClusterClient``), for generation
    binds     TCP ``[http] listen`` (HTTP/1.1, uvicorn)

Init: ``erllama.inits.GatewayInit``.

Start (``lifecycle.run`` does the handshake; a refused start exits 1): the
listening socket is bound here, before uvicorn starts, so a busy or
forbidden address is a clear ``start_failed`` (``eaddrinuse`` / ``eacces``) instead of
a log line; Ready carries the bound ``listen`` address (port 0 picks a free one). The
control link lives on its own thread: it answers pings and turns ``Stop`` into
uvicorn's graceful exit (open connections finish, then the router client closes).
SIGTERM (also the parent-death signal) does the same through uvicorn's handler.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import threading

import uvicorn

from erllama import lifecycle
from erllama.config import parse_listen
from erllama.gateway.app import build_app
from erllama.gateway.h11guard import GuardedH11Protocol
from erllama.inits import GatewayInit
from erllama.protocol.errors import ErllamaError, ErrorCode
from erllama.protocol.messages import Stop

log = logging.getLogger(__name__)
CONTROL_POLL_MS = 200


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (OSError when the address is busy or not allowed)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(512)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, telling the control thread when it serves (lifespan done)."""

    def __init__(self, config: uvicorn.Config, serving: threading.Event, listen: str) -> None:
        super().__init__(config)
        self._serving, self._listen = serving, listen

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and not self.should_exit:
            log.info("event=http_listening listen=%s", self._listen)
            self._serving.set()


def _control_loop(
    link: lifecycle.ControlLink,
    server: uvicorn.Server,
    started: threading.Event,
    info: dict[str, str],
    done: threading.Event,
) -> None:
    """The control thread: Ready once uvicorn serves, pings, Stop -> graceful exit."""
    while not done.is_set() and not started.wait(0.05):
        pass
    if done.is_set():
        return
    link.ready(info)
    while not done.is_set():
        if not link.socket.poll(CONTROL_POLL_MS):
            continue
        msg = link.handle(link.socket.recv_multipart())
        if isinstance(msg, Stop):
            log.info("event=stop reason=requested")
            server.should_exit = True


def main(run_dir: str, child_id: str) -> int:
    """Entry of the gateway process (``erllama.supervisor.entry.run_child``)."""
    # uvicorn handles SIGTERM/SIGINT itself; a refused start exits 1
    return lifecycle.run(
        "gateway", run_dir, child_id, GatewayInit, _start, handle_signals=False, failed_status=1
    )


def _start(child: lifecycle.Child, cfg: GatewayInit) -> lifecycle.Started:
    """Bind the listening socket, build the app; the loop serves it (Ready once it does)."""
    try:
        addr = parse_listen(cfg.http.listen)
        if addr is None:
            raise ValueError("http.listen is off: the gateway should not run")
    except ValueError as exc:
        raise child.bad_config(exc) from None
    try:
        sock = bind(*addr)
    except OSError as exc:
        code = {errno.EADDRINUSE: "eaddrinuse", errno.EACCES: ErrorCode.EACCES}.get(
            exc.errno or 0, ErrorCode.FAILED
        )
        raise ErllamaError(
            f"cannot listen on {cfg.http.listen}: {exc.strerror}", code=code
        ) from None
    host, port = sock.getsockname()[:2]
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        app = build_app(cfg.http, cfg.endpoint)
    except (ValueError, OSError) as exc:  # api_keys_file, upstream CURVE keys
        sock.close()
        raise ErllamaError(str(exc), code=ErrorCode.BAD_REQUEST) from None
    serving = threading.Event()
    server = _Server(
        uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="on",
            http=GuardedH11Protocol,
            timeout_keep_alive=int(max(1, cfg.http.idle_timeout_s)),
            limit_concurrency=cfg.http.max_connections,
            h11_max_incomplete_event_size=cfg.http.max_header_bytes,
            timeout_graceful_shutdown=10,
        ),
        serving,
        listen,
    )
    info = {"listen": listen, "pid": str(os.getpid())}
    done = threading.Event()
    thread = threading.Thread(
        target=_control_loop,
        args=(child.link, server, serving, info, done),
        name="gateway-control",
        daemon=True,
    )

    def stop_control() -> None:
        done.set()
        thread.join(timeout=2)

    def loop() -> int:
        thread.start()
        child.on_exit(stop_control)
        asyncio.run(server.serve(sockets=[sock]))
        return 0

    return lifecycle.Started(loop, None)
