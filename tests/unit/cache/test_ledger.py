"""The cache index state machine (REFERENCE §6): pins, reservations, LRU, budgets, waiters."""

from __future__ import annotations

import hashlib
import struct

import pytest

from erllama.cache.keys import make_key_packed
from erllama.cache.ledger import Ledger
from erllama.cache.rows import (
    COUNTER_NAMES,
    NS_PER_S,
    DeleteFile,
    Effects,
    Resolve,
    RowData,
)

FP = b"\x01" * 32
CTX = b"\x02" * 32
NS = (FP, 7, CTX)
MB = 1 << 20


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000 * NS_PER_S

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * NS_PER_S)


def toks(*ids: int) -> bytes:
    return struct.pack(f"<{len(ids)}I", *ids)


def data(tokens: bytes, *, reason: int = 1, hits: int = 0) -> RowData:
    return RowData(tokens=tokens, namespace=NS, save_reason=reason, hit_count=hits)


def key_of(tokens: bytes) -> bytes:
    return make_key_packed(FP, 7, CTX, tokens)


def path_of(key: bytes) -> str:
    return f"/tier/{key.hex()}.kvc"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ledger(clock: FakeClock) -> Ledger:
    return Ledger({"ram": 100 * MB, "disk": 1000 * MB}, clock=clock, ttl_s=60.0, token_seed=500)


def publish(
    led: Ledger, tokens: bytes, size: int, *, tier: str = "ram", holder: str = "w:1"
) -> bytes:
    key = key_of(tokens)
    out = led.reserve(key, tier, holder)
    assert out.status == "created"
    assert led.check(key, out.token)
    assert led.mark_published(key, out.token, path_of(key))
    status, _ = led.announce(key, out.token, size, data(tokens))
    assert status == "ok"
    return key


def deleted(eff: Effects) -> set[bytes]:
    return {a.key for a in eff.actions if isinstance(a, DeleteFile)}


# ---------------------------------------------------------------- reservations (§6.3)
def test_publish_sequence_installs_an_available_row(ledger: Ledger) -> None:
    tokens = toks(1, 2, 3)
    key = key_of(tokens)
    out = ledger.reserve(key, "ram", "w:1")
    assert out.status == "created" and out.token >= 500
    assert ledger.lookup(key) is None  # the placeholder is invisible
    assert ledger.checkout(key, "r:1").status == "busy"
    assert ledger.reserve(key, "ram", "w:2").status == "conflict"
    assert ledger.check(key, out.token)
    assert ledger.mark_published(key, out.token, path_of(key))
    status, _ = ledger.announce(key, out.token, 10 * MB, data(tokens))
    assert status == "ok"
    row = ledger.lookup(key)
    assert row is not None and row.size == 10 * MB and row.n_tokens == 3
    assert ledger.counters()["saves_cold"] == 1
    assert ledger.counters()["bytes_ram"] == 10 * MB
    assert ledger.reserve(key, "ram", "w:2").status == "already_present"
    assert ledger.counters()["duplicate_dropped"] == 1


def test_token_mismatch_is_expired_and_announce_needs_mark(ledger: Ledger) -> None:
    tokens = toks(4)
    key = key_of(tokens)
    token = ledger.reserve(key, "ram", "w:1").token
    assert not ledger.check(key, token + 1)
    assert not ledger.mark_published(key, token + 1, path_of(key))
    assert ledger.announce(key, token, 1, data(tokens))[0] == "not_published"
    assert ledger.announce(key, token + 1, 1, data(tokens))[0] == "expired"
    assert ledger.lookup(key) is None


def test_cancel_pre_link_drops_the_placeholder_and_answers_waiters(ledger: Ledger) -> None:
    key = key_of(toks(5))
    token = ledger.reserve(key, "ram", "w:1").token
    parked = ledger.checkout(key, "r:1", wait_ms=1000)
    assert parked.status == "parked"
    eff = ledger.cancel(key, token)
    assert [(w.waiter, w.pin_ref) for w in eff.woken] == [(parked.waiter, None)]
    assert key not in ledger.rows and key not in ledger.reservations
    assert ledger.reserve(key, "ram", "w:2").status == "created"


