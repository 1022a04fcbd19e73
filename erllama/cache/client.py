"""MetaClient: the caller's side of the cache-meta channel (one instance per thread).

Used by workers (lookups, pins, the publish protocol), the router and the
scheduler (evictions, counters, tier stats). A DEALER connected to
``meta.sock``; every call carries a fresh request id and waits for its reply
with a deadline (poll, never a blocking recv).

A timeout closes and recreates the socket (the zguide's Lazy Pirate: a late
reply can then never be taken for the answer to a later request) and raises
``MetaUnavailable``. Callers treat that as a miss for lookups and as a dropped
save for writes, never as an error to the user. Error replies become the
``erllama.protocol.errors`` exceptions of their code (``error_for``):
``already_present`` / ``conflict`` / ``expired`` are ``ConflictError``
(aliased ``CacheConflict`` here), ``bad_request`` is ``InvalidRequestError``.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar, cast

import zmq

from erllama.cache.keys import Namespace
from erllama.cache.kvc import KvcMeta
from erllama.protocol.codec import Decoder, decode_result, encode
from erllama.protocol.errors import (
    ConflictError,
    ErrorCode,
    ProtocolError,
    TransportError,
    error_for,
)
from erllama.protocol.messages import ErrorReply, Msg, Reply, TierUsage
from erllama.protocol.meta_messages import (
    AddCounters,
    AnnounceSaved,
    CancelReservation,
    Checkin,
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
    TierName,
    TierStatsResult,
)
from erllama.protocol.meta_messages import Checkout as CheckoutMsg
from erllama.protocol.sockets import make_socket

__all__ = ["CacheConflict", "MetaClient", "MetaUnavailable", "Pin", "Row", "row_info"]

log = logging.getLogger(__name__)

T = TypeVar("T")
CacheConflict = ConflictError
_NONE = type(None)


class MetaUnavailable(TransportError):  # noqa: N818 - the name docs/INTERFACES.md fixes
    """Meta did not answer within the deadline (dead, restarting or overloaded)."""

    default_code = ErrorCode.DAEMON_UNAVAILABLE


def row_info(meta: KvcMeta) -> RowInfo:
    """The part of a file's metadata that meta indexes."""
    return RowInfo(
        fingerprint=bytes(meta.fingerprint),
        quant=meta.quant,
        ctx_hash=bytes(meta.ctx_hash),
        tokens=bytes(meta.tokens),
        save_reason=int(meta.save_reason),
        hit_count=meta.hit_count,
    )


