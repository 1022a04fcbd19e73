"""The cache-meta process: the only writer of the cache index.

Sockets:
    binds     ROUTER ``ipc://<run_dir>/meta.sock`` (workers, router, scheduler: DEALERs)
    connects  DEALER ``ipc://<run_dir>/control.sock`` (identity = child id; lifecycle)

Messages in:
    meta.sock     ``protocol.meta_messages.MetaRequest`` (lookups, pins, the publish
                  protocol, eviction, counters, tier stats)
    control.sock  ``Init`` (config), ``Ping`` (answered by ``ControlLink``),
                  ``HoldersDied`` (release pins/reservations/waiters), ``Stop``
Messages out:
    meta.sock     ``Reply`` (result structs of meta_messages) or ``ErrorReply``; none
                  for ``add_counters``
    control.sock  ``Hello``, ``Ready(info={"rows": n})`` or ``StartFailed``, ``Pong``

Start (in ``lifecycle.run``, which also does the handshake and the exit): bind
meta.sock, scan every tier (ram included: it outlives a meta restart within a
daemon's life), rebuild the index, send Ready.

Loop: one thread, one ``zmq.Poller`` over meta.sock, the control socket, the
signal wakeup fd (``lifecycle.Child.watch``) and the result pipes of the demoter and
the remote tier's threads (``remote_meta``); the poll timeout is the next deadline
(reservation sweep every ``sweep_interval_s``, parked checkouts' expiry, parked
remote lookups' ``lookup_deadline_ms``, the batched hit-count flush, D33). With a
remote tier configured meta also connects to the store (two connections, on the
fetcher and uploader threads of ``remote_io``). Requests are applied in arrival
order, so the index needs no locks. Nothing a peer sends can leave the loop: bad
input gets an ``ErrorReply`` with a stable code and is counted in ``bad_requests``;
a bug gets ``internal``.

Stop: ``Stop`` on control, or SIGTERM/SIGINT (also the parent-death signal):
answer parked checkouts with a miss, flush hit counts, close, exit 0.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from erllama import lifecycle
from erllama.cache.demote import DemoteJob, Demoter
from erllama.cache.handlers import RequestHandlers, to_row
from erllama.cache.kvc import set_hit_count
from erllama.cache.ledger import Ledger
from erllama.cache.remote_meta import remote_tier
from erllama.cache.rows import DeleteFile, Effects, RowData, Wake, row_data
from erllama.cache.tiers import TierLayout, resolve_final, scan_tier
from erllama.config import CacheConfig
from erllama.inits import MetaInit
from erllama.protocol.codec import Decoder, encode, error_reply, peek_request_id, reply
from erllama.protocol.errors import ErllamaError, ErrorCode, ProtocolError
from erllama.protocol.messages import ControlMessage, HoldersDied, Msg
from erllama.protocol.meta_messages import CheckoutResult, DemoteResult, MetaRequest, Pin
from erllama.protocol.sockets import META_SOCK, ipc_endpoint, make_socket, remove_socket_file

__all__ = ["HIT_FLUSH_INTERVAL_S", "MetaServer", "main"]

log = logging.getLogger(__name__)

HIT_FLUSH_INTERVAL_S = 1.0
RECV_BATCH = 256  # requests drained per wakeup before timers get a turn
NS = 1_000_000_000


class MetaServer(RequestHandlers):
    """The index, its request handlers and its timers, without the sockets.

    ``handle(frames)`` and ``tick()`` queue replies in ``outbox`` as
    ``(identity, message, pin_ref)``; the loop sends them, and a reply that cannot be
    routed (the caller gave up) gives its pin back.
    """

    def __init__(
        self,
        cfg: CacheConfig,
        layout: TierLayout,
        *,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.cfg = cfg
        self.layout = layout
        self.clock = clock
        self.ledger = Ledger(
            layout.budgets,
            clock=clock,
            ttl_s=cfg.reservation_ttl_s,
            token_seed=(secrets.randbits(40) << 16) | 1,
        )
        self.outbox: deque[tuple[bytes, Msg, int | None]] = deque()
        self.parked: dict[int, tuple[bytes, str]] = {}
        self._decoder: Decoder[Any] = Decoder(MetaRequest)
        now = clock()
        self._next_sweep = now + int(cfg.sweep_interval_s * NS)
        self._next_flush = now + int(HIT_FLUSH_INTERVAL_S * NS)
        self._ident = b""
        self._handlers = self.handlers
        self.demoter: Demoter | None = None  # started by the first demote

    # ------------------------------------------------------------ start
    def scan(self) -> int:
        """Rebuild the index from every tier's file headers; returns the row count."""
        installed = 0
        for tier in self.layout.tiers:
            report = scan_tier(self.layout, tier)
            if report.invalid_deleted:
                self.ledger.count("corrupt_files", len(report.invalid_deleted))
            for row in report.rows:
                status, eff = self.ledger.insert_available(
                    row.key, tier, row.path, row.size, row_data(row.meta)
                )
                if status == "inserted":
                    installed += 1
                    self.apply(eff)
                else:  # the same key in an earlier tier: keep one file per key
                    log.warning("event=scan_duplicate tier=%s key=%s", tier, row.key.hex())
                    _unlink(row.path)
            log.info(
                "event=scan tier=%s rows=%d temps_deleted=%d invalid_deleted=%d renamed=%d",
                tier,
                len(report.rows),
                report.temps_deleted,
                len(report.invalid_deleted),
                report.renamed,
            )
        return installed

    # ------------------------------------------------------------ effects
    def apply(self, eff: Effects) -> None:
        """Execute the ledger's file actions (which may feed back) and answer woken waiters."""
        actions = deque(eff.actions)
        woken = list(eff.woken)
        while actions:
            action = actions.popleft()
            if isinstance(action, DeleteFile):
                _unlink(action.path)
                continue
            res = self.resolve(action.key, action.tier)
            more = self.ledger.resolved(action.key, res)
            actions.extend(more.actions)
            woken.extend(more.woken)
        for wake in woken:
            self._answer_wake(wake)

    def resolve(self, key: bytes, tier: str) -> tuple[str, str, int, RowData] | None:
        """Stage cleanup of an abandoned reservation: adopt a valid final file, else none."""
        res = resolve_final(self.layout, tier, key)
        if res.invalid is not None:
            self.ledger.count("corrupt_files")
        log.info(
            "event=reservation_resolved key=%s tier=%s adopted=%s temps_deleted=%d invalid=%s",
            key.hex()[:16],
            tier,
            res.meta is not None,
            res.temps_deleted,
            res.invalid,
        )
        if res.meta is None:
            return None
        return tier, res.path, res.size, row_data(res.meta)

    def _answer_wake(self, wake: Wake) -> None:
        parked = self.parked.pop(wake.waiter, None)
        if parked is None:
            if wake.pin_ref is not None:
                self.ledger.checkin(wake.pin_ref)
            return
        ident, rid = parked
        if wake.pin_ref is None or wake.row is None:
            self.outbox.append((ident, reply(rid, CheckoutResult(status="miss")), None))
            return
        pin = Pin(pin_ref=wake.pin_ref, row=to_row(wake.row))
        self.outbox.append((ident, reply(rid, CheckoutResult(status="hit", pin=pin)), wake.pin_ref))

    # ------------------------------------------------------------ requests
    def handle(self, frames: list[bytes]) -> None:
        """One request from meta.sock: ``[identity, PROTOCOL_ID, body, ...]``."""
        if len(frames) < 2:
            self.ledger.count("bad_requests")
            return  # nothing to route a reply to
        ident = frames[0]
        rid = peek_request_id(frames[2]) if len(frames) > 2 else ""
        try:
            msg = self._decoder.decode(frames[1:])
        except ProtocolError as exc:
            self.ledger.count("bad_requests")
            code = exc.code
            if code == ErrorCode.MALFORMED and "length <=" in exc.message:
                code = ErrorCode.TOO_LARGE  # a bounded field over its limit
            log.warning("event=bad_request code=%s %s", code, exc.message)
            self.outbox.append((ident, error_reply(rid, code, exc.message), None))
            return
        self._ident = ident
        handler = self._handlers.get(type(msg))
        try:
            if handler is None:  # pragma: no cover - every union member has a handler
                raise ErllamaError(f"no handler for {type(msg).__name__}", code="not_supported")
            out = handler(msg)
        except ErllamaError as exc:
            if exc.code in _BAD_CODES:
                self.ledger.count("bad_requests")
                log.warning("event=bad_request op=%s %s", type(msg).__name__, exc)
            self.outbox.append(
                (ident, error_reply(msg.request_id, exc.code, exc.message, detail=exc.detail), None)
            )
            return
        except Exception as exc:  # a bug: answer it, keep serving
            self.ledger.count("internal_errors")
            log.exception("event=internal_error op=%s", type(msg).__name__)
            self.outbox.append(
                (
                    ident,
                    error_reply(
                        msg.request_id,
                        ErrorCode.INTERNAL,
                        repr(exc),
                        remote_traceback=traceback.format_exc(),
                    ),
                    None,
                )
            )
            return
        if out is not None:
            body, pin_ref = out
            self.outbox.append((ident, reply(msg.request_id, body), pin_ref))

    def park(self, waiter: int, request_id: str) -> None:
        self.parked[waiter] = (self._ident, request_id)

    # ------------------------------------------------------------ demotion
    def submit_demote(self, job: DemoteJob) -> None:
        if self.demoter is None:
            self.demoter = Demoter(self.layout)
        self.demoter.submit(job)

    def finish_demotes(self) -> int:
        """Re-point the rows of every finished demote job and queue its reply."""
        if self.demoter is None:
            return 0
        jobs = self.demoter.take_done()
        for job in jobs:
            demoted = evicted = freed = 0
            for v in job.victims:
                new_path = job.copied.get(v.key)
                if new_path is None:
                    size, eff = self.ledger.demote_failed(v.key)
                    if size:
                        evicted += 1
                        freed += size
                else:
                    status, eff = self.ledger.demote_done(v.key, job.to_tier, new_path)
                    if status == "demoted":
                        demoted += 1
                        freed += v.size
                self.apply(eff)
            from_tiers = ",".join(sorted({v.tier for v in job.victims}))
            log.info(
                "event=demote from=%s to=%s rows=%d evicted=%d bytes=%d",
                from_tiers, job.to_tier, demoted, evicted, freed,
            )  # fmt: skip
            result = DemoteResult(demoted=demoted, evicted=evicted, bytes_freed=freed)
            self.outbox.append((job.ident, reply(job.request_id, result), None))
        return len(jobs)

    # ------------------------------------------------------------ control
    def holders_died(self, holders: list[str]) -> None:
        for holder in holders:
            log.info("event=holder_died holder=%s", holder)
            self.apply(self.ledger.release_holder(holder))

    def shutdown(self) -> None:
        for wake in self.ledger.drop_all_waiters():
            self._answer_wake(wake)
        self.stop_remote()
        if self.demoter is not None:
            self.demoter.stop()
            self.finish_demotes()
            self.demoter.close()
        self.flush_hits()

    # ------------------------------------------------------------ timers
    def flush_hits(self) -> int:
        """Persist changed hit counts into file headers (D33: batched, off the request path)."""
        updates = self.ledger.take_dirty_hits()
        for u in updates:
            set_hit_count(u.path, u.hits)
        return len(updates)

    def tick(self) -> None:
        now = self.clock()
        for wake in self.ledger.expire_waiters():
            self._answer_wake(wake)
        self.expire_remote()
        if now >= self._next_sweep:
            self._next_sweep = now + int(self.cfg.sweep_interval_s * NS)
            self.apply(self.ledger.sweep())
        if now >= self._next_flush:
            self._next_flush = now + int(HIT_FLUSH_INTERVAL_S * NS)
            self.flush_hits()

    def timeout_ms(self) -> int:
        """Milliseconds until the next timer (the poll timeout)."""
        deadlines = [self._next_sweep]
        if self.ledger.has_dirty_hits():
            deadlines.append(self._next_flush)
        waiter = self.ledger.next_waiter_deadline()
        if waiter is not None:
            deadlines.append(waiter)
        remote = self.remote_deadline()
        if remote is not None:
            deadlines.append(remote)
        return max(0, (min(deadlines) - self.clock() + 999_999) // 1_000_000)

    # ------------------------------------------------------------ the loop
    def send_outbox(self, sock: zmq.Socket[bytes]) -> None:
        while self.outbox:
            ident, msg, pin_ref = self.outbox.popleft()
            try:
                sock.send_multipart([ident, *encode(msg)], flags=zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                # the caller is gone (timed out, died): give back what the reply carried
                log.info("event=reply_unroutable reason=%s", exc)
                if pin_ref is not None:
                    self.ledger.checkin(pin_ref)

    def _on_control(self, msg: ControlMessage) -> None:
        if isinstance(msg, HoldersDied):
            self.holders_died(list(msg.holders))
        else:
            log.warning("unexpected control message %s", type(msg).__name__)

    def serve(self, sock: zmq.Socket[bytes], child: lifecycle.Child) -> int:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        child.watch(poller)
        demote_fd: int | None = None
        remote_fd = None if self.remote is None else self.remote.fd
        if remote_fd is not None:
            poller.register(remote_fd, zmq.POLLIN)
        while True:
            if demote_fd is None and self.demoter is not None:
                demote_fd = self.demoter.fd
                poller.register(demote_fd, zmq.POLLIN)
            events = dict(poller.poll(self.timeout_ms()))
            if demote_fd is not None and events.get(demote_fd):
                self.finish_demotes()
            if remote_fd is not None and events.get(remote_fd):
                self.finish_remote()
            if child.should_stop(events, self._on_control):
                return 0
            if events.get(sock):
                for _ in range(RECV_BATCH):
                    try:
                        frames = sock.recv_multipart(flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.handle(frames)
                    self.send_outbox(sock)
            self.tick()
            self.send_outbox(sock)


_BAD_CODES = frozenset(
    {ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE, ErrorCode.MALFORMED, ErrorCode.INVALID_TOKEN}
)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("event=unlink_failed path=%s reason=%s", path, exc)


def main(run_dir: str, child_id: str) -> int:
    """Entry point of the meta child (``python -m erllama.cache RUN_DIR CHILD_ID``)."""
    return lifecycle.run("meta", run_dir, child_id, MetaInit, _start)


def _start(child: lifecycle.Child, init: MetaInit) -> lifecycle.Started:
    """Bind meta.sock and rebuild the index from the tiers."""
    try:
        layout = TierLayout(init.cache.tiers, init.daemon_id)
        layout.ensure()
    except (ValueError, OSError) as exc:
        raise child.bad_config(exc) from None
    sock_path = os.path.join(child.run_dir, META_SOCK)
    sock = make_socket(child.ctx, zmq.ROUTER, bind=ipc_endpoint(child.run_dir, META_SOCK))
    child.on_exit(remove_socket_file, sock_path, os.stat(sock_path).st_ino)
    child.on_exit(sock.close, 100)
    server = MetaServer(init.cache, layout)
    rows = server.scan()
    remote = remote_tier(init.cache)
    if remote is not None:
        try:
            server.start_remote(remote)
        except ImportError as exc:  # redis-py is a dependency; a broken install says so
            raise child.bad_config(exc) from None
        child.on_exit(server.stop_remote)
    log.info("event=ready rows=%d tiers=%s", rows, ",".join(layout.tiers))

    def loop() -> int:
        code = server.serve(sock, child)
        server.shutdown()
        server.send_outbox(sock)
        return code

    return lifecycle.Started(loop, {"rows": rows, "pid": os.getpid()})
