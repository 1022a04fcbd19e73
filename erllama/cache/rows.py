"""The value types of the cache index: rows, reservations, actions, outcomes, counters.

Shared by ``ledger`` (the state machine that produces them) and the meta process
(which executes the actions and answers from the outcomes). ``Lru`` is the lazy
per-tier min-heap the ledger evicts from: entries are ``(last_used, seq, key)``;
one whose stamp no longer matches its row is stale and skipped; the heap is
rebuilt when it holds more than twice as many entries as rows.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Literal

from erllama.cache.keys import Namespace
from erllama.cache.kvc import KvcMeta
from erllama.protocol.meta_messages import RowInfo

NS_PER_S = 1_000_000_000
BUDGET_LOW_WATER = 0.9  # evict down to 90% of a tier's budget (R: D8)

RowStatus = Literal["available", "writing"]
Stage = Literal["pre_link", "post_link"]

COUNTER_NAMES: tuple[str, ...] = (
    # REFERENCE §10, in order
    "hits_exact",
    "hits_resume",
    "misses",
    "saves_cold",
    "saves_continued",
    "saves_finish",
    "saves_evict",
    "saves_shutdown",
    "evictions",
    "corrupt_files",
    "pack_total_ns",
    "load_total_ns",
    "bytes_ram",
    "bytes_ramfile",
    "bytes_disk",
    "duplicate_dropped",
    "hits_longest_prefix",
    "longest_prefix_probes",
    "longest_prefix_ns",
    "saves_dropped",
    # R: §10 additions
    "saves_queued",
    "save_queue_bytes",
    "worker_restarts",
    "stale_rows_dropped",
    # ours
    "bad_requests",
    "internal_errors",
    "checkouts_parked",
    "hits_live",  # a worker reused its live KV (no restore needed)
    "saves_timed_out",  # an evict/shutdown save still unwritten at evict_save_timeout_ms
    # memory-pressure scheduler (REFERENCE §9): every decision is counted
    "rows_evicted",  # rows the scheduler evicted (also in ``evictions``)
    "rows_demoted",  # rows moved into a lower tier instead of evicted (still hits)
    "bytes_freed",  # bytes of RAM-backed rows the scheduler evicted or demoted
    "workers_evicted",  # idle workers told to save and free their llama context
    "models_unloaded",  # idle models put to sleep under pressure (they wake on a request)
    # keep_alive (router/keepalive.py)
    "keep_alive_unloads",  # a model's keep_alive ran out: its worker stopped, model kept
    "models_reloaded",  # a request woke a sleeping model (its worker started again)
    # the shared remote tier (cache/remote.py); the store down is a miss, never an error
    "remote_probes",  # lookups sent to the store (one pipelined round trip each)
    "remote_hits",  # rows fetched, verified and promoted into the local tier
    "remote_pointer_hits",  # of them, rows found through a prefix pointer (any length)
    "remote_pointers_stale",  # pointers to a row gone or not a prefix (deleted: a miss)
    "remote_misses",  # lookups that found no usable row (absent, evicted, dropped, late)
    "remote_errors",  # calls the store did not answer (down, refused, past timeout_ms)
    "remote_skipped",  # lookups not sent because the store was marked down (back-off)
    "remote_corrupt",  # remote rows that failed verification (dropped from the store)
    "remote_late",  # lookups answered locally at lookup_deadline_ms (the fetch lands later)
    "remote_bytes_up",
    "remote_bytes_down",
    "remote_fetch_ns",  # time of the lookups (probe + fetch + verify + write), summed
    "remote_uploads",  # rows copied to the store
    "remote_uploads_present",  # rows the store had already (another daemon's)
    "remote_uploads_dropped",  # rows never copied (queue bounds, store down too long)
    "remote_reconnects",  # the store answered again after being marked down
)
GAUGES: dict[str, str] = {"bytes_ram": "ram", "bytes_ramfile": "ram_file", "bytes_disk": "disk"}
"""Counters that are current byte usage of a tier (D21): never added to, never reset."""

SAVE_REASON_COUNTERS: dict[int, str] = {
    1: "saves_cold",
    2: "saves_continued",
    3: "saves_evict",
    4: "saves_shutdown",
    5: "saves_finish",
}


@dataclass(frozen=True, slots=True)
class RowData:
    """What the index keeps about a row's content (from the KVC metadata)."""

    tokens: bytes  # packed u32le
    namespace: Namespace | None
    save_reason: int = 0
    hit_count: int = 0