def test_cancel_post_link_resolves_instead_of_dropping(ledger: Ledger) -> None:
    key = key_of(toks(6))
    token = ledger.reserve(key, "ram", "w:1").token
    ledger.mark_published(key, token, path_of(key))
    eff = ledger.cancel(key, token)
    assert eff.actions == [Resolve(key, "ram", "post_link")]
    assert ledger.rows[key].status == "writing"


@pytest.mark.parametrize("stage", ["pre_link", "post_link"])
def test_dead_writer_is_resolved_by_stage(ledger: Ledger, stage: str) -> None:
    tokens = toks(7, 8)
    key = key_of(tokens)
    token = ledger.reserve(key, "disk", "w:dead").token
    if stage == "post_link":
        ledger.mark_published(key, token, path_of(key))
    eff = ledger.release_holder("w:dead")
    assert eff.actions == [Resolve(key, "disk", stage)]  # type: ignore[arg-type]
    assert key not in ledger.reservations
    # the process found a valid file (post_link) or none (pre_link)
    found = ("disk", path_of(key), 3 * MB, data(tokens)) if stage == "post_link" else None
    ledger.resolved(key, found)
    if stage == "post_link":
        row = ledger.lookup(key)
        assert row is not None and row.tier == "disk"
    else:
        assert key not in ledger.rows


def test_resolved_is_ignored_once_a_new_writer_owns_the_key(ledger: Ledger) -> None:
    key = key_of(toks(9))
    ledger.reserve(key, "ram", "w:dead")
    ledger.release_holder("w:dead")
    # a Resolve is pending; a new reserve asks for it again, never hands out a token
    again = ledger.reserve(key, "ram", "w:2")
    assert again.status == "resolve"
    ledger.resolved(key, None)
    new = ledger.reserve(key, "ram", "w:2")
    assert new.status == "created"
    assert ledger.resolved(key, None).actions == []  # a late duplicate changes nothing
    assert ledger.reservations[key].token == new.token


def test_sweep_abandons_expired_reservations_and_check_refreshes(
    ledger: Ledger, clock: FakeClock
) -> None:
    k1, k2 = key_of(toks(10)), key_of(toks(11))
    t1 = ledger.reserve(k1, "ram", "w:1").token
    ledger.reserve(k2, "ram", "w:1")
    clock.advance(50)
    assert ledger.check(k1, t1)  # TTL refreshed to now + 60 s
    clock.advance(20)
    eff = ledger.sweep()
    assert [a.key for a in eff.actions if isinstance(a, Resolve)] == [k2]
    assert k1 in ledger.reservations


def test_reserve_on_a_stale_reservation_resolves_first(ledger: Ledger, clock: FakeClock) -> None:
    key = key_of(toks(12))
    ledger.reserve(key, "ram", "w:slow")
    clock.advance(61)
    out = ledger.reserve(key, "ram", "w:2")
    assert out.status == "resolve"
    assert out.effects.actions == [Resolve(key, "ram", "pre_link")]
    ledger.resolved(key, None)
    assert ledger.reserve(key, "ram", "w:2").status == "created"


# ---------------------------------------------------------------- pins and eviction (§6.2, §6.5)
def test_pinned_rows_are_never_evicted(ledger: Ledger, clock: FakeClock) -> None:
    keys = []
    for i in range(5):
        clock.advance(1)
        keys.append(publish(ledger, toks(100 + i), 10 * MB))
    pin = ledger.checkout(keys[0], "r:1")
    assert pin.status == "hit" and pin.pin_ref is not None
    n, freed, eff = ledger.evict_bytes(25 * MB, ["ram"])
    assert (n, freed) == (3, 30 * MB)
    assert deleted(eff) == {keys[1], keys[2], keys[3]}  # oldest first, the pinned one skipped
    assert ledger.lookup(keys[0]) is not None
    assert ledger.counters()["evictions"] == 3
    ledger.checkin(pin.pin_ref)
    n, eff = ledger.gc()
    assert n == 2 and deleted(eff) == {keys[0], keys[4]}
    assert ledger.counters()["bytes_ram"] == 0
    assert ledger.evict_bytes(0, ["ram"])[:2] == (0, 0)


