"""Two cache-meta processes share one real redis-server (the remote tier, cache/remote*.py).

Meta A publishes rows locally; its uploader copies them to the store. Meta B misses
locally, probes the store, fetches, verifies and promotes the row into its own ram
tier, and answers the ``longest_prefix_checkout`` with a pin on that normal ram row.
Faults: rows of another namespace, corrupted and truncated chunks, the store killed
and restarted in the middle of traffic.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import redis

from erllama.cache.client import MetaClient
from erllama.cache.keys import PrefixHasher, make_key_packed
from erllama.cache.kvc import KvcMeta
from erllama.cache.remote import (
    chunk_key,
    decode_manifest,
    decode_pointer,
    encode_pointer,
    manifest_key,
    pointer_key,
)
from erllama.cache.tiers import load_row, publish
from tests.support.cache import (
    CTX,
    NAMESPACE,
    QUANT,
    MetaEnv,
    kvc_meta,
    meta_env,
    packed,
    payload_for,
    wait_until,
)
from tests.support.redis_server import RedisServer, redis_server

pytestmark = pytest.mark.timeout(90)
__all__ = ["redis_server"]

PREFIX = "erllama:v1:"
ROW_TOKENS = list(range(1, 301))
FP2 = hashlib.sha256(b"another model").digest()


def remote_cfg(server: RedisServer, **extra: object) -> dict[str, object]:
    return {"url": server.url, "chunk_bytes": 16384, "timeout_ms": 200, **extra}


@pytest.fixture
def pair(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[MetaEnv, MetaEnv]]:
    """Meta A and meta B, each with its own ram tier, both on ``redis_server``."""
    with ExitStack() as stack:
        envs = []
        for name in ("a", "b"):
            sub = tmp_path / name
            sub.mkdir()
            envs.append(
                stack.enter_context(meta_env(sub, tiers=("ram",), remote=remote_cfg(redis_server)))
            )
        yield envs[0], envs[1]


def save(env: MetaEnv, c: MetaClient, tokens: list[int], size: int = 100_000) -> KvcMeta:
    meta = kvc_meta(tokens)
    out = publish(c, env.layout, "ram", meta, payload_for(meta.key(), size), writer_id="t")
    assert out.status == "fired", out
    return meta


def store(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url)


def serves(client: MetaClient, tokens: list[int]) -> Callable[[], bool]:
    """A predicate: ``client`` finds a row for ``tokens`` now (the pin is given back)."""

    def check() -> bool:
        found = client.longest_prefix_checkout(NAMESPACE, packed(tokens), min_len=1)
        if found is None:
            return False
        client.checkin(found[1].pin_ref)
        return True

    return check


def uploaded(c: MetaClient, n: int) -> None:
    wait_until(lambda: c.counters()["remote_uploads"] >= n, 10, "the upload")


def test_a_row_published_on_a_is_a_hit_on_b(pair: tuple[MetaEnv, MetaEnv]) -> None:
    a, b = pair
    ca, cb = a.client(), b.client()
    meta = save(a, ca, ROW_TOKENS)
    uploaded(ca, 1)
    assert ca.counters()["remote_bytes_up"] > 100_000

    prompt = packed([*ROW_TOKENS, 7, 7, 7])
    found = cb.longest_prefix_checkout(NAMESPACE, packed(ROW_TOKENS), min_len=1)
    assert found is not None
    common, pin = found
    assert common == len(ROW_TOKENS) and pin.row.tier == "ram"
    assert pin.row.path.startswith(str(b.tiers["ram"]))
    with load_row(pin.row.path, meta.key()) as row:  # a normal, fully valid ram row
        assert bytes(row.payload) == payload_for(meta.key(), 100_000)
        assert row.meta.hit_count == 0
    cb.checkin(pin.pin_ref)
    got = cb.counters()
    assert (got["remote_hits"], got["remote_probes"], got["remote_corrupt"]) == (1, 1, 0)
    assert got["remote_bytes_down"] >= 100_000 and got["remote_fetch_ns"] > 0

    # promoted: B answers locally now, no second trip to the store
    found = cb.longest_prefix_checkout(NAMESPACE, packed(ROW_TOKENS), min_len=1)
    assert found is not None and found[0] == len(ROW_TOKENS)
    cb.checkin(found[1].pin_ref)
    assert cb.counters()["remote_probes"] == 1
    # a longer prompt asks the store for its own row only (the local one covers 300)
    found = cb.longest_prefix_checkout(NAMESPACE, prompt, min_len=1)
    assert found is not None and found[0] == len(ROW_TOKENS)
    cb.checkin(found[1].pin_ref)
    got = cb.counters()
    assert (got["remote_probes"], got["remote_misses"], got["remote_hits"]) == (2, 1, 1)
    # B's promoted row is not uploaded again; A's copy is there once
    assert cb.counters()["remote_uploads"] == 0


def test_rows_of_another_namespace_are_never_served(
    pair: tuple[MetaEnv, MetaEnv], redis_server: RedisServer
) -> None:
    a, b = pair
    ca, cb = a.client(), b.client()
    meta = save(a, ca, ROW_TOKENS)
    uploaded(ca, 1)
    other = (FP2, QUANT, CTX)
    assert cb.longest_prefix_checkout(other, packed(ROW_TOKENS), min_len=1) is None
    assert cb.counters()["remote_misses"] == 1

    # a store that lies: A's row filed under the key of another model's same tokens
    r = store(redis_server)
    lie = make_key_packed(FP2, QUANT, CTX, packed(ROW_TOKENS))
    r.set(manifest_key(PREFIX, lie), r.get(manifest_key(PREFIX, meta.key())))
    m = decode_manifest(r.get(manifest_key(PREFIX, meta.key())))
    for i in range(m.n_chunks):
        r.set(chunk_key(PREFIX, lie, m.gen, i), r.get(chunk_key(PREFIX, meta.key(), m.gen, i)))
    assert cb.longest_prefix_checkout(other, packed(ROW_TOKENS), min_len=1) is None
    got = cb.counters()
    assert got["remote_corrupt"] == 1 and got["remote_hits"] == 0
    assert r.get(manifest_key(PREFIX, lie)) is None  # dropped from the store
    assert b.files("ram") == []
    r.close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "evict"])
def test_a_damaged_remote_row_is_dropped_counted_and_missed(
    pair: tuple[MetaEnv, MetaEnv], redis_server: RedisServer, damage: str
) -> None:
    a, b = pair
    ca, cb = a.client(), b.client()
    meta = save(a, ca, ROW_TOKENS)
    uploaded(ca, 1)
    r = store(redis_server)
    m = decode_manifest(r.get(manifest_key(PREFIX, meta.key())))
    assert m.n_chunks > 2
    name = chunk_key(PREFIX, meta.key(), m.gen, 2)
    chunk = bytearray(r.get(name))
    if damage == "flip":
        chunk[100] ^= 0x40
        r.set(name, bytes(chunk))
    elif damage == "truncate":
        r.set(name, bytes(chunk[:-10]))
    else:
        r.delete(name)
    assert cb.longest_prefix_checkout(NAMESPACE, packed(ROW_TOKENS), min_len=1) is None
    got = cb.counters()
    assert got["remote_hits"] == 0 and got["remote_misses"] == 1
    assert got["remote_corrupt"] == (0 if damage == "evict" else 1)
    assert r.get(manifest_key(PREFIX, meta.key())) is None
    assert b.files("ram") == []
    r.close()
    # the local row on A is untouched, and a fresh save elsewhere is uploaded again
    save(a, ca, [*ROW_TOKENS, 1])
    uploaded(ca, 2)


def test_the_store_killed_and_restarted_mid_traffic(
    pair: tuple[MetaEnv, MetaEnv], redis_server: RedisServer
) -> None:
    a, b = pair
    ca, cb = a.client(timeout_s=2.0), b.client(timeout_s=2.0)
    save(a, ca, ROW_TOKENS)
    uploaded(ca, 1)
    redis_server.kill()

    # B: every lookup answers (a miss, never an error), within the lookup deadline
    for i in range(5):
        t0 = time.monotonic()
        assert cb.longest_prefix_checkout(NAMESPACE, packed([9, i, *ROW_TOKENS]), min_len=1) is None
        assert time.monotonic() - t0 < 1.0
    got = cb.counters()
    assert got["remote_errors"] >= 1 and got["remote_skipped"] >= 1
    # A keeps publishing locally while the store is down
    for i in range(3):
        save(a, ca, [5, i, *ROW_TOKENS])
    wait_until(lambda: ca.counters()["remote_errors"] >= 1, 10, "A's failed upload")

    redis_server.start()  # empty, same port
    meta = save(a, ca, [6, *ROW_TOKENS])
    wait_until(lambda: ca.counters()["remote_reconnects"] >= 1, 30, "A reconnected")
    wait_until(
        lambda: store(redis_server).exists(manifest_key(PREFIX, meta.key())) == 1,
        30,
        "the tier filled again",
    )

    wait_until(serves(cb, [6, *ROW_TOKENS]), 30, "B served from the store again")
    got = cb.counters()
    assert got["remote_reconnects"] >= 1 and got["remote_hits"] == 1
    assert got["remote_corrupt"] == 0


def test_a_slow_store_is_a_miss_within_the_deadline(
    pair: tuple[MetaEnv, MetaEnv], redis_server: RedisServer
) -> None:
    a, b = pair
    ca, cb = a.client(), b.client()
    save(a, ca, ROW_TOKENS)
    uploaded(ca, 1)
    r = store(redis_server)
    r.client_pause(1500)  # every other client's commands stall: past timeout_ms (200)
    t0 = time.monotonic()
    assert cb.longest_prefix_checkout(NAMESPACE, packed(ROW_TOKENS), min_len=1) is None
    assert time.monotonic() - t0 < 1.0
    assert cb.counters()["remote_errors"] == 1
    r.client_unpause()
    r.close()

    wait_until(serves(cb, ROW_TOKENS), 30, "B reconnected and served the row")
    assert cb.counters()["remote_reconnects"] == 1


def test_a_store_down_when_meta_starts_is_found_later(
    tmp_path: Path, pair: tuple[MetaEnv, MetaEnv], redis_server: RedisServer
) -> None:
    a, _ = pair
    ca = a.client()
    redis_server.kill()
    (tmp_path / "c").mkdir()
    with meta_env(tmp_path / "c", tiers=("ram",), remote=remote_cfg(redis_server)) as c_env:
        cc = c_env.client()
        assert cc.longest_prefix_checkout(NAMESPACE, packed(ROW_TOKENS), min_len=1) is None
        assert cc.counters()["remote_errors"] == 1
        redis_server.start()
        save(a, ca, ROW_TOKENS)
        wait_until(lambda: ca.counters()["remote_uploads"] >= 1, 30, "the upload")

        wait_until(serves(cc, ROW_TOKENS), 30, "C served from the store once it came up")


# ================================================================ prefix pointers
TURN = list(range(1000, 1700))  # 700 tokens: a finish row (prompt + reply), not 2048-aligned


def test_a_row_of_any_length_is_found_by_a_longer_prompt_through_a_pointer(
    pair: tuple[MetaEnv, MetaEnv], redis_server: RedisServer
) -> None:
    a, b = pair
    ca, cb = a.client(), b.client()
    meta = save(a, ca, TURN)
    uploaded(ca, 1)
    r = store(redis_server)
    hasher = PrefixHasher(*NAMESPACE)
    prefixes = hasher.keys_at_packed(packed(TURN), [256, 512])
    for n in (256, 512):  # the row's aligned prefixes point at it
        assert decode_pointer(r.get(pointer_key(PREFIX, prefixes[n]))) == (meta.key(), 700)
    prompt = packed([*TURN, *range(5000, 5200)])  # the next turn: this row + new text
    assert r.get(pointer_key(PREFIX, hasher.keys_at_packed(prompt, [768])[768])) is None
    row_bytes = sum(r.memory_usage(k) for k in r.keys(f"{PREFIX}[mc]:*"))
    ptr_bytes = sum(r.memory_usage(k) for k in r.keys(f"{PREFIX}p:*"))
    assert (
        0 < ptr_bytes <= 2 * 256 and row_bytes > 100_000
    )  # 184 B per pointer (redis 7, with its TTL)

    # 900 tokens: no exact key of B's probe (900, none at 2048) is stored
    found = cb.longest_prefix_checkout(NAMESPACE, prompt, min_len=1)
    assert found is not None
    common, pin = found
    assert common == 700 and pin.row.key == meta.key() and pin.row.tier == "ram"
    cb.checkin(pin.pin_ref)
    got = cb.counters()
    assert (got["remote_hits"], got["remote_pointer_hits"], got["remote_probes"]) == (1, 1, 1)
    assert got["remote_corrupt"] == 0 and got["remote_pointers_stale"] == 0
    r.close()


def test_a_pointer_to_a_row_gone_from_the_store_is_a_miss_and_is_deleted(
    pair: tuple[MetaEnv, MetaEnv], redis_server: RedisServer
) -> None:
    a, b = pair
    ca, cb = a.client(), b.client()
    meta = save(a, ca, TURN)
    uploaded(ca, 1)
    r = store(redis_server)
    r.delete(manifest_key(PREFIX, meta.key()))  # evicted
    prompt = packed([*TURN, *range(5000, 5200)])
    assert cb.longest_prefix_checkout(NAMESPACE, prompt, min_len=1) is None
    got = cb.counters()
    assert got["remote_misses"] == 1 and got["remote_hits"] == 0
    assert got["remote_pointers_stale"] == 2  # 512 and 256, each deleted
    assert r.keys(f"{PREFIX}p:*") == []
    # a pointer to a row that does not hold the prefix (a lying store) is no hit either
    other = save(a, ca, list(range(1, 301)))
    uploaded(ca, 2)
    r.set(pointer_key(PREFIX, PrefixHasher(*NAMESPACE).keys_at_packed(prompt, [768])[768]),
          encode_pointer(other.key(), 300))  # fmt: skip
    assert cb.longest_prefix_checkout(NAMESPACE, prompt, min_len=1) is None
    got = cb.counters()
    assert got["remote_pointers_stale"] == 3 and got["remote_hits"] == 0
    assert b.files("ram") == []
    r.close()