def row_data(meta: KvcMeta | RowInfo) -> RowData:
    """The index's view of a file's (or a publish message's) metadata."""
    fingerprint = bytes(meta.fingerprint)
    return RowData(
        tokens=bytes(meta.tokens),
        namespace=(fingerprint, meta.quant, bytes(meta.ctx_hash)),
        save_reason=int(meta.save_reason),
        hit_count=meta.hit_count,
    )


@dataclass(slots=True)
class LedgerRow:
    key: bytes
    tier: str
    path: str
    size: int
    tokens: bytes
    namespace: Namespace | None
    save_reason: int
    hits: int
    last_used: int
    refcount: int = 0
    status: RowStatus = "available"
    hits_dirty: bool = False

    @property
    def n_tokens(self) -> int:
        return len(self.tokens) // 4


@dataclass(slots=True)
class Reservation:
    token: int
    holder: str
    stage: Stage
    expires: int
    tier: str
    path: str = ""


@dataclass(frozen=True, slots=True)
class DeleteFile:
    key: bytes
    path: str


@dataclass(frozen=True, slots=True)
class Resolve:
    key: bytes
    tier: str
    stage: Stage


Action = DeleteFile | Resolve


@dataclass(frozen=True, slots=True)
class Wake:
    """A parked checkout is answered: ``pin_ref`` set = hit, ``None`` = miss."""

    waiter: int
    key: bytes
    pin_ref: int | None
    row: LedgerRow | None


@dataclass(slots=True)
class Effects:
    actions: list[Action] = field(default_factory=list)
    woken: list[Wake] = field(default_factory=list)

    def merge(self, other: Effects) -> None:
        self.actions.extend(other.actions)
        self.woken.extend(other.woken)


@dataclass(frozen=True, slots=True)
class CheckoutOutcome:
    status: Literal["hit", "miss", "busy", "parked"]
    pin_ref: int | None = None
    row: LedgerRow | None = None
    waiter: int | None = None


@dataclass(frozen=True, slots=True)
class ReserveOutcome:
    """``created`` (token set), ``already_present``, ``conflict``, or ``resolve``: run
    ``effects`` (a stale reservation's cleanup) and call ``reserve`` again."""

    status: Literal["created", "already_present", "conflict", "resolve"]
    token: int = 0
    effects: Effects = field(default_factory=Effects)


@dataclass(frozen=True, slots=True)
class HitUpdate:
    key: bytes
    path: str
    hits: int


@dataclass(frozen=True, slots=True)
class TierUse:
    used: int
    budget: int
    rows: int


class Lru:
    """Lazy min-heap of (last_used, seq, key) for one tier."""

    __slots__ = ("heap", "seq", "stamp")

    def __init__(self) -> None:
        self.heap: list[tuple[int, int, bytes]] = []
        self.stamp: dict[bytes, tuple[int, int]] = {}
        self.seq = 0

    def touch(self, key: bytes, last_used: int) -> None:
        self.seq += 1
        self.stamp[key] = (last_used, self.seq)
        heapq.heappush(self.heap, (last_used, self.seq, key))
        if len(self.heap) > 2 * len(self.stamp) + 64:
            self.heap = [(lu, s, k) for k, (lu, s) in self.stamp.items()]
            heapq.heapify(self.heap)

    def discard(self, key: bytes) -> None:
        self.stamp.pop(key, None)

    def top(self) -> tuple[int, int, bytes] | None:
        """The oldest live entry (stale entries above it are dropped)."""
        while self.heap:
            lu, s, k = self.heap[0]
            if self.stamp.get(k) == (lu, s):
                return self.heap[0]
            heapq.heappop(self.heap)
        return None
