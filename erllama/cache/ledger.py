"""The cache index as a pure state machine: rows, pins, reservations, waiters, LRU, budgets.

No sockets, no I/O and no clock of its own (``clock`` is injected and returns
monotonic nanoseconds), so every rule of REFERENCE §6 is unit-testable. Work on
files is *returned* as actions that the meta process executes:

* ``DeleteFile(path)``: a row left the index (eviction, budget, corrupt report).
* ``Resolve(key, tier, stage)``: a reservation was abandoned (its holder died, its
  TTL passed, or it was cancelled after the link). The process deletes the key's
  temp files in the tier, fully validates the final file if one exists, then calls
  ``resolved(key, ...)`` with the row it found (adopt) or ``None`` (drop). The
  placeholder stays ``writing`` (invisible to readers) until then. Both stages are
  resolved the same way because a writer that died between ``link`` and
  ``mark_published`` leaves a complete file while its stage still says ``pre_link``;
  adopting it keeps every ``.kvc`` file in a tier directory accounted for.

Waiters (lookup-or-wait) are numbered here; the process maps the numbers to the
parked requests and answers them from ``Effects.woken``.

LRU: one lazy min-heap per tier (``rows.Lru``). Alternatives turned down: an
``OrderedDict`` (cannot express the restart bias, which puts rows in the future)
and a sort per eviction (O(n log n) on every install over budget).

The value types live in ``rows``.
"""

from __future__ import annotations

import heapq
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

from erllama.cache.keys import Namespace
from erllama.cache.rows import (
    BUDGET_LOW_WATER,
    COUNTER_NAMES,
    GAUGES,
    NS_PER_S,
    SAVE_REASON_COUNTERS,
    CheckoutOutcome,
    DeleteFile,
    Effects,
    HitUpdate,
    LedgerRow,
    Lru,
    Reservation,
    ReserveOutcome,
    Resolve,
    RowData,
    TierUse,
    Wake,
)
from erllama.cache.trie import TokenTrie

log = logging.getLogger(__name__)

DEAD_HOLDERS_MAX = 1024  # dead holders remembered (their late requests are refused)


