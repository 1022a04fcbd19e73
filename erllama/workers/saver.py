"""The worker's asynchronous save writer: a thread that publishes snapshots (REFERENCE §7.3 R, D3).

The compute thread takes a snapshot of the sequence state at a token
boundary (milliseconds, no I/O) and ``submit``s it here; generation never
waits for the disk. One writer thread runs the publish protocol
(``cache.tiers.publish``: reserve, temp file, fdatasync, link, announce)
with its own ``MetaClient`` (sockets belong to one thread).

The queue is bounded in bytes (``cache.writer_queue_bytes``, the in-flight
job included, since its buffer is still held). On overflow the oldest queued
**continued** save is dropped first (it is the cheapest to lose: the next
frontier or the finish save supersedes it); if the new job still does not
fit it is refused. ``SubmitResult`` tells the caller how many saves were
dropped so it can count ``saves_dropped``; a save dropped later by the
publish protocol itself (meta down, I/O error) is counted by the writer.

Evict and shutdown saves wait on ``SaveJob.done`` (bounded), the others are
fire and forget; ``flush`` waits for the queue to drain (graceful stop).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import zmq

from erllama.cache.kvc import KvcMeta, SaveReason

if TYPE_CHECKING:
    from erllama.cache.client import MetaClient
    from erllama.cache.tiers import TierLayout

log = logging.getLogger(__name__)

BREAKER_MIN_S = 1.0
BREAKER_MAX_S = 30.0
_META_DOWN_REASONS = frozenset({"daemon_unavailable", "meta_unavailable", "timeout"})


@dataclass(eq=False)
class SaveJob:
    """One snapshot to publish. ``status``: queued, fired, already_present or dropped."""

    key: bytes
    meta: KvcMeta
    payload: bytes | bytearray | memoryview
    done: threading.Event = field(default_factory=threading.Event)
    status: str = "queued"
    detail: str = ""

    @property
    def reason(self) -> SaveReason:
        return self.meta.save_reason

    @property
    def size(self) -> int:
        return memoryview(self.payload).nbytes

    @property
    def landed(self) -> bool:
        """Fired or already present (both count as fired for the save policy)."""
        return self.status in ("fired", "already_present")


@dataclass(frozen=True, slots=True)
class SubmitResult:
    """``accepted``: the job is queued; ``dropped``: saves lost by this submit (evicted
    queued continued saves, plus the job itself when refused)."""

    accepted: bool
    dropped: int = 0


class Writer(Protocol):
    """What the writer thread runs jobs through (built inside that thread)."""

    def write(self, job: SaveJob) -> tuple[str, str]:
        """Publish ``job``: ``(status, reason)``, status in fired/already_present/dropped."""
        ...

    def add_counters(self, deltas: Mapping[str, int]) -> None: ...

    def close(self) -> None: ...


class MetaBreaker:
    """After meta fails to answer, treat it as down for a while (1 s doubling to 30 s).

    A dead or restarting meta would otherwise cost a full timeout per lookup or
    save; with the breaker open they miss (or drop) at once.
    """

    def __init__(self, what: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._what = what
        self._clock = clock
        self._until = 0.0
        self._backoff = 0.0

    def is_open(self) -> bool:
        return self._clock() < self._until

    def failed(self, why: object) -> None:
        self._backoff = min(max(2 * self._backoff, BREAKER_MIN_S), BREAKER_MAX_S)
        self._until = self._clock() + self._backoff
        log.warning(
            "event=meta_unavailable for=%s backoff_s=%.0f: %s", self._what, self._backoff, why
        )

    def ok(self) -> None:
        if self._backoff:
            log.info("event=meta_available for=%s", self._what)
        self._backoff = 0.0


class PublishWriter:
    """``Writer`` over ``tiers.publish`` with this thread's own ``MetaClient``."""

    def __init__(self, meta: MetaClient, layout: TierLayout, tier: str, writer_id: str) -> None:
        self._meta = meta
        self._layout = layout
        self._tier = tier
        self._writer_id = writer_id
        self._breaker = MetaBreaker("saves")

    def write(self, job: SaveJob) -> tuple[str, str]:
        from erllama.cache.tiers import publish

        if self._breaker.is_open():
            return "dropped", "meta_down"
        out = publish(
            self._meta, self._layout, self._tier, job.meta, job.payload, writer_id=self._writer_id
        )
        if out.status == "dropped" and out.reason in _META_DOWN_REASONS:
            self._breaker.failed(out.reason)
        else:
            self._breaker.ok()
        return out.status, out.reason

    def add_counters(self, deltas: Mapping[str, int]) -> None:
        self._meta.add_counters(deltas)

    def close(self) -> None:
        self._meta.close()