def test_checkout_moves_the_row_to_the_lru_end(ledger: Ledger, clock: FakeClock) -> None:
    a = publish(ledger, toks(1), MB)
    clock.advance(1)
    b = publish(ledger, toks(2), MB)
    clock.advance(1)
    ref = ledger.checkout(a, "r:1").pin_ref
    assert ref is not None and ledger.checkin(ref)
    _, _, eff = ledger.evict_bytes(1, ["ram"])
    assert deleted(eff) == {b}


def test_budget_is_enforced_at_install_down_to_90_percent(ledger: Ledger, clock: FakeClock) -> None:
    keys = []
    for i in range(10):
        clock.advance(1)
        keys.append(publish(ledger, toks(200 + i), 10 * MB))
    assert ledger.tier_usage()["ram"].used == 100 * MB
    clock.advance(1)
    status, eff = ledger.insert_available(key_of(toks(300)), "ram", "/p", 25 * MB, data(toks(300)))
    assert status == "inserted"
    # 125 MB > 100 MB: evict the oldest until <= 90 MB
    assert deleted(eff) == set(keys[:4])
    assert ledger.tier_usage()["ram"].used == 85 * MB
    assert ledger.lookup(key_of(toks(300))) is not None


def test_the_row_just_installed_is_protected_even_when_it_alone_is_over(
    ledger: Ledger,
) -> None:
    other = publish(ledger, toks(1), 10 * MB)
    big = key_of(toks(2))
    _, eff = ledger.insert_available(big, "ram", "/big", 150 * MB, data(toks(2)))
    assert deleted(eff) == {other}
    assert ledger.lookup(big) is not None


def test_restart_bias_puts_popular_rows_later_in_the_lru(ledger: Ledger) -> None:
    popular, plain = key_of(toks(1)), key_of(toks(2))
    ledger.insert_available(popular, "ram", "/a", MB, data(toks(1), hits=5))
    ledger.insert_available(plain, "ram", "/b", MB, data(toks(2)))
    assert ledger.rows[popular].last_used == ledger.rows[plain].last_used + 5 * NS_PER_S
    _, _, eff = ledger.evict_bytes(1, ["ram"])
    assert deleted(eff) == {plain}


def test_corrupt_row_is_dropped_and_an_old_pin_does_not_touch_its_successor(
    ledger: Ledger,
) -> None:
    tokens = toks(42)
    key = publish(ledger, tokens, MB)
    old = ledger.checkout(key, "r:1").pin_ref
    eff = ledger.drop_corrupt(key)
    assert deleted(eff) == {key}
    c = ledger.counters()
    assert (c["corrupt_files"], c["stale_rows_dropped"], c["bytes_ram"]) == (1, 1, 0)
    assert ledger.longest_prefix_checkout(NS, tokens, "r:1") is None
    publish(ledger, tokens, MB)
    new = ledger.checkout(key, "r:2").pin_ref
    assert old is not None and ledger.checkin(old)
    assert ledger.rows[key].refcount == 1
    assert new is not None


# ---------------------------------------------------------------- waiters (§6.4)
def test_parked_checkout_is_pinned_when_the_row_is_announced(ledger: Ledger) -> None:
    tokens = toks(50)
    key = key_of(tokens)
    token = ledger.reserve(key, "ram", "w:1").token
    parked = ledger.checkout(key, "r:1", wait_ms=500)
    assert parked.status == "parked"
    ledger.mark_published(key, token, path_of(key))
    _, eff = ledger.announce(key, token, MB, data(tokens))
    (wake,) = eff.woken
    assert wake.waiter == parked.waiter and wake.pin_ref is not None
    assert ledger.rows[key].refcount == 1
    assert ledger.expire_waiters() == []


def test_parked_checkout_expires_as_a_miss(ledger: Ledger, clock: FakeClock) -> None:
    key = key_of(toks(51))
    ledger.reserve(key, "ram", "w:1")
    parked = ledger.checkout(key, "r:1", wait_ms=200)
    assert ledger.next_waiter_deadline() == clock.now + 200_000_000
    clock.advance(0.1)
    assert ledger.expire_waiters() == []
    clock.advance(0.2)
    (wake,) = ledger.expire_waiters()
    assert (wake.waiter, wake.pin_ref) == (parked.waiter, None)
    assert ledger.next_waiter_deadline() is None


