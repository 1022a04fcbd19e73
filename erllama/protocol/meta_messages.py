"""Every wire shape of the cache-meta channel (workers, router, scheduler <-> meta).

Same rules as ``protocol/messages.py`` (STYLE §3.1): frozen, keyword-only
Structs tagged on ``t``, one union (``MetaRequest``) decoded by a typed
decoder, limits in the types, checked before anything is built. Replies reuse
``messages.Reply`` / ``messages.ErrorReply``; ``Reply.result`` carries one of
the ``*Result`` structs below (``codec.decode_result``).

Every request that takes a pin, parks a caller or owns a reservation names its
``holder`` (``f"{child_id}:{pid}"``), so that ``HoldersDied`` on the control
channel can release exactly what a dead process held.

KV payloads never travel here: a row is a handle (tier, path, size).

Operations (tag -> result):
    lookup_exact              -> LookupResult
    checkout                  -> CheckoutResult   (wait_ms > 0: lookup-or-wait)
    longest_prefix_checkout   -> PrefixResult
    checkin                   -> None
    reserve                   -> ReserveResult    (errors: already_present, conflict)
    check_reservation         -> None             (errors: expired)
    mark_published            -> None             (errors: expired)
    announce_saved            -> None             (errors: expired)
    cancel_reservation        -> None             (always ok)
    insert_available          -> InsertResult
    report_corrupt            -> None
    evict_bytes               -> EvictResult
    gc                        -> GcResult
    add_counters              -> no reply (fire and forget)
    meta_counters             -> CountersResult
    reset_counters            -> None
    tier_stats                -> TierStatsResult
    demote                    -> DemoteResult     (the reply waits for the copies)
    scheduler_report          -> no reply (fire and forget; shown by tier_stats)
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from erllama.protocol.messages import Id, Key, Msg, Result, TierUsage, TokenBytes

# ---------------------------------------------------------------- limits
MAX_PATH_LEN = 4096
MAX_COUNTER_NAME_LEN = 64
MAX_COUNTER_DELTAS = 64
MAX_WAIT_MS = 600_000
MAX_TIERS = 3

TierName = Literal["ram", "ram_file", "disk"]
Path_ = Annotated[str, msgspec.Meta(max_length=MAX_PATH_LEN)]
Hash32 = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
QuantByte = Annotated[int, msgspec.Meta(ge=0, le=255)]
NonNeg = Annotated[int, msgspec.Meta(ge=0)]
U63 = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
SaveReasonInt = Annotated[int, msgspec.Meta(ge=0, le=255)]
CounterName = Annotated[str, msgspec.Meta(max_length=MAX_COUNTER_NAME_LEN)]
Tiers = Annotated[list[TierName], msgspec.Meta(max_length=MAX_TIERS)]


# ================================================================ shared shapes
class RowInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What meta keeps about a saved row besides its location (from the KVC metadata).

    ``tokens`` are packed u32le; ``(fingerprint, quant, ctx_hash)`` is the row's
    namespace (its token trie). ``hit_count`` is the header's hit count (restart bias).
    """

    fingerprint: Hash32
    quant: QuantByte
    ctx_hash: Hash32
    tokens: TokenBytes
    save_reason: SaveReasonInt = 0
    hit_count: NonNeg = 0


class Row(Result, frozen=True):
    """A published row, as callers see it."""

    key: Key
    tier: TierName
    path: Path_
    size: int
    n_tokens: int
    save_reason: int = 0


class Pin(Result, frozen=True):
    """A pinned row: the row cannot be evicted until ``checkin(pin_ref)``."""

    pin_ref: int
    row: Row


# ================================================================ results
class LookupResult(Result, frozen=True):
    row: Row | None = None


class CheckoutResult(Result, frozen=True):
    """``status`` is ``hit`` (``pin`` set), ``miss`` or ``busy`` (being written, no wait)."""

    status: Literal["hit", "miss", "busy"]
    pin: Pin | None = None


class PrefixResult(Result, frozen=True):
    """``common_len`` tokens of the prompt equal the start of ``pin.row``'s tokens."""

    common_len: int = 0
    pin: Pin | None = None


class ReserveResult(Result, frozen=True):
    token: int


class InsertResult(Result, frozen=True):
    status: Literal["inserted", "already_present"]