class Ledger:
    """The cache index (REFERENCE §6) with per-tier budgets (D8) and current bytes (D21).

    Args:
        budgets: tier name -> byte budget; only these tiers can hold rows.
        clock: monotonic nanoseconds.
        ttl_s: reservation time to live (refreshed by check and mark).
        token_seed: first reservation token (a random base per meta incarnation, so a
            writer holding a token from a previous incarnation gets ``expired``).
    """

    def __init__(
        self,
        budgets: Mapping[str, int],
        *,
        clock: Callable[[], int],
        ttl_s: float = 60.0,
        token_seed: int = 1,
    ) -> None:
        self.budgets = dict(budgets)
        self.clock = clock
        self.ttl_ns = int(ttl_s * NS_PER_S)
        self.rows: dict[bytes, LedgerRow] = {}
        self.reservations: dict[bytes, Reservation] = {}
        self.pins: dict[int, tuple[str, LedgerRow]] = {}
        self._holder_pins: dict[str, set[int]] = {}
        self._waiters: dict[bytes, dict[int, str]] = {}  # key -> waiter -> holder
        self._waiter_keys: dict[int, tuple[bytes, int]] = {}  # waiter -> (key, deadline)
        self._waiter_heap: list[tuple[int, int]] = []  # (deadline, waiter)
        self._tries: dict[Namespace, TokenTrie] = {}
        self._lru: dict[str, Lru] = {t: Lru() for t in self.budgets}
        self._used: dict[str, int] = dict.fromkeys(self.budgets, 0)
        self._rows_in: dict[str, int] = dict.fromkeys(self.budgets, 0)
        self._dirty: set[bytes] = set()
        self._next_token = token_seed
        self._next_pin = 1
        self._next_waiter = 1
        self._counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self._demoting: dict[bytes, LedgerRow] = {}  # rows whose copy is being made
        # holders released as dead: a request of theirs that arrives later (it was still
        # in meta's socket when the root reported the death) must not pin or reserve
        # anything, or nobody would ever release it
        self._dead: OrderedDict[str, None] = OrderedDict()

    # ------------------------------------------------------------ counters
    def count(self, name: str, n: int = 1) -> None:
        """Add to a counter (unknown names and gauges are refused with KeyError)."""
        if name not in self._counters or name in GAUGES:
            raise KeyError(name)
        self._counters[name] += n

    def counters(self) -> dict[str, int]:
        out = dict(self._counters)
        for name, tier in GAUGES.items():
            out[name] = self._used.get(tier, 0)
        return out

    def reset_counters(self) -> None:
        """Zero every counter; the ``bytes_*`` gauges keep reporting current usage."""
        self._counters = dict.fromkeys(COUNTER_NAMES, 0)

    # ------------------------------------------------------------ reads
    def lookup(self, key: bytes) -> LedgerRow | None:
        row = self.rows.get(key)
        return row if row is not None and row.status == "available" else None

    def tier_usage(self) -> dict[str, TierUse]:
        return {
            t: TierUse(used=self._used[t], budget=self.budgets[t], rows=self._rows_in[t])
            for t in self.budgets
        }

    def holders(self) -> set[str]:
        """Every holder with a pin, a reservation or a parked waiter."""
        out = {h for h, refs in self._holder_pins.items() if refs}
        out.update(r.holder for r in self.reservations.values())
        for waiting in self._waiters.values():
            out.update(waiting.values())
        return out

    # ------------------------------------------------------------ pins
    def _pin(self, row: LedgerRow, holder: str, now: int) -> int:
        ref = self._next_pin
        self._next_pin += 1
        self.pins[ref] = (holder, row)
        self._holder_pins.setdefault(holder, set()).add(ref)
        row.refcount += 1
        row.hits += 1
        row.hits_dirty = True
        self._dirty.add(row.key)
        row.last_used = now  # D34: last use moves with the hit count
        self._lru[row.tier].touch(row.key, now)
        return ref

    def checkout(
        self, key: bytes, holder: str, *, wait_ms: int = 0, now: int | None = None
    ) -> CheckoutOutcome:
        """Pin an available row; park the caller on a ``writing`` one when ``wait_ms > 0``."""
        now = self.clock() if now is None else now
        row = self.rows.get(key)
        if row is None or self.holder_dead(holder):
            return CheckoutOutcome("miss")
        if row.status == "available":
            return CheckoutOutcome("hit", self._pin(row, holder, now), row)
        if wait_ms <= 0:
            return CheckoutOutcome("busy")
        waiter = self._next_waiter
        self._next_waiter += 1
        deadline = now + wait_ms * 1_000_000
        self._waiters.setdefault(key, {})[waiter] = holder
        self._waiter_keys[waiter] = (key, deadline)
        heapq.heappush(self._waiter_heap, (deadline, waiter))
        self._counters["checkouts_parked"] += 1
        return CheckoutOutcome("parked", waiter=waiter)

    def longest_prefix_len(self, ns: Namespace, tokens: bytes) -> int:
        """The longest common prefix any available row shares with ``tokens`` (no pin)."""
        trie = self._tries.get(ns)
        found = None if trie is None else trie.longest_prefix_packed(tokens)
        return 0 if found is None else found[0]

    def longest_prefix_checkout(
        self, ns: Namespace, tokens: bytes, holder: str, *, min_len: int = 1
    ) -> tuple[int, int, LedgerRow] | None:
        """The row sharing the longest common prefix with ``tokens``, pinned.

        Returns ``(common_len, pin_ref, row)`` or None when nothing shares ``min_len``.
        """
        trie = self._tries.get(ns)
        if trie is None or self.holder_dead(holder):
            return None
        found = trie.longest_prefix_packed(tokens)
        if found is None or found[0] < min_len:
            return None
        common, key = found
        row = self.rows.get(key)
        if row is None or row.status != "available":  # pragma: no cover - trie kept in sync
            log.error("trie out of sync for key %s", key.hex())
            return None
        return common, self._pin(row, holder, self.clock()), row

    def checkin(self, pin_ref: int) -> bool:
        """Release a pin (unknown refs are ignored: a pin may predate a meta restart)."""
        entry = self.pins.pop(pin_ref, None)
        if entry is None:
            return False
        holder, row = entry
        refs = self._holder_pins.get(holder)
        if refs is not None:
            refs.discard(pin_ref)
            if not refs:
                del self._holder_pins[holder]
        # the pin belongs to that row object: a row dropped (D19) and saved again under
        # the same key is a different object and keeps its own pins
        if row.refcount > 0:
            row.refcount -= 1
        return True

    # ------------------------------------------------------------ install / remove
    def _install(
        self, key: bytes, tier: str, path: str, size: int, data: RowData, now: int
    ) -> Effects:
        """Make ``key`` an available row, answer its waiters, enforce the tier budget."""
        row = LedgerRow(
            key=key,
            tier=tier,
            path=path,
            size=size,
            tokens=data.tokens,
            namespace=data.namespace,
            save_reason=data.save_reason,
            hits=data.hit_count,
            last_used=now + data.hit_count * NS_PER_S,  # restart bias (§6.1)
        )
        self.rows[key] = row
        self._used[tier] += size
        self._rows_in[tier] += 1
        self._lru[tier].touch(key, row.last_used)
        if row.namespace is not None and row.tokens:
            trie = self._tries.get(row.namespace)
            if trie is None:
                trie = self._tries[row.namespace] = TokenTrie()
            trie.insert_packed(row.tokens, key)
        eff = Effects(woken=self._wake(key, row, now))
        budget = self.budgets[tier]
        if self._used[tier] > budget:
            target = self._used[tier] - int(budget * BUDGET_LOW_WATER)
            _, _, evicted = self._evict([tier], target, protect=key)
            eff.merge(evicted)
        return eff

    def _wake(self, key: bytes, row: LedgerRow | None, now: int) -> list[Wake]:
        waiting = self._waiters.pop(key, None)
        if not waiting:
            return []
        woken = []
        for waiter, holder in waiting.items():
            self._waiter_keys.pop(waiter, None)
            if row is None:
                woken.append(Wake(waiter, key, None, None))
            else:
                woken.append(Wake(waiter, key, self._pin(row, holder, now), row))
        return woken

    def _remove(self, key: bytes) -> LedgerRow | None:
        """Take a row out of every structure (no action, no counter)."""
        row = self.rows.pop(key, None)
        if row is None or row.status != "available":
            return row
        self._used[row.tier] -= row.size
        self._rows_in[row.tier] -= 1
        self._lru[row.tier].discard(key)
        self._dirty.discard(key)
        if row.namespace is not None and row.tokens:
            trie = self._tries.get(row.namespace)
            if trie is not None:
                trie.remove_packed(row.tokens, key)
                if not len(trie):
                    del self._tries[row.namespace]
        return row

    def _drop_placeholder(self, key: bytes) -> list[Wake]:
        row = self.rows.get(key)
        if row is not None and row.status == "writing":
            del self.rows[key]
        return self._wake(key, None, 0)

    def insert_available(
        self, key: bytes, tier: str, path: str, size: int, data: RowData
    ) -> tuple[Literal["inserted", "already_present", "conflict"], Effects]:
        """Install a complete file directly (startup scan, RAM writers, re-insert after
        an expired publish). A live reservation on the key wins (``conflict``)."""
        if tier not in self.budgets:
            raise KeyError(tier)
        row = self.rows.get(key)
        if row is not None and row.status == "available":
            return "already_present", Effects()
        if key in self.reservations:
            return "conflict", Effects()
        return "inserted", self._install(key, tier, path, size, data, self.clock())

    # ------------------------------------------------------------ reservations (§6.3)
    def reserve(self, key: bytes, tier: str, holder: str) -> ReserveOutcome:
        if tier not in self.budgets:
            raise KeyError(tier)
        if self.holder_dead(holder):
            return ReserveOutcome("conflict")
        now = self.clock()
        row = self.rows.get(key)
        if row is not None and row.status == "available":
            self._counters["duplicate_dropped"] += 1
            return ReserveOutcome("already_present")
        res = self.reservations.get(key)
        if res is not None:
            if now < res.expires:
                return ReserveOutcome("conflict")
            log.info("event=reservation_stale key=%s stage=%s", key.hex()[:16], res.stage)
            return ReserveOutcome("resolve", effects=self._abandon(key))
        if row is not None:  # writing with no reservation: a Resolve is pending
            return ReserveOutcome(
                "resolve", effects=Effects(actions=[Resolve(key, row.tier, "pre_link")])
            )
        token = self._next_token
        self._next_token += 1
        self.reservations[key] = Reservation(token, holder, "pre_link", now + self.ttl_ns, tier)
        self.rows[key] = LedgerRow(
            key=key,
            tier=tier,
            path="",
            size=0,
            tokens=b"",
            namespace=None,
            save_reason=0,
            hits=0,
            last_used=now,
            status="writing",
        )
        return ReserveOutcome("created", token)

    def _abandon(self, key: bytes) -> Effects:
        """Remove a reservation; the placeholder waits for the process to resolve it."""
        res = self.reservations.pop(key)
        return Effects(actions=[Resolve(key, res.tier, res.stage)])

    def _match(self, key: bytes, token: int) -> Reservation | None:
        res = self.reservations.get(key)
        return res if res is not None and res.token == token else None

    def check(self, key: bytes, token: int) -> bool:
        """``check_reservation``: refresh the TTL; False = expired."""
        res = self._match(key, token)
        if res is None:
            return False
        res.expires = self.clock() + self.ttl_ns
        return True

    def mark_published(self, key: bytes, token: int, path: str) -> bool:
        res = self._match(key, token)
        if res is None:
            return False
        res.stage = "post_link"
        res.path = path
        res.expires = self.clock() + self.ttl_ns
        return True

    def announce(
        self, key: bytes, token: int, size: int, data: RowData
    ) -> tuple[Literal["ok", "expired", "not_published"], Effects]:
        res = self._match(key, token)
        if res is None:
            return "expired", Effects()
        if res.stage != "post_link":
            return "not_published", Effects()
        del self.reservations[key]
        reason = SAVE_REASON_COUNTERS.get(data.save_reason)
        if reason is not None:
            self._counters[reason] += 1
        return "ok", self._install(key, res.tier, res.path, size, data, self.clock())

    def cancel(self, key: bytes, token: int) -> Effects:
        """``cancel_reservation``: always ok; a post_link file is resolved, not dropped."""
        res = self._match(key, token)
        if res is None:
            return Effects()
        if res.stage == "post_link":
            return self._abandon(key)
        del self.reservations[key]
        return Effects(woken=self._drop_placeholder(key))

    def resolved(self, key: bytes, found: tuple[str, str, int, RowData] | None) -> Effects:
        """The process resolved an abandoned reservation: ``(tier, path, size, data)`` of a
        valid final file (adopt), or None (the placeholder goes, waiters get a miss)."""
        row = self.rows.get(key)
        if row is None or row.status != "writing" or key in self.reservations:
            return Effects()  # resolved already, or a new writer owns the key now
        if found is None:
            return Effects(woken=self._drop_placeholder(key))
        tier, path, size, data = found
        del self.rows[key]
        return self._install(key, tier, path, size, data, self.clock())

    def sweep(self) -> Effects:
        """Abandon every reservation past its TTL (REFERENCE §5 sweep)."""
        now = self.clock()
        eff = Effects()
        for key in [k for k, r in self.reservations.items() if r.expires <= now]:
            eff.merge(self._abandon(key))
        return eff

    # ------------------------------------------------------------ waiters
    def expire_waiters(self) -> list[Wake]:
        """Misses for every parked checkout past its deadline."""
        now = self.clock()
        out = []
        while self._waiter_heap and self._waiter_heap[0][0] <= now:
            _, waiter = heapq.heappop(self._waiter_heap)
            entry = self._waiter_keys.pop(waiter, None)
            if entry is None:
                continue  # answered already
            key = entry[0]
            waiting = self._waiters.get(key)
            if waiting is not None:
                waiting.pop(waiter, None)
                if not waiting:
                    del self._waiters[key]
            out.append(Wake(waiter, key, None, None))
        return out

    def next_waiter_deadline(self) -> int | None:
        while self._waiter_heap and self._waiter_heap[0][1] not in self._waiter_keys:
            heapq.heappop(self._waiter_heap)
        return self._waiter_heap[0][0] if self._waiter_heap else None

    def drop_all_waiters(self) -> list[Wake]:
        out = [Wake(w, k, None, None) for w, (k, _) in self._waiter_keys.items()]
        self._waiters.clear()
        self._waiter_keys.clear()
        self._waiter_heap.clear()
        return out

    # ------------------------------------------------------------ holders
    def release_holder(self, holder: str) -> Effects:
        """A process died: release its pins, resolve its reservations, and answer its
        parked checkouts with a miss (the process drops replies nobody can receive).
        Its later requests pin and reserve nothing (``holder_dead``)."""
        self._dead[holder] = None
        while len(self._dead) > DEAD_HOLDERS_MAX:
            self._dead.popitem(last=False)
        for ref in sorted(self._holder_pins.get(holder, ())):
            self.checkin(ref)
        eff = Effects()
        for key in [k for k, r in self.reservations.items() if r.holder == holder]:
            eff.merge(self._abandon(key))
        for key in list(self._waiters):
            waiting = self._waiters[key]
            for waiter in [w for w, h in waiting.items() if h == holder]:
                del waiting[waiter]
                self._waiter_keys.pop(waiter, None)
                eff.woken.append(Wake(waiter, key, None, None))
            if not waiting:
                del self._waiters[key]
        return eff

    def holder_dead(self, holder: str) -> bool:
        """``holder`` was released as dead (holder ids carry the pid: never reused soon)."""
        if holder in self._dead:
            log.info("event=dead_holder_request holder=%s: refused", holder)
            return True
        return False

    # ------------------------------------------------------------ eviction (§6.5)
    def _evict(
        self, tiers: Iterable[str], target: int, *, protect: bytes | None = None
    ) -> tuple[int, int, Effects]:
        """Evict unpinned available rows of ``tiers``, oldest first, until ``target`` bytes
        are freed (``target < 0``: every evictable row)."""
        lrus = [self._lru[t] for t in dict.fromkeys(tiers) if t in self._lru]
        eff = Effects()
        n = freed = 0
        skipped: list[tuple[Lru, tuple[int, int, bytes]]] = []
        while target < 0 or freed < target:
            best: Lru | None = None
            best_top: tuple[int, int, bytes] | None = None
            for lru in lrus:
                top = lru.top()
                if top is not None and (best_top is None or top < best_top):
                    best, best_top = lru, top
            if best is None or best_top is None:
                break
            heapq.heappop(best.heap)
            key = best_top[2]
            row = self.rows.get(key)
            if row is None or row.status != "available":  # pragma: no cover - lazily dropped
                best.discard(key)
                continue
            if row.refcount > 0 or key == protect:
                skipped.append((best, best_top))
                continue
            self._remove(key)
            n += 1
            freed += row.size
            eff.actions.append(DeleteFile(key, row.path))
        for lru, entry in skipped:
            heapq.heappush(lru.heap, entry)
        self._counters["evictions"] += n
        return n, freed, eff

    def evict_bytes(self, target: int, tiers: Iterable[str]) -> tuple[int, int, Effects]:
        """Evict LRU unpinned rows of ``tiers`` until ``target`` bytes are freed."""
        if target <= 0:
            return 0, 0, Effects()
        return self._evict(tiers, target)

    def gc(self) -> tuple[int, Effects]:
        """Evict every unreferenced available row."""
        n, _, eff = self._evict(list(self.budgets), -1)
        return n, eff

    # ------------------------------------------------------------ demotion (scheduler)
    def demote_pick(self, target: int, tiers: Iterable[str]) -> list[LedgerRow]:
        """Unpinned available rows of ``tiers``, oldest first, until ``target`` bytes: the
        rows to copy into a lower tier. They stay hits meanwhile; ``demote_done`` or
        ``demote_failed`` must follow for each."""
        if target <= 0:
            return []
        entries: list[tuple[int, int, bytes]] = []
        for t in dict.fromkeys(tiers):
            lru = self._lru.get(t)
            if lru is not None:
                entries += [(lu, s, k) for k, (lu, s) in lru.stamp.items()]
        entries.sort()
        out: list[LedgerRow] = []
        total = 0
        for _, _, key in entries:
            if total >= target:
                break
            row = self.rows.get(key)
            if row is None or row.status != "available" or row.refcount > 0:
                continue
            if key in self._demoting:
                continue
            self._demoting[key] = row
            out.append(row)
            total += row.size
        return out

    def demote_done(
        self, key: bytes, to_tier: str, new_path: str
    ) -> tuple[Literal["demoted", "skipped"], Effects]:
        """The copy of ``key`` sits at ``new_path`` in ``to_tier``: re-point the row and
        delete the old file (``demoted``), or drop the copy when the row was pinned,
        removed or replaced meanwhile (``skipped``)."""
        picked = self._demoting.pop(key, None)
        row = self.rows.get(key)
        if (
            picked is None
            or row is not picked
            or row.status != "available"
            or row.refcount > 0
            or to_tier not in self.budgets
        ):
            if row is None or row.path != new_path:
                return "skipped", Effects(actions=[DeleteFile(key, new_path)])
            return "skipped", Effects()
        old_tier, old_path = row.tier, row.path
        self._used[old_tier] -= row.size
        self._rows_in[old_tier] -= 1
        self._lru[old_tier].discard(key)
        row.tier, row.path = to_tier, new_path
        self._used[to_tier] += row.size
        self._rows_in[to_tier] += 1
        self._lru[to_tier].touch(key, row.last_used)
        self._counters["rows_demoted"] += 1
        eff = Effects(actions=[DeleteFile(key, old_path)])
        budget = self.budgets[to_tier]
        if self._used[to_tier] > budget:
            target = self._used[to_tier] - int(budget * BUDGET_LOW_WATER)
            _, _, evicted = self._evict([to_tier], target, protect=key)
            eff.merge(evicted)
        return "demoted", eff

    def demote_failed(self, key: bytes) -> tuple[int, Effects]:
        """The copy failed: evict the row instead when nobody holds it; returns the bytes
        freed."""
        picked = self._demoting.pop(key, None)
        row = self.rows.get(key)
        if picked is None or row is not picked or row.status != "available" or row.refcount:
            return 0, Effects()
        self._remove(key)
        self._counters["evictions"] += 1
        return row.size, Effects(actions=[DeleteFile(key, row.path)])

    def drop_corrupt(self, key: bytes, *, corrupt: bool = True) -> Effects:
        """D19: a row whose file failed validation (``corrupt``) or is gone leaves the
        index at once, pinned or not."""
        row = self.rows.get(key)
        if row is None or row.status != "available":
            return Effects()
        self._remove(key)
        self._counters["corrupt_files"] += corrupt
        self._counters["stale_rows_dropped"] += 1
        return Effects(actions=[DeleteFile(key, row.path)])

    # ------------------------------------------------------------ hit persistence (D33)
    def take_dirty_hits(self) -> list[HitUpdate]:
        """Rows whose hit count changed since the last call (for a batched header write)."""
        out = []
        for key in self._dirty:
            row = self.rows.get(key)
            if row is not None and row.status == "available" and row.hits_dirty:
                row.hits_dirty = False
                out.append(HitUpdate(key, row.path, row.hits))
        self._dirty.clear()
        return out

    def has_dirty_hits(self) -> bool:
        return bool(self._dirty)
