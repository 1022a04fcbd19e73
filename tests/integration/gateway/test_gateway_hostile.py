"""Hostile HTTP against the gateway: silent and byte-at-a-time clients, huge headers,
garbage. Each gets a clear error or a closed connection; no process dies; the gateway
keeps answering (its pid never changes)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.daemon import Daemon, stub_model

pytestmark = pytest.mark.timeout(120)
IDLE_S = 1.0


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[Daemon]:
    config = {
        "models": [stub_model("m", script="ok")],
        "supervisor": {"heartbeat_interval_s": 1.0, "term_timeout_s": 3.0},
        "http": {"listen": "127.0.0.1:0", "idle_timeout_s": IDLE_S, "max_connections": 64},
    }
    d = Daemon(tmp_path, config, ready_timeout=60)
    try:
        yield d
    finally:
        d.teardown()


def addr(d: Daemon) -> tuple[str, int]:
    host, port = d.http_url().removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def closed_by_server(s: socket.socket) -> bool:
    """True when the server closes the connection (recv gives EOF) before the socket timeout."""
    try:
        while True:
            data = s.recv(4096)
            if not data:
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_silent_and_slow_clients_are_closed_and_others_served(gw: Daemon) -> None:
    pid = gw.child_pid("gateway")
    url = gw.http_url()
    silent = [socket.create_connection(addr(gw), timeout=10 * IDLE_S) for _ in range(40)]
    slow = socket.create_connection(addr(gw), timeout=10 * IDLE_S)
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHo")  # a head that never completes
    try:
        # while they hang, real requests are answered
        r = httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ok"
        for s in [*silent, slow]:  # each is closed by the head deadline, well before 10 s
            assert closed_by_server(s)
    finally:
        for s in [*silent, slow]:
            s.close()
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert gw.child_pid("gateway") == pid


def test_garbage_and_oversized_heads_get_an_error_or_a_close(gw: Daemon) -> None:
    pid = gw.child_pid("gateway")
    url = gw.http_url()
    with socket.create_connection(addr(gw), timeout=10) as s:
        s.sendall(b"\x16\x03\x01\x02\x00garbage that is not http\r\n\r\n")
        head = s.recv(4096)
        assert head == b"" or head.startswith(b"HTTP/1.1 400")
    with socket.create_connection(addr(gw), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n")
        head = s.recv(4096)
        assert head == b"" or head.split(b" ")[1] in (b"400", b"431")
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": 5, "messages": []})
    assert r.status_code == 400 and "model" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/messages", content=b"[]")
    assert r.status_code == 400 and r.json()["type"] == "error"
    r = httpx.post(f"{url}/api/chat", content=b"{}")
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.get(f"{url}/v1/chat/completions")
    assert r.status_code == 405
    assert httpx.get(f"{url}/health").status_code == 200
    assert gw.child_pid("gateway") == pid
