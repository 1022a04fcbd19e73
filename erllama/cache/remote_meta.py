"""Meta's side of the shared remote tier: park a prefix lookup, install what comes back, count.

Mixed into ``meta.MetaServer`` (which owns the outbox, the ledger and the loop). The
network and the files are ``remote_io.RemoteIO``'s threads; the decisions are
``remote``'s pure functions; this module joins them to the index:

::

    worker --longest_prefix_checkout--> meta: local trie (lookup_plan: exact keys + pointers)
        | local row covers the prompt, or no remote row could beat it: answer now
        | store marked down (Breaker): answer now, count remote_skipped
        v
    park (waiter, deadline = lookup_deadline_ms) --LookupJob--> fetcher thread
                                                                  | probe, fetch, verify,
                                                                  | place in the ram tier
    meta <--LookupDone (pipe)------------------------------------+
        insert_available(ram) -> the fetched row is a normal ram row
        answer the parked request from the local trie (now holding the row), pin and all
    deadline first: answer from the local trie, count remote_late; the row installs later

    announce_saved / insert_available (a worker's publish) --Upload--> uploader thread

The store down, slow or restarted is a miss, never an error: every failure is
counted (``remote_*``) and logged once per change of state (``event=remote_down``,
``event=remote_up``), and the breaker lets one lookup through per back-off to see it
come back.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from erllama.cache.keys import KvcError, PrefixHasher
from erllama.cache.ledger import Ledger
from erllama.cache.remote import (
    Breaker,
    LookupDone,
    LookupJob,
    Probe,
    Upload,
    UploadDone,
    lookup_plan,
)
from erllama.cache.rows import Effects, row_data
from erllama.cache.tiers import TierLayout
from erllama.config import CacheConfig, TierConfig
from erllama.protocol.codec import reply
from erllama.protocol.messages import Msg, TierUsage
from erllama.protocol.meta_messages import LongestPrefixCheckout

if TYPE_CHECKING:
    from erllama.cache.remote_io import RemoteIO

log = logging.getLogger(__name__)

NS = 1_000_000_000


def remote_tier(cfg: CacheConfig) -> TierConfig | None:
    """The configured remote tier, if any."""
    return next((t for t in cfg.tiers if t.name == "remote"), None)


class RemoteMeta:
    """The remote tier's state in meta (see the module docstring)."""

    cfg: CacheConfig
    ledger: Ledger
    layout: TierLayout
    clock: Callable[[], int]
    outbox: deque[tuple[bytes, Msg, int | None]]
    _ident: bytes
    remote: RemoteIO | None = None

    def apply(self, eff: Effects) -> None:  # pragma: no cover - provided by MetaServer
        raise NotImplementedError

    def local_prefix(self, m: LongestPrefixCheckout) -> tuple[Any, int | None]:  # pragma: no cover
        raise NotImplementedError  # handlers.RequestHandlers

    # ------------------------------------------------------------ start / stop
    def start_remote(self, tier: TierConfig) -> None:
        """Start the threads (they connect lazily: a store that is down is not an error)."""
        # imported here: the redis client is needed only by a daemon with a remote tier
        from erllama.cache.remote_io import RemoteIO

        promote = "ram" if "ram" in self.layout.budgets else self.layout.tiers[0]
        self.remote_cfg = tier
        self.remote = RemoteIO(tier, self.layout, promote)
        self._breaker = Breaker()
        self._waiting: dict[int, tuple[bytes, LongestPrefixCheckout, int]] = {}
        self._next_waiter = 1
        p = self.cfg.policy
        self._aligns = (p.boundary_align_tokens, p.continued_interval)
        log.info("event=remote_tier url=%s promote_to=%s", self.remote.url, promote)

    def stop_remote(self) -> None:
        """Answer every parked lookup from the local index, then stop the threads."""
        if self.remote is None:
            return
        for waiter in list(self._waiting):
            self._answer(waiter)
        self.remote.close()
        self.remote = None

    # ------------------------------------------------------------ lookups
    def remote_lookup(self, m: LongestPrefixCheckout) -> bool:
        """Park ``m`` on a remote lookup when a remote row could beat the local index."""
        if self.remote is None:
            return False
        ns = (m.fingerprint, m.quant, m.ctx_hash)
        local = self.ledger.longest_prefix_len(ns, m.tokens)
        plan = lookup_plan(
            len(m.tokens) // 4, local, m.min_len, self._aligns, self.remote_cfg.max_probe_keys
        )
        if not plan:
            return False
        if not self._breaker.allow(self.clock() / NS):
            self.ledger.count("remote_skipped")
            return False
        try:
            keys = PrefixHasher(*ns).keys_at_packed(m.tokens, [n for n, _ in plan])
        except KvcError:
            return False
        if self._breaker.down:  # one trial per back-off, not a herd
            self._breaker.failed(self.clock() / NS)
        waiter = self._next_waiter
        self._next_waiter += 1
        deadline_s = self.remote_cfg.lookup_deadline_ms / 1000
        self._waiting[waiter] = (self._ident, m, self.clock() + int(deadline_s * NS))
        probes = [Probe(keys[n], n, pointer) for n, pointer in plan]
        self.remote.lookup(LookupJob(waiter, probes, time.monotonic() + deadline_s))
        self.ledger.count("remote_probes")
        return True

    def _answer(self, waiter: int) -> None:
        entry = self._waiting.pop(waiter, None)
        if entry is None:
            return
        ident, m, _ = entry
        result, pin_ref = self.local_prefix(m)
        self.outbox.append((ident, reply(m.request_id, result), pin_ref))

    def expire_remote(self) -> None:
        """Answer the lookups past their deadline from the local index."""
        if self.remote is None or not self._waiting:
            return
        now = self.clock()
        for waiter in [w for w, (_, _, d) in self._waiting.items() if d <= now]:
            self.ledger.count("remote_late")
            self._answer(waiter)

    def remote_deadline(self) -> int | None:
        if self.remote is None or not self._waiting:
            return None
        return min(d for _, _, d in self._waiting.values())

    # ------------------------------------------------------------ results
    def finish_remote(self) -> int:
        """Apply every result the threads handed back."""
        if self.remote is None:
            return 0
        done = self.remote.take_done()
        for d in done:
            if isinstance(d, LookupDone):
                self._lookup_done(d)
            else:
                self._upload_done(d)
        return len(done)

    def _store_state(self, error: str, ok: bool) -> None:
        if error:
            self.ledger.count("remote_errors")
            if self._breaker.failed(self.clock() / NS):
                log.warning("event=remote_down url=%s reason=%s", self.remote_url, error)
        elif ok and self._breaker.ok():
            self.ledger.count("remote_reconnects")
            log.info("event=remote_up url=%s", self.remote_url)

    @property
    def remote_url(self) -> str:
        return "" if self.remote is None else self.remote.url

    def _lookup_done(self, d: LookupDone) -> None:
        self.ledger.count("remote_fetch_ns", d.fetch_ns)
        self.ledger.count("remote_bytes_down", d.bytes_down)
        for key, code in d.dropped:
            if code != "missing_chunk":  # evicted chunks are the store's policy, not damage
                self.ledger.count("remote_corrupt")
            log.warning("event=remote_row_dropped key=%s reason=%s", key.hex()[:16], code)
        if d.stale_pointers:
            self.ledger.count("remote_pointers_stale", d.stale_pointers)
        self._store_state(d.error, ok=True)
        if d.key is not None and d.meta is not None:
            tier = self.remote.promote_tier if self.remote is not None else "ram"
            status, eff = self.ledger.insert_available(
                d.key, tier, d.path, d.size, row_data(d.meta)
            )
            self.apply(eff)
            self.ledger.count("remote_hits")
            if d.pointer:
                self.ledger.count("remote_pointer_hits")
            log.info(
                "event=remote_hit key=%s tokens=%d bytes=%d ms=%.1f status=%s pointer=%s",
                d.key.hex()[:16], d.meta.n_tokens, d.size, d.fetch_ns / 1e6, status, d.pointer,
            )  # fmt: skip
        elif not d.error:
            self.ledger.count("remote_misses")
        self._answer(d.waiter)

    def _upload_done(self, d: UploadDone) -> None:
        if d.state == "down":
            self.ledger.count("remote_errors")
            log.warning("event=remote_down url=%s reason=%s (uploads)", self.remote_url, d.error)
        elif d.state == "up":
            self.ledger.count("remote_reconnects")
            log.info("event=remote_up url=%s (uploads)", self.remote_url)
        elif d.error:
            self.ledger.count("remote_errors")
        if d.status == "uploaded":
            self.ledger.count("remote_uploads")
            self.ledger.count("remote_bytes_up", d.bytes_up)
        elif d.status == "present":
            self.ledger.count("remote_uploads_present")
        elif d.status == "dropped":
            self.ledger.count("remote_uploads_dropped")

    # ------------------------------------------------------------ write-behind
    def remote_publish(self, key: bytes, path: str, size: int) -> None:
        """A local row was published: queue its copy to the store (never blocks)."""
        if self.remote is None:
            return
        dropped = self.remote.upload(Upload(key, path, size))
        if dropped:
            self.ledger.count("remote_uploads_dropped", dropped)

    def remote_usage(self) -> list[TierUsage]:
        """The remote tier's line in ``tier_stats`` (the store's memory, rows we uploaded)."""
        if self.remote is None:
            return []
        counters = self.ledger.counters()
        return [
            TierUsage(
                name="remote",
                path=self.remote.url,
                used_bytes=self.remote.used_bytes,
                budget_bytes=self.remote.max_bytes,
                rows=counters["remote_uploads"],
            )
        ]