def publish_writer_factory(
    ctx: zmq.Context[zmq.Socket[bytes]],
    meta_endpoint: str,
    holder: str,
    layout: TierLayout,
    tier: str,
    *,
    timeout_s: float = 5.0,
) -> Callable[[], Writer]:
    """A factory the writer thread calls to build its ``PublishWriter`` (and its socket)."""

    def make() -> Writer:
        from erllama.cache.client import MetaClient

        meta = MetaClient(ctx, meta_endpoint, holder, timeout_s=timeout_s)
        return PublishWriter(meta, layout, tier, holder)

    return make


class Saver:
    """The bounded save queue and its writer thread.

    Args:
        make_writer: called once inside the writer thread.
        queue_bytes: the byte bound of queued + in-flight payloads.
        on_done: called (in the writer thread) after each job ends, dropped ones included.
    """

    def __init__(
        self,
        make_writer: Callable[[], Writer],
        *,
        queue_bytes: int,
        on_done: Callable[[SaveJob], None] | None = None,
    ) -> None:
        self._make_writer = make_writer
        self._limit = max(0, queue_bytes)
        self._on_done = on_done
        self._cond = threading.Condition()
        self._queue: deque[SaveJob] = deque()
        self._inflight: SaveJob | None = None
        self._bytes = 0
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="erllama-saver", daemon=True)
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    @property
    def alive(self) -> bool:
        """The writer thread still runs (after ``close``: a write outlived its timeout)."""
        return self._thread.is_alive()

    @property
    def queued_bytes(self) -> int:
        with self._cond:
            return self._bytes

    def submit(self, job: SaveJob) -> SubmitResult:
        """Queue ``job`` without blocking (see the module docstring for overflow)."""
        size = job.size
        evicted: list[SaveJob] = []
        with self._cond:
            if self._closing or size > self._limit:
                accepted = False
            else:
                while self._bytes + size > self._limit:
                    victim = next(
                        (j for j in self._queue if j.reason == SaveReason.CONTINUED), None
                    )
                    if victim is None:
                        break
                    self._queue.remove(victim)
                    self._bytes -= victim.size
                    evicted.append(victim)
                accepted = self._bytes + size <= self._limit
                if accepted:
                    self._queue.append(job)
                    self._bytes += size
                    self._cond.notify_all()
        for victim in evicted:
            log.info("event=save_dropped reason=queue_full key=%s", victim.key.hex()[:16])
            self._finish(victim, "dropped", "queue_full")
        if not accepted:
            log.info(
                "event=save_refused reason=queue_full key=%s size=%d", job.key.hex()[:16], size
            )
            job.status, job.detail = "dropped", "refused"
            job.done.set()
        return SubmitResult(accepted, len(evicted) + (0 if accepted else 1))

    def flush(self, timeout_s: float) -> bool:
        """Wait until nothing is queued or in flight; False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not self._queue and self._inflight is None, timeout=max(0.0, timeout_s)
            )

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (up to ``timeout_s``), then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._started:
            self._thread.join(max(0.0, timeout_s))
        with self._cond:
            abandoned = list(self._queue)
            self._queue.clear()
            self._bytes -= sum(j.size for j in abandoned)
        for job in abandoned:
            self._finish(job, "dropped", "closed")

    def _finish(self, job: SaveJob, status: str, detail: str) -> None:
        job.status, job.detail = status, detail
        # the payload is no longer needed: let its memory go before anyone waits on us
        job.payload = b""
        job.done.set()
        if self._on_done is not None:
            try:
                self._on_done(job)
            except Exception:
                log.exception("save callback failed")

    def _run(self) -> None:
        try:
            writer = self._make_writer()
        except Exception:
            log.exception("event=saver_failed: cannot build the writer; every save is dropped")
            writer = None
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: bool(self._queue) or self._closing)
                    if not self._queue:
                        return
                    job = self._inflight = self._queue.popleft()
                status, detail = "dropped", "no_writer"
                if writer is not None:
                    try:
                        status, detail = writer.write(job)
                    except Exception as exc:  # never let one bad save kill the writer
                        log.exception("save of %s failed", job.key.hex()[:16])
                        status, detail = "dropped", type(exc).__name__
                if status == "dropped" and writer is not None:
                    writer.add_counters({"saves_dropped": 1})
                log.debug(
                    "event=save_done key=%s reason=%s status=%s detail=%s",
                    job.key.hex()[:16],
                    job.reason.name.lower(),
                    status,
                    detail,
                )
                size = job.size
                self._finish(job, status, detail)
                with self._cond:
                    self._bytes -= size
                    self._inflight = None
                    self._cond.notify_all()
        finally:
            if writer is not None:
                writer.close()
