"""The router process: the daemon's front door, between clients, workers, meta and root.

Sockets:
    binds     ROUTER ``client.sock`` (the endpoint; clients' DEALERs, auto identities)
    binds     ROUTER ``workers.sock`` (workers' DEALERs, identity = model id)
    connects  DEALER ``control.sock`` (identity ``router``; handshake, tree ops, root events)
    connects  DEALER ``meta.sock`` (counters and tier stats)
    connects  DEALER ``scheduler.sock`` (``SCHEDULER_OPS``: ``schedlink.SchedulerLink``)

Messages in / out:
    client  ``[client_id, ERL1, ClientRequest]`` ->
            tree ops (LoadModel, Unload) -> root as ``[client_id, ERL1, body]``;
            status queries (list_models, model_info, status_row, queue_depth,
            daemon_status) answered from the table; counters -> meta;
            scheduler ops and vram_info -> the scheduler (own request ids);
            worker ops -> ``[model_id, client_id, ERL1, body]`` (body untouched),
            or held while the model loads/restarts/sleeps; sleep_model (sleep.py).
    worker  ``[model_id, client_id, ERL1, reply]`` -> ``[client_id, ERL1, reply]``;
            ``[model_id, b"", ERL1, WorkerStatus]`` updates the table.
    root    ``[ERL1, ModelStateChanged | WorkerExited | Ping | Stop]`` (control) and
            ``[client_id, ERL1, reply]`` (tree-op replies, forwarded to the client);
            the router sends it ``[ERL1, SleepWorker | WakeWorker]`` (keep_alive, sleep.py).

Bad, oversized or wrong-version client input is answered with an
``ErrorReply`` carrying its code and counted; it never stops the loop. A
reply to a client that has gone (``EHOSTUNREACH`` under ``ROUTER_MANDATORY``)
is dropped, and a stream of a gone client is cancelled at its worker.

Stop: ``Stop`` on control, or SIGTERM/SIGINT (also the parent-death signal):
every request still known is answered ``shutting_down``; sockets close; exit 0.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq

from erllama import lifecycle
from erllama.inits import RouterInit
from erllama.protocol.auth import TcpListener, bind_tcp
from erllama.protocol.codec import PROTOCOL_ID, Decoder, encode, error_reply, peek_request_id, reply
from erllama.protocol.errors import ErllamaError, ErrorCode, ProtocolError
from erllama.protocol.messages import (
    SCHEDULER_OPS,
    TREE_OPS,
    WORKER_OPS,
    Cancel,
    ClientRequest,
    Complete,
    DaemonStatus,
    ErrorReply,
    GetCounters,
    GetDaemonStatus,
    GetModelInfo,
    GetStatusRow,
    ListModels,
    ModelStateChanged,
    Msg,
    QueueDepth,
    Reply,
    SleepModel,
    Stop,
    TierUsage,
    WorkerExited,
    WorkerPush,
)
from erllama.protocol.meta_messages import (
    CountersResult,
    GetMetaCounters,
    GetTierStats,
    TierStatsResult,
)
from erllama.protocol.sockets import (
    META_SOCK,
    WORKERS_SOCK,
    ipc_endpoint,
    make_socket,
    remove_socket_file,
)
from erllama.router.schedlink import SchedulerLink
from erllama.router.sleep import Sleeper
from erllama.router.table import Admit, Failure, ModelTable, Pending

log = logging.getLogger(__name__)

RECV_BATCH = 256
META_TIMEOUT_S = 2.0
STATUS_META_TIMEOUT_S = 0.5
ROUTE_RETRY_S = 0.02  # a worker not yet (re)connected to workers.sock: resend this often
TERMINAL_TAGS = frozenset({"ok", "error", "done"})


class _Head(msgspec.Struct):
    """Just enough of a reply to route it: its tag and request id."""

    t: str = ""
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class _MetaCall:
    kind: str  # "counters" | "daemon_status"
    client_id: bytes
    request_id: str
    deadline: float


class Router:
    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        run_dir: str,
        link: lifecycle.ControlLink,
        init: RouterInit,
    ) -> None:
        self.ctx = ctx
        self.run_dir = run_dir
        self.link = link
        self.endpoint = init.endpoint or ipc_endpoint(run_dir, "client.sock")
        self.table = ModelTable()
        self.table.load(init.models)
        self.counters = {"router_requests": 0, "router_bad_requests": 0, "router_unroutable": 0}
        self._req_decoder: Decoder[Any] = Decoder(ClientRequest)
        self._push_decoder: Decoder[Any] = Decoder(WorkerPush)
        self._meta_decoder: Decoder[Reply | ErrorReply] = Decoder(Reply | ErrorReply)
        self._head = msgspec.msgpack.Decoder(_Head)
        self._meta_calls: dict[str, _MetaCall] = {}
        self._meta_seq = 0
        self._stopping = False
        self._route_retry_at = 0.0
        self.client = make_socket(ctx, zmq.ROUTER, bind=self.endpoint)
        # DESIGN §2: an opt-in TCP endpoint on the same socket, CURVE unless insecure loopback
        self.tcp: TcpListener | None = None
        daemon_cfg = init.daemon
        if daemon_cfg.tcp_endpoint:
            try:
                self.tcp = bind_tcp(ctx, self.client, daemon_cfg)
            except BaseException:
                self.client.close(linger=0)
                raise
        self.workers = make_socket(ctx, zmq.ROUTER, bind=ipc_endpoint(run_dir, WORKERS_SOCK))
        self._bound_files = [
            _socket_file(self.endpoint),
            _socket_file(ipc_endpoint(run_dir, WORKERS_SOCK)),
        ]
        self.meta = make_socket(
            ctx, zmq.DEALER, connect=ipc_endpoint(run_dir, META_SOCK), linger_ms=0
        )
        self.sched = SchedulerLink(ctx, run_dir)
        self.sleeper = Sleeper(self.table, link.socket, self.meta)
        self.routed = 0

    # ================================================================ loop
    def run(self, wake_fd: int) -> int:
        """The loop, until ``Stop`` on control or ``wake_fd`` (SIGTERM/SIGINT) is readable."""
        poller = zmq.Poller()
        for sock in (self.client, self.workers, self.link.socket, self.meta, self.sched.sock):
            poller.register(sock, zmq.POLLIN)
        poller.register(wake_fd, zmq.POLLIN)
        try:
            while not self._stopping:
                now = time.monotonic()
                deadline = min(
                    min((c.deadline for c in self._meta_calls.values()), default=math.inf),
                    self.sched.next_deadline(now),
                )
                if self.table.waiting_for_route():
                    deadline = min(deadline, self._route_retry_at)
                deadline = min(deadline, self.sleeper.next_deadline())
                timeout = (
                    None if deadline == math.inf else max(0, math.ceil((deadline - now) * 1e3))
                )
                ready = dict(poller.poll(timeout))
                if wake_fd in ready:
                    self._stopping = True
                    break
                if self.link.socket in ready:
                    self._drain(self.link.socket, self._on_control)
                if self.workers in ready:
                    self._drain(self.workers, self._on_worker)
                if self.client in ready:
                    self._drain(self.client, self._on_client)
                if self.meta in ready:
                    self._drain(self.meta, self._on_meta)
                if self.sched.sock in ready:
                    self._drain(self.sched.sock, self._on_scheduler)
                now = time.monotonic()
                self._expire_meta_calls(now)
                for client_id, msg in self.sched.expire(now):
                    self._send_client(client_id, msg)
                if now >= self._route_retry_at and self.table.waiting_for_route():
                    for model, pending in self.table.retry_routes().items():
                        self._flush(model, pending)
                self.sleeper.tick(now)
            return 0
        finally:
            self._close()

    def _drain(self, sock: zmq.Socket[bytes], handler: Any) -> None:
        for _ in range(RECV_BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                handler(frames)
            except Exception:
                log.exception("router handler failed (message dropped)")

    def _close(self) -> None:
        for f in self.table.drain_all(ErrorCode.SHUTTING_DOWN, "the daemon is stopping"):
            self._fail(f)
        for call in self._meta_calls.values():
            self._send_client(
                call.client_id, error_reply(call.request_id, ErrorCode.SHUTTING_DOWN, "stopping")
            )
        for client_id, msg in self.sched.drain_all(ErrorCode.SHUTTING_DOWN, "stopping"):
            self._send_client(client_id, msg)
        for sock in (self.client, self.workers):
            sock.close(linger=500)
        self.meta.close(linger=0)
        self.sched.close()
        if self.tcp is not None:
            self.tcp.stop()
        for path, ino in self._bound_files:
            remove_socket_file(path, ino)

    # ================================================================ control (root)
    def _on_control(self, frames: list[bytes]) -> None:
        if frames and frames[0] != PROTOCOL_ID and len(frames) >= 3:
            # a tree-op reply: [client_id, ERL1, reply]
            self._send_frames(self.client, frames)
            return
        msg = self.link.handle(frames)
        if isinstance(msg, ModelStateChanged):
            flush, fails = self.table.on_state(msg)
            for f in fails:
                self._fail(f)
            self._flush(msg.model, flush)
        elif isinstance(msg, WorkerExited):
            log.info("event=worker_exited model=%s reason=%s", msg.model, msg.reason)
            for f in self.table.on_worker_exited(msg.model, msg.reason):
                self._fail(f)
        elif isinstance(msg, Stop):
            self._stopping = True
        elif msg is not None:
            log.warning("unexpected control message %s dropped", type(msg).__name__)

    # ================================================================ workers
    def _on_worker(self, frames: list[bytes]) -> None:
        if len(frames) < 4:
            log.warning("worker frames of length %d dropped", len(frames))
            return
        model = frames[0].decode("utf-8", "replace")
        client_id = frames[1]
        if not client_id:
            try:
                status = self._push_decoder.decode(frames[2:])
            except ProtocolError as exc:
                log.warning("bad status push from %s dropped: %s", model, exc)
                return
            self._flush(model, self.table.on_status(status, model))
            return
        try:
            head = self._head.decode(frames[3])
        except (msgspec.DecodeError, msgspec.ValidationError):
            head = _Head()
        terminal = head.t in TERMINAL_TAGS
        self.routed += 1
        if not self._send_frames(self.client, frames[1:]) and not terminal:
            # the client is gone: stop its stream at the worker, once
            if self.table.model_of(client_id, head.request_id) is not None:
                cancel = Cancel(target=head.request_id)
                self._send_frames(self.workers, [frames[0], client_id, *encode(cancel)])
            self.table.finished(client_id, head.request_id)
        if terminal:
            self.table.finished(client_id, head.request_id)

    def _flush(self, model: str, pending: list[Pending]) -> None:
        ident = model.encode()
        for i, p in enumerate(pending):
            if not self._send_frames(self.workers, [ident, p.client_id, PROTOCOL_ID, p.body]):
                # not connected (yet): hold them; a status push or the retry timer resends
                self.table.unroutable(model, pending[i:])
                self._route_retry_at = time.monotonic() + ROUTE_RETRY_S
                return

    # ================================================================ clients
    def _on_client(self, frames: list[bytes]) -> None:
        client_id = frames[0]
        self.counters["router_requests"] += 1
        try:
            msg = self._req_decoder.decode(frames[1:])
        except ProtocolError as exc:
            self.counters["router_bad_requests"] += 1
            body = frames[2] if len(frames) > 2 else b""
            self._send_client(client_id, error_reply(peek_request_id(body), exc.code, exc.message))
            return
        try:
            self._dispatch(client_id, msg, frames[2])
        except ErllamaError as exc:
            self._send_client(client_id, error_reply(msg.request_id, exc.code, exc.message))

    def _dispatch(self, client_id: bytes, msg: Msg, body: bytes) -> None:
        rid = msg.request_id
        if type(msg) in TREE_OPS:
            try:
                self.link.socket.send_multipart([client_id, PROTOCOL_ID, body], zmq.NOBLOCK)
            except zmq.Again:
                self._send_client(
                    client_id, error_reply(rid, ErrorCode.BUSY, "supervisor busy", retryable=True)
                )
        elif type(msg) in WORKER_OPS:
            if isinstance(msg, Cancel):
                model = self.table.model_of(client_id, msg.target)
                if model is None:  # nothing to cancel: always ok
                    self._send_client(client_id, reply(rid, None))
                    return
            else:
                model = msg.model  # type: ignore[attr-defined]
            if isinstance(msg, Complete):
                self.table.touch(model)
            if (answer := self.sleeper.on_request(model, msg)) is not None:
                self._send_client(client_id, answer)  # a sleeping model stays asleep
                return
            self._admit(client_id, model, rid, body)
        elif isinstance(msg, ListModels):
            self._send_client(client_id, reply(rid, self.table.list_models()))
        elif isinstance(msg, GetModelInfo):
            info = self.table.model_info(msg.model)
            if info is None:
                self._send_client(
                    client_id, error_reply(rid, ErrorCode.NOPROC, f"model {msg.model!r} unknown")
                )
            else:
                self._send_client(client_id, reply(rid, info))
        elif isinstance(msg, SleepModel):
            self._send_client(client_id, reply(rid, self.sleeper.sleep_now(msg.model, msg.reason)))
        elif isinstance(msg, GetStatusRow):
            self._send_client(client_id, reply(rid, self.table.status_row(msg.model)))
        elif isinstance(msg, QueueDepth):
            self._send_client(client_id, reply(rid, self.table.queue_depth(msg.model)))
        elif isinstance(msg, GetCounters):
            self._meta_call("counters", client_id, rid, GetMetaCounters(), META_TIMEOUT_S)
        elif isinstance(msg, GetDaemonStatus):
            self._meta_call("daemon_status", client_id, rid, GetTierStats(), STATUS_META_TIMEOUT_S)
        elif type(msg) in SCHEDULER_OPS:  # vram_info too: the scheduler reads NVML
            self.sched.forward(client_id, msg, time.monotonic())
        else:  # pragma: no cover - every ClientRequest is handled above
            self._send_client(client_id, error_reply(rid, ErrorCode.NOT_SUPPORTED, "unknown op"))

    def _admit(self, client_id: bytes, model: str, rid: str, body: bytes) -> None:
        decision = self.table.admit(model, client_id, rid, body)
        if decision.action is Admit.FORWARD:
            self._flush(model, [Pending(client_id, rid, body)])
        elif decision.action is Admit.REJECT:
            self._fail(Failure(client_id, rid, decision.code, decision.message, decision.retryable))

    # ================================================================ meta
    def _meta_call(self, kind: str, client_id: bytes, rid: str, req: Msg, timeout: float) -> None:
        self._meta_seq += 1
        meta_rid = f"r{self._meta_seq}"
        call = _MetaCall(kind, client_id, rid, time.monotonic() + timeout)
        try:
            self.meta.send_multipart(
                encode(msgspec.structs.replace(req, request_id=meta_rid)), zmq.NOBLOCK
            )
        except zmq.ZMQError:
            self._meta_done(call, None)
            return
        self._meta_calls[meta_rid] = call

    def _on_meta(self, frames: list[bytes]) -> None:
        try:
            msg = self._meta_decoder.decode(frames)
        except ProtocolError as exc:
            log.warning("bad reply from meta dropped: %s", exc)
            return
        call = self._meta_calls.pop(msg.request_id, None)
        if call is not None:
            self._meta_done(call, msg)

    def _expire_meta_calls(self, now: float) -> None:
        for rid in [r for r, c in self._meta_calls.items() if c.deadline <= now]:
            self._meta_done(self._meta_calls.pop(rid), None)

    def _meta_done(self, call: _MetaCall, msg: Reply | ErrorReply | None) -> None:
        """Answer the client's counters / daemon_status with what meta said (or did not)."""
        ok = isinstance(msg, Reply)
        if call.kind == "daemon_status":
            tiers: list[TierUsage] = []
            sched: dict[str, Any] | None = None
            if isinstance(msg, Reply):
                try:
                    stats = msgspec.msgpack.decode(msg.result, type=TierStatsResult)
                    tiers, sched = stats.tiers, stats.scheduler
                except msgspec.MsgspecError:
                    log.warning("bad tier_stats result from meta")
            status = DaemonStatus(
                models=self.table.list_models(),
                tiers=tiers,
                run_dir=self.run_dir,
                pid=os.getppid(),
                scheduler=sched,
            )
            self._send_client(call.client_id, reply(call.request_id, status))
            return
        if isinstance(msg, Reply):
            try:
                counters = msgspec.msgpack.decode(msg.result, type=CountersResult).counters
            except msgspec.MsgspecError:
                ok, counters = False, {}
            if ok:
                self._send_client(
                    call.client_id, reply(call.request_id, {**counters, **self.counters})
                )
                return
        if isinstance(msg, ErrorReply):
            err = error_reply(call.request_id, msg.code, f"meta: {msg.message}")
        else:
            err = error_reply(call.request_id, ErrorCode.TIMEOUT, "cache meta did not answer")
        self._send_client(call.client_id, err)

    def _on_scheduler(self, frames: list[bytes]) -> None:
        if (out := self.sched.on_frames(frames)) is not None:
            self._send_client(*out)

    # ================================================================ send
    def _fail(self, f: Failure) -> None:
        self._send_client(
            f.client_id, error_reply(f.request_id, f.code, f.message, retryable=f.retryable)
        )

    def _send_client(self, client_id: bytes, msg: Msg) -> None:
        self._send_frames(self.client, [client_id, *encode(msg)])

    def _send_frames(self, sock: zmq.Socket[bytes], frames: list[Any]) -> bool:
        """Send with ROUTER_MANDATORY semantics: False if the peer is gone (dropped)."""
        try:
            sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise
            self.counters["router_unroutable"] += 1
            return False
        return True


