"""A hypothesis state machine over the ledger: random interleavings of every operation.

Invariants checked after every step: pinned rows are never evicted, refcounts equal the
live pins, byte usage equals the rows, budgets hold right after an install (unless every
other row of the tier is pinned), a key is never installed while it is available, a
``writing`` placeholder always has its reservation, abandoned reservations are resolved
by their stage, and the token trie holds exactly the available rows.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from erllama.cache.keys import make_key_packed
from erllama.cache.ledger import Ledger
from erllama.cache.rows import NS_PER_S, DeleteFile, Effects, LedgerRow, Resolve, RowData

FP = b"\x01" * 32
CTX = b"\x02" * 32
NS = (FP, 7, CTX)
BUDGETS = {"ram": 30, "disk": 50}
TOKEN_LISTS = [
    (1,),
    (1, 2),
    (1, 2, 3),
    (1, 2, 4),
    (5, 6),
    (5, 6, 7, 8),
    (9,),
    (2, 1),
]
KEYS = {
    make_key_packed(FP, 7, CTX, struct.pack(f"<{len(t)}I", *t)): struct.pack(f"<{len(t)}I", *t)
    for t in TOKEN_LISTS
}
key_st = st.sampled_from(sorted(KEYS))
tier_st = st.sampled_from(sorted(BUDGETS))
holder_st = st.sampled_from(["h1", "h2", "h3"])


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 10 * NS_PER_S
        self.led = Ledger(BUDGETS, clock=lambda: self.now, ttl_s=5.0, token_seed=1)
        self.res: dict[bytes, tuple[int, str, str]] = {}  # key -> (token, holder, stage)
        self.linked: set[bytes] = set()  # final file exists for a reserved key
        self.pins: dict[int, LedgerRow] = {}
        self.dropped: list[LedgerRow] = []  # rows dropped as corrupt (pins may outlive them)
        # a holder id carries its process's pid: one that died comes back as a new id
        self.incarnation: dict[str, int] = {}
        self.dead: list[str] = []

    def live(self, holder: str) -> str:
        return f"{holder}:{self.incarnation.get(holder, 0)}"

    # ------------------------------------------------------------ helpers
    def data(self, key: bytes) -> RowData:
        return RowData(tokens=KEYS[key], namespace=NS, save_reason=1)

    def run(self, eff: Effects, *, installed: tuple[str, bytes] | None = None) -> None:
        actions = list(eff.actions)
        woken = list(eff.woken)
        while actions:
            a = actions.pop(0)
            if isinstance(a, DeleteFile):
                live = [r for r in self.pins.values() if r.key == a.key and r not in self.dropped]
                assert not live, "a pinned row was evicted"
                continue
            assert isinstance(a, Resolve)
            found = None
            if a.key in self.linked:
                found = (a.tier, f"/{a.key.hex()}", 7, self.data(a.key))
                installed = (a.tier, a.key)
            self.linked.discard(a.key)
            more = self.led.resolved(a.key, found)
            actions.extend(more.actions)
            woken.extend(more.woken)
        for w in woken:
            if w.pin_ref is not None:
                assert w.row is not None
                self.pins[w.pin_ref] = w.row
        if installed is not None:
            self.check_budget(*installed)

    def check_budget(self, tier: str, protect: bytes) -> None:
        use = self.led.tier_usage()[tier]
        if use.used > use.budget:
            others = [
                r
                for r in self.led.rows.values()
                if r.tier == tier and r.status == "available" and r.key != protect
            ]
            assert all(r.refcount > 0 for r in others), "budget exceeded with evictable rows"

    # ------------------------------------------------------------ publish protocol
    @rule(key=key_st, tier=tier_st, holder=holder_st)
    def reserve(self, key: bytes, tier: str, holder: str) -> None:
        holder = self.live(holder)
        was_available = self.led.lookup(key) is not None
        out = self.led.reserve(key, tier, holder)
        if out.status == "resolve":
            self.res.pop(key, None)
            self.run(out.effects)
            was_available = self.led.lookup(key) is not None
            out = self.led.reserve(key, tier, holder)
        assert (out.status == "already_present") == was_available
        if out.status == "created":
            assert key not in self.res
            self.res[key] = (out.token, holder, "pre_link")
        elif out.status == "conflict":
            assert key in self.res

    @precondition(lambda self: self.res)
    @rule(data=st.data())
    def check(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.res)))
        token, _, _ = self.res[key]
        assert self.led.check(key, token)
        assert not self.led.check(key, token + 10_000)

    @precondition(lambda self: self.res)
    @rule(data=st.data())
    def link(self, data: st.DataObject) -> None:
        self.linked.add(data.draw(st.sampled_from(sorted(self.res))))

    @precondition(lambda self: self.res)
    @rule(data=st.data())
    def mark(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.res)))
        token, holder, _ = self.res[key]
        assert self.led.mark_published(key, token, f"/{key.hex()}")
        self.res[key] = (token, holder, "post_link")
        self.linked.add(key)

    @precondition(lambda self: self.res)
    @rule(data=st.data(), size=st.integers(1, 20))
    def announce(self, data: st.DataObject, size: int) -> None:
        key = data.draw(st.sampled_from(sorted(self.res)))
        token, _, stage = self.res[key]
        assert self.led.lookup(key) is None
        status, eff = self.led.announce(key, token, size, self.data(key))
        if stage == "pre_link":
            assert status == "not_published"
            return
        assert status == "ok"
        del self.res[key]
        self.linked.discard(key)
        tier = self.led.rows[key].tier
        self.run(eff, installed=(tier, key))

    @precondition(lambda self: self.res)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.res)))
        token, _, stage = self.res.pop(key)
        eff = self.led.cancel(key, token)
        if stage == "post_link":
            assert eff.actions == [Resolve(key, self.led.rows[key].tier, "post_link")]
        else:
            self.linked.discard(key)  # the writer deletes its own temp
        self.run(eff)

    @rule(key=key_st, tier=tier_st, size=st.integers(1, 20))
    def insert_available(self, key: bytes, tier: str, size: int) -> None:
        was_available = self.led.lookup(key) is not None
        status, eff = self.led.insert_available(key, tier, "/x", size, self.data(key))
        if was_available:
            assert status == "already_present"
        elif key in self.res:
            assert status == "conflict"
        else:
            assert status == "inserted"
            self.run(eff, installed=(tier, key))

    @rule(holder=holder_st)
    def holder_dies(self, holder: str) -> None:
        holder, name = self.live(holder), holder
        self.incarnation[name] = self.incarnation.get(name, 0) + 1
        self.dead.append(holder)
        mine = {k: stage for k, (_, h, stage) in self.res.items() if h == holder}
        eff = self.led.release_holder(holder)
        resolves = {a.key: a.stage for a in eff.actions if isinstance(a, Resolve)}
        assert resolves == mine
        for k in mine:
            del self.res[k]
        for ref in [r for r, row in self.pins.items() if self.led.pins.get(r) is None]:
            del self.pins[ref]
        self.run(eff)

    @rule(seconds=st.floats(0.5, 8.0))
    def time_passes(self, seconds: float) -> None:
        self.now += int(seconds * NS_PER_S)
        eff = self.led.sweep()
        for a in eff.actions:
            assert isinstance(a, Resolve)
            _, _, stage = self.res.pop(a.key)
            assert a.stage == stage
        self.led.expire_waiters()
        self.run(eff)

    # ------------------------------------------------------------ readers
    @rule(key=key_st, holder=holder_st, wait=st.sampled_from([0, 100]))
    def checkout(self, key: bytes, holder: str, wait: int) -> None:
        out = self.led.checkout(key, self.live(holder), wait_ms=wait)
        if out.status == "hit":
            assert out.pin_ref is not None and out.row is not None
            self.pins[out.pin_ref] = out.row
        elif out.status in ("busy", "parked"):
            assert self.led.rows[key].status == "writing"

    @rule(tokens=st.sampled_from(TOKEN_LISTS), holder=holder_st)
    def longest_prefix(self, tokens: tuple[int, ...], holder: str) -> None:
        packed = struct.pack(f"<{len(tokens)}I", *tokens)
        found = self.led.longest_prefix_checkout(NS, packed, self.live(holder))
        if found is not None:
            common, ref, row = found
            assert row.tokens[: common * 4] == packed[: common * 4]
            self.pins[ref] = row

    @precondition(lambda self: self.dead)
    @rule(data=st.data(), key=key_st, tier=tier_st)
    def late_request_of_a_dead_holder(self, data: st.DataObject, key: bytes, tier: str) -> None:
        # still in meta's socket when the death was reported: it must claim nothing
        holder = data.draw(st.sampled_from(self.dead))
        reservations, pins = dict(self.led.reservations), dict(self.led.pins)
        assert self.led.reserve(key, tier, holder).status == "conflict"
        assert self.led.checkout(key, holder, wait_ms=100).status == "miss"
        packed = struct.pack(f"<{len(KEYS[key])}I", *KEYS[key])
        assert self.led.longest_prefix_checkout(NS, packed, holder) is None
        assert self.led.reservations == reservations and self.led.pins == pins

    @precondition(lambda self: self.pins)
    @rule(data=st.data())
    def checkin(self, data: st.DataObject) -> None:
        ref = data.draw(st.sampled_from(sorted(self.pins)))
        del self.pins[ref]
        assert self.led.checkin(ref)

    @rule(nbytes=st.integers(0, 60), tiers=st.sampled_from([["ram"], ["disk"], ["ram", "disk"]]))
    def evict_bytes(self, nbytes: int, tiers: list[str]) -> None:
        n, _, eff = self.led.evict_bytes(nbytes, tiers)
        assert n == len(eff.actions)
        self.run(eff)

    @rule()
    def gc(self) -> None:
        _, eff = self.led.gc()
        self.run(eff)
        for row in self.led.rows.values():
            if row.status == "available":
                assert row.refcount > 0

    @rule(key=key_st)
    def corrupt(self, key: bytes) -> None:
        row = self.led.lookup(key)
        if row is not None:
            self.dropped.append(row)  # D19: dropped even while pinned
        self.run(self.led.drop_corrupt(key))
        assert self.led.lookup(key) is None

    # ------------------------------------------------------------ invariants
    @invariant()
    def usage_matches_rows(self) -> None:
        for tier, use in self.led.tier_usage().items():
            rows = [r for r in self.led.rows.values() if r.tier == tier and r.status == "available"]
            assert use.used == sum(r.size for r in rows)
            assert use.rows == len(rows)
        c = self.led.counters()
        assert c["bytes_ram"] == self.led.tier_usage()["ram"].used

    @invariant()
    def refcounts_equal_live_pins(self) -> None:
        for row in self.led.rows.values():
            live = sum(1 for r in self.pins.values() if r is row)
            assert row.refcount == live
        for row in self.pins.values():
            assert row in self.dropped or self.led.rows.get(row.key) is row

    @invariant()
    def placeholders_have_reservations(self) -> None:
        for key, row in self.led.rows.items():
            assert (row.status == "writing") == (key in self.led.reservations)
        assert set(self.led.reservations) == set(self.res)

    @invariant()
    def trie_holds_available_rows(self) -> None:
        in_tries = {k for trie in self.led._tries.values() for _, k in trie.items()}
        available = {k for k, r in self.led.rows.items() if r.status == "available"}
        assert in_tries == available


LedgerMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLedgerMachine = LedgerMachine.TestCase
