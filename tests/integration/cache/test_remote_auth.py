"""The remote tier on a store that requires a password (``requirepass``).

Meta A and meta B know the password: a row A publishes is a hit on B. Meta C has a
wrong one: its lookups are misses counted as ``remote_errors``, never a failure.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from erllama.cache.tiers import publish
from tests.support.cache import (
    NAMESPACE,
    MetaEnv,
    kvc_meta,
    meta_env,
    packed,
    payload_for,
    wait_until,
)
from tests.support.redis_server import RedisServer, running_redis

pytestmark = pytest.mark.timeout(90)

PASSWORD = "s3cret-for-tests"
ROW_TOKENS = list(range(1, 301))


@pytest.fixture
def locked_store(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path, password=PASSWORD) as server:
        yield server


def remote(server: RedisServer, password: str) -> dict[str, object]:
    return {"url": server.url, "password": password, "chunk_bytes": 16384, "timeout_ms": 200}


def env(
    tmp_path: Path, name: str, server: RedisServer, password: str
) -> AbstractContextManager[MetaEnv]:
    sub = tmp_path / name
    sub.mkdir()
    return meta_env(sub, tiers=("ram",), remote=remote(server, password))


def test_password_protected_store(tmp_path: Path, locked_store: RedisServer) -> None:
    with (
        env(tmp_path, "a", locked_store, PASSWORD) as a,
        env(tmp_path, "b", locked_store, PASSWORD) as b,
        env(tmp_path, "c", locked_store, "wrong") as c,
    ):
        ca, cb, cc = a.client(), b.client(), c.client()
        meta = kvc_meta(ROW_TOKENS)
        out = publish(ca, a.layout, "ram", meta, payload_for(meta.key(), 50_000), writer_id="t")
        assert out.status == "fired", out
        wait_until(lambda: ca.counters()["remote_uploads"] >= 1, 10, "the upload")

        found = cb.longest_prefix_checkout(NAMESPACE, packed(ROW_TOKENS), min_len=1)
        assert found is not None and found[0] == len(ROW_TOKENS)
        cb.checkin(found[1].pin_ref)
        assert cb.counters()["remote_hits"] == 1

        # the wrong password: a miss, counted, and meta goes on answering
        assert cc.longest_prefix_checkout(NAMESPACE, packed(ROW_TOKENS), min_len=1) is None
        wait_until(lambda: cc.counters()["remote_errors"] >= 1, 10, "the error counted")
        got = cc.counters()
        assert got["remote_hits"] == 0
        assert cc.longest_prefix_checkout(NAMESPACE, packed(ROW_TOKENS), min_len=1) is None