def _socket_file(endpoint: str) -> tuple[str, int | None]:
    if not endpoint.startswith("ipc://"):
        return "", None
    path = endpoint[len("ipc://") :]
    try:
        return path, os.stat(path).st_ino
    except OSError:
        return path, None


def main(run_dir: str, child_id: str) -> int:
    """Entry of the router process (``erllama.supervisor.entry.run_child``)."""
    return lifecycle.run("router", run_dir, child_id, RouterInit, _start)


def _start(child: lifecycle.Child, init: RouterInit) -> lifecycle.Started:
    """Bind the client and workers sockets; connect meta and the scheduler."""
    endpoint = init.endpoint
    if endpoint and not endpoint.startswith("ipc://"):
        # DESIGN §2: TCP is opt-in through daemon.tcp_endpoint (CURVE, protocol/auth.py)
        raise ErllamaError(
            f"endpoint {endpoint}: daemon.endpoint is ipc:// only; "
            "use daemon.tcp_endpoint (CURVE) for TCP",
            code=ErrorCode.NOT_SUPPORTED,
        )
    try:
        router = Router(child.ctx, child.run_dir, child.link, init)
    except (zmq.ZMQError, msgspec.ValidationError, OSError, ValueError) as exc:
        raise ErllamaError(f"router cannot start: {exc}", code=ErrorCode.INTERNAL) from None
    # active stays 0: a router waiting on slow workers is not hung
    child.link.progress = lambda: (0, router.routed)
    return lifecycle.Started(lambda: router.run(child.wake_fd), {"endpoint": router.endpoint})