class MetaClient:
    """A DEALER to meta with request ids and deadlines. Not thread-safe: one per thread.

    Args:
        ctx: the process's zmq context.
        endpoint: ``ipc://<run_dir>/meta.sock``.
        holder: ``f"{child_id}:{pid}"``; pins and reservations are released when the root
            reports this holder dead.
        timeout_s: the deadline of one call (a checkout's ``wait_ms`` is added to it).
    """

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        holder: str,
        *,
        timeout_s: float = 2.0,
    ) -> None:
        self._ctx = ctx
        self.endpoint = endpoint
        self.holder = holder
        self.timeout_s = timeout_s
        self._sock: zmq.Socket[bytes] | None = None
        self._ids = itertools.count(1)
        self._id_prefix = f"{os.getpid():x}.{id(self):x}."
        self._decoder: Decoder[Reply | ErrorReply] = Decoder(Reply | ErrorReply)
        self._closed = False

    # ------------------------------------------------------------ plumbing
    def _socket(self) -> zmq.Socket[bytes]:
        if self._closed:
            raise MetaUnavailable("MetaClient is closed")
        if self._sock is None:
            self._sock = make_socket(self._ctx, zmq.DEALER, connect=self.endpoint)
        return self._sock

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def _rid(self) -> str:
        return f"{self._id_prefix}{next(self._ids)}"

    def _send(self, msg: Msg) -> None:
        try:
            self._socket().send_multipart(encode(msg), flags=zmq.NOBLOCK)
        except zmq.Again:
            self._reset()
            raise MetaUnavailable("meta socket is full") from None

    def _call(self, msg: Msg, result_type: type[T], *, extra_s: float = 0.0) -> T:
        self._send(msg)
        sock = self._socket()
        deadline = time.monotonic() + self.timeout_s + extra_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(max(1, int(remaining * 1000))):
                if time.monotonic() < deadline:
                    continue
                self._reset()
                log.warning("event=meta_timeout op=%s", msg.__struct_config__.tag)
                raise MetaUnavailable(f"no answer from meta within {self.timeout_s + extra_s}s")
            try:
                reply = self._decoder.decode(sock.recv_multipart())
            except ProtocolError as exc:
                log.warning("undecodable reply from meta dropped: %s", exc)
                continue
            if isinstance(reply, ErrorReply):
                if reply.request_id not in (msg.request_id, ""):
                    continue
                raise error_for(
                    reply.code, reply.message, detail=reply.detail, remote_tb=reply.remote_traceback
                )
            if reply.request_id != msg.request_id:
                continue  # a stale reply (cannot happen after a reset; harmless)
            return decode_result(reply.result, result_type)

    def close(self) -> None:
        self._reset()
        self._closed = True

    def __enter__(self) -> MetaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ lookups and pins
    def lookup_exact(self, key: bytes) -> Row | None:
        return self._call(LookupExact(request_id=self._rid(), key=key), LookupResult).row

    def checkout(self, key: bytes, *, wait_ms: int = 0) -> Pin | None:
        """Pin ``key``. None = miss, or busy (being written) when ``wait_ms`` is 0.

        With ``wait_ms > 0`` a row still being written parks the call until it is
        published (a pin), or until the wait expires (None).
        """
        msg = CheckoutMsg(request_id=self._rid(), key=key, holder=self.holder, wait_ms=wait_ms)
        res = self._call(msg, CheckoutResult, extra_s=wait_ms / 1000)
        return res.pin

    def longest_prefix_checkout(
        self, ns: Namespace, tokens_packed: bytes, *, min_len: int = 1
    ) -> tuple[int, Pin] | None:
        """Pin the row sharing the longest common prefix (>= ``min_len``) with the tokens."""
        fp, quant, ctx_hash = ns
        msg = LongestPrefixCheckout(
            request_id=self._rid(),
            fingerprint=fp,
            quant=quant,
            ctx_hash=ctx_hash,
            tokens=tokens_packed,
            holder=self.holder,
            min_len=min_len,
        )
        res = self._call(msg, PrefixResult)
        return None if res.pin is None else (res.common_len, res.pin)

    def checkin(self, pin_ref: int) -> None:
        self._call(Checkin(request_id=self._rid(), pin_ref=pin_ref, holder=self.holder), _NONE)

    def report_corrupt(self, key: bytes, reason: str = "") -> None:
        """A load of ``key`` failed validation: meta re-checks, deletes, drops the row."""
        self._call(ReportCorrupt(request_id=self._rid(), key=key, reason=reason[:256]), _NONE)

    # ------------------------------------------------------------ publish protocol
    def reserve(self, key: bytes, tier: str) -> int:
        """Reserve ``key`` for a save. Raises CacheConflict (already_present | conflict)."""
        msg = Reserve(
            request_id=self._rid(), key=key, tier=cast(TierName, tier), holder=self.holder
        )
        return self._call(msg, ReserveResult).token

    def check_reservation(self, key: bytes, token: int) -> None:
        """Refresh the TTL. Raises CacheConflict(expired)."""
        self._call(CheckReservation(request_id=self._rid(), key=key, token=token), _NONE)

    def mark_published(self, key: bytes, token: int, path: str) -> None:
        self._call(MarkPublished(request_id=self._rid(), key=key, token=token, path=path), _NONE)

    def announce_saved(self, key: bytes, token: int, size: int, meta: KvcMeta) -> None:
        msg = AnnounceSaved(
            request_id=self._rid(), key=key, token=token, size=size, info=row_info(meta)
        )
        self._call(msg, _NONE)

    def cancel_reservation(self, key: bytes, token: int) -> None:
        self._call(CancelReservation(request_id=self._rid(), key=key, token=token), _NONE)

    def insert_available(self, key: bytes, tier: str, path: str, size: int, meta: KvcMeta) -> str:
        """Install a complete file directly; ``inserted`` or ``already_present``."""
        msg = InsertAvailable(
            request_id=self._rid(),
            key=key,
            tier=cast(TierName, tier),
            path=path,
            size=size,
            info=row_info(meta),
        )
        return self._call(msg, InsertResult).status

    # ------------------------------------------------------------ eviction and stats
    def evict_bytes(self, target: int, tiers: Sequence[str]) -> tuple[int, int]:
        msg = EvictBytes(
            request_id=self._rid(), target=target, tiers=[cast(TierName, t) for t in tiers]
        )
        res = self._call(msg, EvictResult)
        return res.evicted, res.bytes_freed

    def demote(
        self, target: int, from_tiers: Sequence[str], to_tier: str, *, timeout_s: float = 60.0
    ) -> DemoteResult:
        """Move LRU rows of ``from_tiers`` into ``to_tier`` (the reply waits for the copies)."""
        msg = Demote(
            request_id=self._rid(),
            target=target,
            from_tiers=[cast(TierName, t) for t in from_tiers],
            to_tier=cast(TierName, to_tier),
        )
        return self._call(msg, DemoteResult, extra_s=max(0.0, timeout_s - self.timeout_s))

    def gc(self) -> int:
        return self._call(Gc(request_id=self._rid()), GcResult).evicted

    def add_counters(self, deltas: Mapping[str, int]) -> None:
        """Fire and forget (no reply; a full socket drops the deltas)."""
        try:
            self._send(AddCounters(request_id=self._rid(), deltas=dict(deltas)))
        except MetaUnavailable:
            log.debug("counter deltas dropped: meta socket full")

    def counters(self) -> dict[str, int]:
        return self._call(GetMetaCounters(request_id=self._rid()), CountersResult).counters

    def reset_counters(self) -> None:
        self._call(ResetCounters(request_id=self._rid()), _NONE)

    def tier_stats(self) -> list[TierUsage]:
        return self._call(GetTierStats(request_id=self._rid()), TierStatsResult).tiers

    def call_raw(self, msg: Msg, result_type: Any = Any) -> Any:
        """Send any meta message and return its decoded result (tests, tools)."""
        return self._call(msg, result_type)
