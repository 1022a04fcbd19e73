"""What meta does for each request of the meta channel (one method per operation).

Mixed into ``meta.MetaServer``, which owns the sockets, the outbox and the timers.
A handler checks what the types could not (token bytes a multiple of 4, a key that
re-derives from its metadata, a path that is the key's final file in a configured
tier, a size that matches the file), applies the request to the ledger, executes
the ledger's file actions through ``apply``, and returns ``(result, pin_ref)`` to
reply with, or ``None`` for no reply (``add_counters``, a parked checkout). Bad
input raises ``InvalidRequestError`` (``bad_request``); protocol refusals raise
``ConflictError`` (``already_present``, ``conflict``, ``expired``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, cast

from erllama.cache.demote import DemoteJob, Victim
from erllama.cache.keys import make_key_packed
from erllama.cache.kvc import KvcError
from erllama.cache.ledger import Ledger
from erllama.cache.remote_meta import RemoteMeta
from erllama.cache.rows import Effects, LedgerRow, RowData, row_data
from erllama.cache.tiers import TierLayout, validate_file
from erllama.protocol.errors import ConflictError, ErrorCode, InvalidRequestError
from erllama.protocol.messages import Msg, TierUsage
from erllama.protocol.meta_messages import (
    AddCounters,
    AnnounceSaved,
    CancelReservation,
    Checkin,
    Checkout,
    CheckoutResult,
    CheckReservation,
    CountersResult,
    Demote,
    DemoteResult,
    EvictBytes,
    EvictResult,
    Gc,
    GcResult,
    GetMetaCounters,
    GetTierStats,
    InsertAvailable,
    InsertResult,
    LongestPrefixCheckout,
    LookupExact,
    LookupResult,
    MarkPublished,
    Pin,
    PrefixResult,
    ReportCorrupt,
    Reserve,
    ReserveResult,
    ResetCounters,
    Row,
    RowInfo,
    SchedulerReport,
    TierName,
    TierStatsResult,
)

log = logging.getLogger(__name__)

Out = tuple[Any, int | None] | None
"""(result struct or None, pin carried by the reply) to reply; None for no reply."""

MAX_RESERVE_ROUNDS = 4  # a stale reservation is resolved, then reserve runs again


def to_row(row: LedgerRow) -> Row:
    return Row(
        key=row.key,
        tier=cast(TierName, row.tier),
        path=row.path,
        size=row.size,
        n_tokens=row.n_tokens,
        save_reason=row.save_reason,
    )


def _pin(ref: int, row: LedgerRow) -> Pin:
    return Pin(pin_ref=ref, row=to_row(row))


def _check_tokens(tokens: bytes) -> None:
    if len(tokens) % 4:
        raise InvalidRequestError(f"token bytes length {len(tokens)} is not a multiple of 4")


class RequestHandlers(RemoteMeta):
    """The per-operation logic; the subclass provides the ledger, layout, apply and park.

    The remote tier's hooks (``remote_lookup``, ``remote_publish``, ``remote_usage``)
    come from ``remote_meta.RemoteMeta`` and do nothing while no remote tier runs."""

    ledger: Ledger
    layout: TierLayout
    scheduler_status: dict[str, Any] | None = None
    _ident: bytes = b""

    def apply(self, eff: Effects) -> None:  # pragma: no cover - provided by MetaServer
        raise NotImplementedError

    def submit_demote(self, job: DemoteJob) -> None:  # pragma: no cover - MetaServer
        raise NotImplementedError

    def park(self, waiter: int, request_id: str) -> None:  # pragma: no cover
        raise NotImplementedError

    @property
    def handlers(self) -> dict[type[Msg], Callable[[Any], Out]]:
        return {cls: getattr(self, name) for cls, name in HANDLERS.items()}

    # ------------------------------------------------------------ checks
    def _tier(self, tier: str) -> str:
        if tier not in self.layout.budgets:
            raise InvalidRequestError(f"tier {tier!r} is not configured")
        return tier

    def _final(self, tier: str, key: bytes, path: str) -> None:
        expected = str(self.layout.final_path(tier, key))
        if path != expected:
            raise InvalidRequestError(f"path {path!r} is not the key's file {expected!r}")

    @staticmethod
    def _info(key: bytes, info: RowInfo) -> RowData:
        _check_tokens(info.tokens)
        derived = make_key_packed(info.fingerprint, info.quant, info.ctx_hash, info.tokens)
        if derived != key:
            raise InvalidRequestError("the key does not derive from the row's metadata")
        return row_data(info)

    @staticmethod
    def _size(path: str, size: int) -> None:
        try:
            actual = os.stat(path).st_size
        except OSError as exc:
            raise InvalidRequestError(f"cannot stat {path}: {exc.strerror}") from None
        if actual != size:
            raise InvalidRequestError(f"size {size} but the file has {actual} bytes")

    # ------------------------------------------------------------ lookups and pins
    def op_lookup_exact(self, m: LookupExact) -> Out:
        row = self.ledger.lookup(m.key)
        return LookupResult(row=None if row is None else to_row(row)), None

    def op_checkout(self, m: Checkout) -> Out:
        out = self.ledger.checkout(m.key, m.holder, wait_ms=m.wait_ms)
        if out.status == "parked" and out.waiter is not None:
            self.park(out.waiter, m.request_id)
            return None
        if out.status == "hit" and out.pin_ref is not None and out.row is not None:
            return CheckoutResult(status="hit", pin=_pin(out.pin_ref, out.row)), out.pin_ref
        return CheckoutResult(status="busy" if out.status == "busy" else "miss"), None

    def op_longest_prefix_checkout(self, m: LongestPrefixCheckout) -> Out:
        _check_tokens(m.tokens)
        if self.remote_lookup(m):  # parked: answered when the remote tier is done
            return None
        return self.local_prefix(m)

    def local_prefix(self, m: LongestPrefixCheckout) -> tuple[PrefixResult, int | None]:
        """The longest-prefix answer from the local index (pinned)."""
        t0 = time.perf_counter_ns()
        found = self.ledger.longest_prefix_checkout(
            (m.fingerprint, m.quant, m.ctx_hash), m.tokens, m.holder, min_len=m.min_len
        )
        self.ledger.count("longest_prefix_probes")
        self.ledger.count("longest_prefix_ns", time.perf_counter_ns() - t0)
        if found is None:
            return PrefixResult(), None
        common, ref, row = found
        return PrefixResult(common_len=common, pin=_pin(ref, row)), ref

    def op_checkin(self, m: Checkin) -> Out:
        self.ledger.checkin(m.pin_ref)
        return None, None

    def op_report_corrupt(self, m: ReportCorrupt) -> Out:
        row = self.ledger.lookup(m.key)
        if row is None:
            return None, None
        try:
            validate_file(row.path, m.key)
        except (KvcError, OSError) as exc:
            log.warning("event=corrupt_row key=%s reason=%s", m.key.hex(), exc)
            gone = isinstance(exc, FileNotFoundError)
            self.apply(self.ledger.drop_corrupt(m.key, corrupt=not gone))
            return None, None
        log.warning("event=corrupt_report_ignored key=%s (the file validates)", m.key.hex())
        return None, None

    # ------------------------------------------------------------ publish protocol
    def op_reserve(self, m: Reserve) -> Out:
        self._tier(m.tier)
        for _ in range(MAX_RESERVE_ROUNDS):
            out = self.ledger.reserve(m.key, m.tier, m.holder)
            if out.status == "resolve":
                self.apply(out.effects)
                continue
            if out.status == "created":
                return ReserveResult(token=out.token), None
            raise ConflictError(f"key {out.status.replace('_', ' ')}", code=out.status)
        raise ConflictError("reservation still being resolved", code=ErrorCode.CONFLICT)

    def op_check_reservation(self, m: CheckReservation) -> Out:
        if not self.ledger.check(m.key, m.token):
            raise ConflictError("reservation expired", code=ErrorCode.EXPIRED)
        return None, None

    def op_mark_published(self, m: MarkPublished) -> Out:
        res = self.ledger.reservations.get(m.key)
        if res is None or res.token != m.token:
            raise ConflictError("reservation expired", code=ErrorCode.EXPIRED)
        self._final(res.tier, m.key, m.path)
        self.ledger.mark_published(m.key, m.token, m.path)
        return None, None

    def op_announce_saved(self, m: AnnounceSaved) -> Out:
        data = self._info(m.key, m.info)
        res = self.ledger.reservations.get(m.key)
        if res is None or res.token != m.token:
            raise ConflictError("reservation expired", code=ErrorCode.EXPIRED)
        if res.stage != "post_link":
            raise InvalidRequestError("announce_saved before mark_published")
        self._size(res.path, m.size)
        path = res.path
        status, eff = self.ledger.announce(m.key, m.token, m.size, data)
        self.apply(eff)
        if status == "ok":
            self.remote_publish(m.key, path, m.size)
        return None, None

    def op_cancel_reservation(self, m: CancelReservation) -> Out:
        self.apply(self.ledger.cancel(m.key, m.token))
        return None, None

    def op_insert_available(self, m: InsertAvailable) -> Out:
        self._tier(m.tier)
        self._final(m.tier, m.key, m.path)
        data = self._info(m.key, m.info)
        self._size(m.path, m.size)
        status, eff = self.ledger.insert_available(m.key, m.tier, m.path, m.size, data)
        if status == "conflict":
            raise ConflictError("the key is being written", code=ErrorCode.CONFLICT)
        self.apply(eff)
        if status == "inserted":
            self.remote_publish(m.key, m.path, m.size)
        return InsertResult(status=status), None

    # ------------------------------------------------------------ eviction, counters, stats
    def op_evict_bytes(self, m: EvictBytes) -> Out:
        tiers = [t for t in m.tiers if t in self.layout.budgets]
        n, freed, eff = self.ledger.evict_bytes(m.target, tiers)
        self.apply(eff)
        return EvictResult(evicted=n, bytes_freed=freed), None

    def op_demote(self, m: Demote) -> Out:
        """Pick the victims now; the copies run on the demoter thread and the reply is
        sent when they are done (``MetaServer.finish_demotes``). With no target tier
        configured this is a plain ``evict_bytes``."""
        tiers = [t for t in m.from_tiers if t in self.layout.budgets and t != m.to_tier]
        if m.to_tier not in self.layout.budgets:
            n, freed, eff = self.ledger.evict_bytes(m.target, tiers)
            self.apply(eff)
            return DemoteResult(demoted=0, evicted=n, bytes_freed=freed), None
        rows = self.ledger.demote_pick(m.target, tiers)
        if not rows:
            return DemoteResult(demoted=0, evicted=0, bytes_freed=0), None
        victims = [Victim(r.key, r.path, r.size, r.tier) for r in rows]
        self.submit_demote(DemoteJob(self._ident, m.request_id, m.to_tier, victims))
        return None

    def op_scheduler_report(self, m: SchedulerReport) -> Out:
        self.scheduler_status = dict(m.status)
        return None

    def op_gc(self, m: Gc) -> Out:
        n, eff = self.ledger.gc()
        self.apply(eff)
        return GcResult(evicted=n), None

    def op_add_counters(self, m: AddCounters) -> Out:
        for name, value in m.deltas.items():
            try:
                self.ledger.count(name, value)
            except KeyError:
                self.ledger.count("bad_requests")
                log.warning("event=bad_request add_counters: unknown counter %r", name)
        return None

    def op_counters(self, m: GetMetaCounters) -> Out:
        # gauges of held claims besides the counters: the fault tests check they drain
        held = {
            "pins_held": len(self.ledger.pins),
            "reservations_held": len(self.ledger.reservations),
        }
        return CountersResult(counters={**self.ledger.counters(), **held}), None

    def op_reset_counters(self, m: ResetCounters) -> Out:
        self.ledger.reset_counters()
        return None, None

    def op_tier_stats(self, m: GetTierStats) -> Out:
        tiers = [
            TierUsage(
                name=t,
                path=str(self.layout.path(t)),
                used_bytes=u.used,
                budget_bytes=u.budget,
                rows=u.rows,
            )
            for t, u in self.ledger.tier_usage().items()
        ]
        tiers += self.remote_usage()
        return TierStatsResult(tiers=tiers, scheduler=self.scheduler_status), None


HANDLERS: dict[type[Msg], str] = {
    LookupExact: "op_lookup_exact",
    Checkout: "op_checkout",
    LongestPrefixCheckout: "op_longest_prefix_checkout",
    Checkin: "op_checkin",
    ReportCorrupt: "op_report_corrupt",
    Reserve: "op_reserve",
    CheckReservation: "op_check_reservation",
    MarkPublished: "op_mark_published",
    AnnounceSaved: "op_announce_saved",
    CancelReservation: "op_cancel_reservation",
    InsertAvailable: "op_insert_available",
    EvictBytes: "op_evict_bytes",
    Demote: "op_demote",
    SchedulerReport: "op_scheduler_report",
    Gc: "op_gc",
    AddCounters: "op_add_counters",
    GetMetaCounters: "op_counters",
    ResetCounters: "op_reset_counters",
    GetTierStats: "op_tier_stats",
}
