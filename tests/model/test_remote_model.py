"""The real model across two daemons sharing one redis-server: a row warmed on A restores on B.

Daemon A runs a ~700-token prompt cold (greedy) and publishes its rows, which its meta
copies to the store. Daemon B, another run directory with the same model, context and
quantisation, gets the same prompt: its local tiers miss, its meta fetches A's row,
verifies it and promotes it into B's ram tier, and B's greedy tokens equal A's cold run
token for token (the row carries its logits: no re-decode).
"""

from __future__ import annotations

from typing import Any

import pytest

import erllama
from tests.model.test_daemon_model import CTX, POLICY, greedy, text
from tests.support.daemon import DaemonFactory, daemon_factory, wait_until
from tests.support.redis_server import RedisServer, redis_server

pytestmark = [pytest.mark.model, pytest.mark.timeout(600)]
__all__ = ["daemon_factory", "redis_server"]


def model(gguf: str) -> dict[str, Any]:
    return {"id": "warm", "backend": "llama", "model_path": gguf, "context_opts": CTX,
            "policy": POLICY}  # fmt: skip


def test_a_row_warmed_on_a_restores_exactly_on_b(
    daemon_factory: DaemonFactory, redis_server: RedisServer, gguf_path: str
) -> None:
    cache = {"tiers": [{"name": "ram", "budget_bytes": 1 << 30},
                       {"name": "remote", "url": redis_server.url}]}  # fmt: skip
    a = daemon_factory([model(gguf_path)], cache=cache, ready_timeout=300)
    b = daemon_factory([model(gguf_path)], cache=cache, ready_timeout=300)
    with (
        erllama.Client(a.endpoint, timeout=300) as ca,
        erllama.Client(b.endpoint, timeout=300) as cb,
    ):
        p = ca.tokenize("warm", text(11, 500))[:640]
        cold, s = greedy(ca, "warm", p)
        assert s.cache_hit_kind == "cold"
        wait_until(lambda: ca.counters()["remote_uploads"] >= 1, 60, what="A's rows uploaded")

        warm, s = greedy(cb, "warm", p)
        assert s.cache_hit_kind == "exact" and s.cache_delta.read == len(p)
        assert warm == cold
        got = cb.counters()
        assert got["remote_hits"] == 1 and got["remote_corrupt"] == 0
        assert got["remote_bytes_down"] > 1_000_000