class EvictResult(Result, frozen=True):
    evicted: int
    bytes_freed: int


class GcResult(Result, frozen=True):
    evicted: int


class CountersResult(Result, frozen=True):
    counters: dict[str, int]


class TierStatsResult(Result, frozen=True):
    tiers: list[TierUsage]
    scheduler: dict[str, Any] | None = None  # the scheduler's last report, if any


class DemoteResult(Result, frozen=True):
    """``demoted`` rows now live in the lower tier; ``evicted`` rows could not be copied
    and were evicted; ``bytes_freed`` left the source tiers."""

    demoted: int
    evicted: int
    bytes_freed: int


# ================================================================ requests
class LookupExact(Msg, tag="lookup_exact", frozen=True):
    key: Key


class Checkout(Msg, tag="checkout", frozen=True):
    """Pin ``key``; with ``wait_ms > 0`` a row still being written parks the caller."""

    key: Key
    holder: Id
    wait_ms: Annotated[int, msgspec.Meta(ge=0, le=MAX_WAIT_MS)] = 0


class LongestPrefixCheckout(Msg, tag="longest_prefix_checkout", frozen=True):
    """Trie lookup in the namespace plus a pin of the best row, in one round trip."""

    fingerprint: Hash32
    quant: QuantByte
    ctx_hash: Hash32
    tokens: TokenBytes
    holder: Id
    min_len: Annotated[int, msgspec.Meta(ge=1)] = 1


class Checkin(Msg, tag="checkin", frozen=True):
    pin_ref: int
    holder: Id = ""


class Reserve(Msg, tag="reserve", frozen=True):
    key: Key
    tier: TierName
    holder: Id


class CheckReservation(Msg, tag="check_reservation", frozen=True):
    key: Key
    token: int


class MarkPublished(Msg, tag="mark_published", frozen=True):
    key: Key
    token: int
    path: Path_


class AnnounceSaved(Msg, tag="announce_saved", frozen=True):
    key: Key
    token: int
    size: NonNeg
    info: RowInfo


class CancelReservation(Msg, tag="cancel_reservation", frozen=True):
    key: Key
    token: int


class InsertAvailable(Msg, tag="insert_available", frozen=True):
    """Install a row whose file is already complete at ``path`` (no reservation)."""

    key: Key
    tier: TierName
    path: Path_
    size: NonNeg
    info: RowInfo


class ReportCorrupt(Msg, tag="report_corrupt", frozen=True):
    """A load failed full validation: meta deletes the file and drops the row (D19)."""

    key: Key
    reason: Annotated[str, msgspec.Meta(max_length=256)] = ""


class EvictBytes(Msg, tag="evict_bytes", frozen=True):
    target: U63
    tiers: Tiers


class Gc(Msg, tag="gc", frozen=True):
    pass


class Demote(Msg, tag="demote", frozen=True):
    """Move LRU unpinned rows of ``from_tiers`` into ``to_tier`` until ``target`` bytes
    have left them (the copy runs off meta's loop; the reply comes when it is done)."""

    target: U63
    from_tiers: Tiers
    to_tier: TierName


class SchedulerReport(Msg, tag="scheduler_report", frozen=True):
    """Fire and forget: the scheduler's status (last sample, ratio, last action, vram)."""

    status: Annotated[dict[str, Any], msgspec.Meta(max_length=64)]


class AddCounters(Msg, tag="add_counters", frozen=True):
    """Fire and forget: meta sends no reply (bad ones are counted in ``bad_requests``)."""

    deltas: Annotated[dict[CounterName, U63], msgspec.Meta(max_length=MAX_COUNTER_DELTAS)]


class GetMetaCounters(Msg, tag="meta_counters", frozen=True):
    pass


class ResetCounters(Msg, tag="reset_counters", frozen=True):
    pass


class GetTierStats(Msg, tag="tier_stats", frozen=True):
    pass


MetaRequest = (
    LookupExact
    | Checkout
    | LongestPrefixCheckout
    | Checkin
    | Reserve
    | CheckReservation
    | MarkPublished
    | AnnounceSaved
    | CancelReservation
    | InsertAvailable
    | ReportCorrupt
    | EvictBytes
    | Gc
    | AddCounters
    | GetMetaCounters
    | ResetCounters
    | GetTierStats
    | Demote
    | SchedulerReport
)
