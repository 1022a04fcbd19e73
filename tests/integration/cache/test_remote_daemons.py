"""Two (three) real daemons, stub backend, one real redis-server: the shared remote tier end to end.

Each daemon has its own run directory and ram tier; their cache configs name the same
store. A prompt warmed on A is a warm hit on B with A's output; a daemon whose model has
another fingerprint never gets A's rows; the store killed mid-traffic costs no request,
and after its restart the tier fills again. ``status`` and the gateway's ``/metrics``
show the remote tier.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import erllama
from tests.support.daemon import Daemon, DaemonFactory, daemon_factory, stub_model, wait_until
from tests.support.redis_server import RedisServer, redis_server

pytestmark = pytest.mark.timeout(120)
__all__ = ["daemon_factory", "redis_server"]

PROMPT = "a system prompt long enough to be saved: " + "lorem ipsum dolor sit amet " * 6


def cache(server: RedisServer) -> dict[str, Any]:
    return {
        "policy": {"min_tokens": 8, "cold_min_tokens": 8},
        "tiers": [
            {"name": "ram", "budget_bytes": 1 << 28},
            {"name": "remote", "url": server.url, "timeout_ms": 200},
        ],
    }


@pytest.fixture
def clients() -> Iterator[list[erllama.Client]]:
    opened: list[erllama.Client] = []
    yield opened
    for c in opened:
        c.close()


def client(d: Daemon, opened: list[erllama.Client]) -> erllama.Client:
    c = erllama.Client(d.endpoint, timeout=30)
    opened.append(c)
    return c


def ask(c: erllama.Client, model: str, prompt: str = PROMPT) -> erllama.Completion:
    return c.complete(model, prompt, response_tokens=8)


def test_a_prompt_warmed_on_a_is_a_warm_hit_on_b(
    daemon_factory: DaemonFactory, redis_server: RedisServer, clients: list[erllama.Client]
) -> None:
    a = daemon_factory([stub_model("m")], cache=cache(redis_server))
    b = daemon_factory([stub_model("m")], cache=cache(redis_server), http={"listen": "127.0.0.1:0"})
    other = daemon_factory(
        [{**stub_model("m"), "fingerprint": "ab" * 32}], cache=cache(redis_server)
    )
    ca, cb, co = client(a, clients), client(b, clients), client(other, clients)

    cold = ask(ca, "m")
    assert cold.cache_hit_kind == "cold"
    wait_until(lambda: ca.counters()["remote_uploads"] >= 2, 10, what="A's rows uploaded")

    # another fingerprint: probes the store, never gets A's rows
    assert ask(co, "m").cache_hit_kind == "cold"
    got = co.counters()
    assert got["remote_probes"] >= 1 and got["remote_hits"] == 0

    warm = ask(cb, "m")
    assert warm.cache_hit_kind == "exact"
    assert warm.reply == cold.reply and warm.generated == cold.generated
    got = cb.counters()
    assert got["remote_hits"] == 1 and got["remote_errors"] == 0
    assert got["remote_bytes_down"] > 0 and got["remote_fetch_ns"] > 0

    tiers = {t.name: t for t in cb.daemon_status().tiers}
    assert tiers["remote"].path == redis_server.url and tiers["ram"].rows >= 1
    status = subprocess.run(
        [sys.executable, "-m", "erllama", "status", "--endpoint", b.endpoint, "--timeout", "10"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert redis_server.url in status
    cache_line = next(line for line in status.splitlines() if line.startswith("cache: "))
    for field in ("remote_hits=1", "remote_misses=0", "remote_errors=0"):
        assert field in cache_line.split(), cache_line
    text = httpx.get(f"{b.http_url()}/metrics").text
    assert "erllama_remote_hits 1.0" in text
    assert "erllama_remote_errors 0.0" in text
    assert "erllama_remote_fetch_seconds" in text


def test_the_store_lost_mid_traffic_fails_no_request(
    daemon_factory: DaemonFactory, redis_server: RedisServer, clients: list[erllama.Client]
) -> None:
    a = daemon_factory([stub_model("m")], cache=cache(redis_server))
    b = daemon_factory([stub_model("m")], cache=cache(redis_server))
    ca, cb = client(a, clients), client(b, clients)
    for i in range(3):
        ask(ca, "m", f"turn {i}: {PROMPT}")
    redis_server.kill()
    # both daemons keep serving from their local tiers: cold on B, exact on A
    for i in range(3):
        assert ask(cb, "m", f"again {i}: {PROMPT}").cache_hit_kind == "cold"
        assert ask(ca, "m", f"turn {i}: {PROMPT}").cache_hit_kind == "exact"
        ask(ca, "m", f"down {i}: {PROMPT}")
    assert cb.counters()["remote_errors"] + cb.counters()["remote_skipped"] >= 1
    wait_until(lambda: ca.counters()["remote_errors"] >= 1, 10, what="A saw the store down")

    redis_server.start()  # empty again, same port
    fresh = ask(ca, "m", f"after the restart: {PROMPT}")
    wait_until(lambda: ca.counters()["remote_reconnects"] >= 1, 30, what="A reconnected")

    def b_warm() -> bool:
        return ask(cb, "m", f"after the restart: {PROMPT}").cache_hit_kind == "exact"

    wait_until(b_warm, 30, what="B warm from the refilled store")
    assert ask(cb, "m", f"after the restart: {PROMPT}").generated == fresh.generated
    got = cb.counters()
    assert got["remote_corrupt"] == 0 and got["remote_hits"] >= 1