def test_release_holder_frees_pins_and_answers_its_waiters(ledger: Ledger) -> None:
    key = publish(ledger, toks(60), MB)
    ledger.checkout(key, "r:dead")
    ledger.checkout(key, "r:dead")
    other = key_of(toks(61))
    ledger.reserve(other, "ram", "w:1")
    parked = ledger.checkout(other, "r:dead", wait_ms=1000)
    eff = ledger.release_holder("r:dead")
    assert ledger.rows[key].refcount == 0
    assert [w.waiter for w in eff.woken] == [parked.waiter]
    assert "r:dead" not in ledger.holders()


def test_a_dead_holders_late_requests_claim_nothing(ledger: Ledger) -> None:
    # a reserve or checkout still in meta's socket when the root reported the death:
    # granted, it would be held for a process that can never release it
    key = publish(ledger, toks(62), MB)
    ledger.release_holder("w:gone")
    assert ledger.reserve(key_of(toks(63)), "ram", "w:gone").status == "conflict"
    assert ledger.checkout(key, "w:gone").status == "miss"
    assert ledger.longest_prefix_checkout(NS, toks(62), "w:gone") is None
    assert not ledger.reservations and not ledger.pins
    assert ledger.checkout(key, "w:alive").status == "hit"  # others are served as before


# ---------------------------------------------------------------- longest prefix
def test_longest_prefix_checkout_pins_the_best_row_and_follows_evictions(
    ledger: Ledger, clock: FakeClock
) -> None:
    short = publish(ledger, toks(1, 2, 3), MB)
    clock.advance(1)
    long_ = publish(ledger, toks(1, 2, 3, 4, 5, 6), MB)
    found = ledger.longest_prefix_checkout(NS, toks(1, 2, 3, 4, 9), "r:1")
    assert found is not None
    common, ref, row = found
    assert (common, row.key) == (4, long_)
    assert ledger.rows[long_].refcount == 1
    assert ledger.longest_prefix_checkout(NS, toks(1, 2, 3, 4, 9), "r:1", min_len=5) is None
    assert ledger.longest_prefix_checkout((FP, 8, CTX), toks(1, 2, 3), "r:1") is None
    ledger.checkin(ref)
    ledger.evict_bytes(2 * MB, ["ram"])
    assert ledger.longest_prefix_checkout(NS, toks(1, 2, 3), "r:1") is None
    assert short not in ledger.rows


# ---------------------------------------------------------------- counters, hits
def test_counters_cover_reference_names_and_gauges_survive_reset(ledger: Ledger) -> None:
    c = ledger.counters()
    assert list(c)[:20] == list(COUNTER_NAMES[:20])
    assert {"saves_queued", "save_queue_bytes", "worker_restarts", "stale_rows_dropped"} <= set(c)
    publish(ledger, toks(1), 3 * MB, tier="disk")
    ledger.count("hits_exact", 2)
    with pytest.raises(KeyError):
        ledger.count("bytes_disk")
    with pytest.raises(KeyError):
        ledger.count("no_such_counter")
    ledger.reset_counters()
    c = ledger.counters()
    assert c["hits_exact"] == 0 and c["saves_cold"] == 0 and c["bytes_disk"] == 3 * MB


def test_dirty_hits_are_batched(ledger: Ledger) -> None:
    key = publish(ledger, toks(1), MB)
    assert not ledger.has_dirty_hits()
    for _ in range(3):
        ref = ledger.checkout(key, "r:1").pin_ref
        assert ref is not None
        ledger.checkin(ref)
    (update,) = ledger.take_dirty_hits()
    assert (update.key, update.path, update.hits) == (key, path_of(key), 3)
    assert ledger.take_dirty_hits() == []


def test_unknown_tier_is_refused(ledger: Ledger) -> None:
    with pytest.raises(KeyError):
        ledger.reserve(hashlib.sha256(b"x").digest(), "ram_file", "w:1")
