"""The cache-meta process over real ipc sockets: round trips, waits, bad input, stop."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import zmq

from erllama.cache.client import MetaClient
from erllama.cache.kvc import KvcError, read_metadata
from erllama.cache.tiers import PublishOutcome, TierLayout, load_row, publish
from erllama.config import TierConfig
from erllama.protocol.codec import PROTOCOL_ID, Decoder, encode
from erllama.protocol.errors import ConflictError, InvalidRequestError
from erllama.protocol.messages import ErrorReply, Reply
from erllama.protocol.meta_messages import (
    AddCounters,
    LookupExact,
    MarkPublished,
    Reserve,
    RowInfo,
)
from erllama.protocol.sockets import META_SOCK, ipc_endpoint
from tests.support.cache import (
    NAMESPACE,
    MetaEnv,
    kvc_meta,
    meta_env,
    packed,
    payload_for,
    wait_until,
    write_kvc,
)
from tests.support.fake_root import FakeRoot, meta_child


@pytest.fixture
def env(tmp_path: Path) -> Iterator[MetaEnv]:
    with meta_env(tmp_path) as e:
        yield e


def save(
    env: MetaEnv, client: MetaClient, tokens: range, tier: str = "ram", size: int = 40_000
) -> tuple[bytes, PublishOutcome]:
    meta = kvc_meta(tokens)
    out = publish(client, env.layout, tier, meta, payload_for(meta.key(), size), writer_id="t")
    return meta.key(), out


def test_publish_lookup_checkout_load_round_trip(env: MetaEnv) -> None:
    c = env.client()
    key, out = save(env, c, range(100), tier="disk")
    assert out.status == "fired" and out.size > 40_000
    row = c.lookup_exact(key)
    assert row is not None
    assert (row.tier, row.size, row.n_tokens, row.save_reason) == ("disk", out.size, 100, 1)
    assert row.path == str(env.tiers["disk"] / f"{key.hex()}.kvc")
    pin = c.checkout(key)
    assert pin is not None and pin.row == row
    with load_row(pin.row.path, key) as loaded:
        assert bytes(loaded.payload) == payload_for(key, 40_000)
    c.checkin(pin.pin_ref)
    # the same key again: first content wins, counted as a duplicate
    _, again = save(env, c, range(100), tier="disk")
    assert again.status == "already_present"
    counters = c.counters()
    assert counters["saves_cold"] == 1
    assert counters["duplicate_dropped"] == 1
    assert counters["bytes_disk"] == out.size
    stats = {t.name: t for t in c.tier_stats()}
    assert stats["disk"].used_bytes == out.size and stats["disk"].rows == 1
    assert stats["ram"].used_bytes == 0
    assert c.lookup_exact(b"\x00" * 32) is None
    assert c.checkout(b"\x00" * 32) is None


def test_longest_prefix_checkout_in_one_round_trip(env: MetaEnv) -> None:
    c = env.client()
    save(env, c, range(50))
    long_key, _ = save(env, c, range(80))
    prompt = packed([*range(70), 9999])
    found = c.longest_prefix_checkout(NAMESPACE, prompt)
    assert found is not None
    common, pin = found
    assert common == 70 and pin.row.key == long_key
    c.checkin(pin.pin_ref)
    assert c.longest_prefix_checkout(NAMESPACE, prompt, min_len=71) is None
    other_ns = (NAMESPACE[0], 8, NAMESPACE[2])
    assert c.longest_prefix_checkout(other_ns, prompt) is None
    counters = c.counters()
    assert counters["longest_prefix_probes"] == 3
    assert counters["longest_prefix_ns"] > 0


def test_checkout_waits_for_a_row_being_written(env: MetaEnv) -> None:
    writer = env.client("writer:1")
    meta = kvc_meta(range(30))
    key = meta.key()
    token = writer.reserve(key, "ram")
    assert env.client("probe:1").checkout(key) is None  # busy, no wait
    got: list[object] = []

    def wait() -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        with MetaClient(ctx, env.endpoint, "reader:1", timeout_s=5.0) as reader:
            got.append(reader.checkout(key, wait_ms=20_000))
        ctx.term()

    t = threading.Thread(target=wait)
    t.start()
    wait_until(lambda: writer.counters()["checkouts_parked"] == 1, what="the reader parked")
    # finish the save by hand (the publish protocol, without the file work)
    payload = payload_for(key, 1000)
    path = env.tiers["ram"] / f"{key.hex()}.kvc"
    size = write_kvc(path, meta, payload)
    writer.check_reservation(key, token)
    writer.mark_published(key, token, str(path))
    writer.announce_saved(key, token, size, meta)
    t.join(10)
    assert not t.is_alive()
    (pin,) = got
    assert pin is not None and pin.row.key == key  # type: ignore[attr-defined]


def test_checkout_wait_expires_as_a_miss(env: MetaEnv) -> None:
    writer = env.client("writer:1")
    key = kvc_meta(range(31)).key()
    writer.reserve(key, "ram")
    assert env.client("reader:1").checkout(key, wait_ms=100) is None


def test_publish_protocol_refusals(env: MetaEnv) -> None:
    a, b = env.client("a:1"), env.client("b:1")
    meta = kvc_meta(range(40))
    key = meta.key()
    token = a.reserve(key, "ram")
    with pytest.raises(ConflictError) as conflict:
        b.reserve(key, "ram")
    assert conflict.value.code == "conflict"
    with pytest.raises(ConflictError) as expired:
        a.check_reservation(key, token + 1)
    assert expired.value.code == "expired"
    with pytest.raises(InvalidRequestError):  # not the key's final file
        a.mark_published(key, token, str(env.tiers["ram"] / "elsewhere.kvc"))
    with pytest.raises(InvalidRequestError):  # announce before mark
        a.announce_saved(key, token, 10, meta)
    a.cancel_reservation(key, token)
    a.cancel_reservation(key, token)  # always ok
    assert b.reserve(key, "ram") > 0


def test_bad_input_gets_error_codes_and_meta_keeps_serving(env: MetaEnv) -> None:
    sock = env.ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(env.endpoint)
    replies: Decoder[Reply | ErrorReply] = Decoder(Reply | ErrorReply)

    def ask(*frames: bytes) -> ErrorReply | Reply:
        sock.send_multipart(list(frames))
        assert sock.poll(5000), "meta did not answer"
        return replies.decode(sock.recv_multipart())

    def code_of(*frames: bytes) -> str:
        r = ask(*frames)
        assert isinstance(r, ErrorReply), r
        return r.code

    enc = msgspec.msgpack.encode
    key = kvc_meta(range(5)).key()
    try:
        assert code_of(PROTOCOL_ID, b"\xc1garbage") == "malformed"
        assert code_of(b"ERL2", enc({"t": "lookup_exact", "key": key})) == "unsupported_version"
        assert code_of(b"HTTP", b"x") == "malformed"
        assert code_of(PROTOCOL_ID) == "malformed"
        assert code_of(PROTOCOL_ID, enc({"t": "no_such_op"})) == "malformed"
        assert code_of(PROTOCOL_ID, enc({"t": "lookup_exact", "key": key[:31]})) == "malformed"
        big = {"t": "longest_prefix_checkout", "fingerprint": key, "quant": 7, "ctx_hash": key,
               "tokens": b"\0" * (4 * (1 << 20) + 4), "holder": "x"}  # fmt: skip
        assert code_of(PROTOCOL_ID, enc(big)) == "too_large"
        odd = {**big, "tokens": b"\0\0\0"}
        assert code_of(PROTOCOL_ID, enc(odd)) == "bad_request"
        r = ask(*encode(Reserve(request_id="r1", key=key, tier="ram", holder="x")))
        assert isinstance(r, Reply)
        wrong_tier = {"t": "reserve", "key": key, "tier": "tape", "holder": "x"}
        assert code_of(PROTOCOL_ID, enc(wrong_tier)) == "malformed"
        bad_info = RowInfo(fingerprint=key, quant=7, ctx_hash=key, tokens=packed([1]))
        insert = {"t": "insert_available", "key": key, "tier": "ram", "size": 1,
                  "path": str(env.tiers["ram"] / f"{key.hex()}.kvc"),
                  "info": msgspec.structs.asdict(bad_info)}  # fmt: skip
        other = kvc_meta(range(6)).key()
        insert["key"] = other
        insert["path"] = str(env.tiers["ram"] / f"{other.hex()}.kvc")
        assert code_of(PROTOCOL_ID, enc(insert)) == "bad_request"  # key does not derive
        mark = MarkPublished(request_id="m", key=key, token=1, path="/x")
        assert code_of(*encode(mark)) == "expired"
        r = ask(*encode(LookupExact(request_id="echo", key=key)))
        assert isinstance(r, Reply) and r.request_id == "echo"
        sock.send_multipart(encode(AddCounters(deltas={"hits_exact": 2, "bogus": 1})))
    finally:
        sock.close()
    c = env.client()
    wait_until(lambda: c.counters()["hits_exact"] == 2, what="add_counters applied")
    counters = c.counters()
    assert counters["bad_requests"] == 11
    assert counters["internal_errors"] == 0
    assert env.root.children["meta"].is_alive()


def test_evict_and_gc_delete_files_but_never_pinned_rows(env: MetaEnv) -> None:
    c = env.client()
    keys = [save(env, c, range(10 + i))[0] for i in range(3)]
    pin = c.checkout(keys[0])
    assert pin is not None
    n, freed = c.evict_bytes(10**9, ["ram", "disk"])
    assert n == 2 and freed > 0
    assert env.files("ram") == [f"{keys[0].hex()}.kvc"]
    assert c.gc() == 0
    c.checkin(pin.pin_ref)
    assert c.gc() == 1
    assert env.files("ram") == []
    counters = c.counters()
    assert counters["evictions"] == 3 and counters["bytes_ram"] == 0


def test_budget_evicts_least_recently_used_at_install(tmp_path: Path) -> None:
    with meta_env(tmp_path, tiers=("ram",), budgets={"ram": 200_000}) as env:
        c = env.client()
        keys = [save(env, c, range(10 + i), size=45_000)[0] for i in range(4)]
        pin = c.checkout(keys[0])  # recently used and pinned
        assert pin is not None
        new, _ = save(env, c, range(99), size=45_000)
        # 5 x ~45 KB > 200 KB: evict LRU unpinned rows down to 180 KB
        assert c.lookup_exact(keys[1]) is None
        assert c.lookup_exact(keys[0]) is not None and c.lookup_exact(new) is not None
        assert sum(t.used_bytes for t in c.tier_stats()) <= 200_000
        c.checkin(pin.pin_ref)


def test_corrupt_payload_is_reported_removed_and_counted(env: MetaEnv) -> None:
    c = env.client()
    key, _ = save(env, c, range(60), tier="ram_file")
    good, _ = save(env, c, range(61), tier="ram_file")
    path = env.tiers["ram_file"] / f"{key.hex()}.kvc"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x40
    path.write_bytes(bytes(data))
    pin = c.checkout(key)
    assert pin is not None
    with pytest.raises(KvcError) as bad:
        load_row(pin.row.path, key)
    assert bad.value.code == "crc_mismatch"
    c.report_corrupt(key, bad.value.code)
    c.checkin(pin.pin_ref)
    assert c.lookup_exact(key) is None
    assert not path.exists()
    c.report_corrupt(good, "lying")  # the file validates: the report is ignored
    assert c.lookup_exact(good) is not None
    counters = c.counters()
    assert counters["corrupt_files"] == 1 and counters["stale_rows_dropped"] == 1


def test_hit_counts_are_flushed_into_file_headers(env: MetaEnv) -> None:
    c = env.client()
    key, _ = save(env, c, range(20), tier="disk")
    for _ in range(3):
        pin = c.checkout(key)
        assert pin is not None
        c.checkin(pin.pin_ref)
    path = env.tiers["disk"] / f"{key.hex()}.kvc"
    wait_until(lambda: read_metadata(path).meta.hit_count == 3, what="hit flush")
    with load_row(path, key):
        pass  # the rewritten header still validates


def test_holders_died_releases_pins_and_reservations(env: MetaEnv) -> None:
    dead, other = env.client("worker.m:99"), env.client("router:1")
    key, _ = save(env, other, range(70))
    assert dead.checkout(key) is not None
    rkey = kvc_meta(range(71)).key()
    dead.reserve(rkey, "ram")
    assert other.evict_bytes(1, ["ram"]) == (0, 0)
    env.root.holders_died("meta", ["worker.m:99"])
    wait_until(lambda: other.evict_bytes(1, ["ram"])[0] == 1, what="pins released")
    assert other.reserve(rkey, "ram") > 0


def test_stop_exits_zero_and_a_restart_keeps_ram_rows(env: MetaEnv) -> None:
    c = env.client()
    key, _ = save(env, c, range(33))
    env.restart_meta(kill=False)
    assert c.lookup_exact(key) is not None


def test_default_ram_tier_lives_in_dev_shm(tmp_path: Path) -> None:
    daemon_id = f"t{os.getpid()}x{os.urandom(4).hex()}"
    shm = Path("/dev/shm") / f"erllama-{daemon_id}"
    config = {"cache": {"tiers": [{"name": "ram"}]}, "daemon_id": daemon_id}
    root = FakeRoot(tmp_path / "run")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        root.spawn("meta", meta_child, config)
        c = MetaClient(ctx, ipc_endpoint(tmp_path / "run", META_SOCK), "t:1")
        meta = kvc_meta(range(12))
        layout = TierLayout([TierConfig(name="ram")], daemon_id)
        out = publish(c, layout, "ram", meta, b"x" * 5000, writer_id="t")
        assert out.status == "fired"
        assert (shm / f"{meta.key().hex()}.kvc").exists()
        assert c.tier_stats()[0].path == str(shm)
        c.close()
        assert root.stop("meta") == 0
    finally:
        ctx.term()
        root.close()
        shutil.rmtree(shm, ignore_errors=True)


def test_publish_adopts_a_valid_existing_file_and_replaces_an_invalid_one(env: MetaEnv) -> None:
    c = env.client()
    # a whole file already sits under the key's name but has no row (a writer died
    # between link and mark_published): first content wins, the save is adopted
    meta = kvc_meta(range(90))
    final = env.tiers["disk"] / f"{meta.key().hex()}.kvc"
    size = write_kvc(final, meta, payload_for(meta.key(), 5000, b"first"))
    out = publish(c, env.layout, "disk", meta, payload_for(meta.key(), 9000), writer_id="t")
    assert (out.status, out.reason, out.size) == ("fired", "adopted", size)
    row = c.lookup_exact(meta.key())
    assert row is not None and row.size == size
    with load_row(row.path, meta.key()) as loaded:
        assert bytes(loaded.payload) == payload_for(meta.key(), 5000, b"first")
    # an invalid file under the name is deleted and the link retried once
    other = kvc_meta(range(91))
    bad = env.tiers["disk"] / f"{other.key().hex()}.kvc"
    bad.write_bytes(b"KVC garbage")
    out = publish(c, env.layout, "disk", other, payload_for(other.key(), 7000), writer_id="t")
    assert out.status == "fired" and out.reason == ""
    with load_row(bad, other.key()) as loaded:
        assert bytes(loaded.payload) == payload_for(other.key(), 7000)
    assert sorted(env.files("disk")) == sorted(f"{k.hex()}.kvc" for k in (meta.key(), other.key()))
