"""The scheduler's own socket: run-time control and ``vram_info``, from clients.

Binds ROUTER ``scheduler.sock``. The router forwards the ``SCHEDULER_OPS`` of its
clients here on one DEALER, with request ids of its own, and matches the replies
(``router/schedlink.py``)::

    [peer, ERL1, GetSchedulerStatus | EnableScheduler | SetSchedulerThresholds
                 | ForceSchedulerCheck | GetVramInfo]
    -> [peer, ERL1, Reply | ErrorReply]

Every request is answered at once from the main thread, except a forced check that
started a plan: it is answered when the action thread says the plan ended (its done
pipe), or after ``FORCE_WAIT_S`` with outcome ``running`` (the plan goes on; its
result shows in ``scheduler_status().last_action``).

Bad watermarks are ``bad_thresholds`` (``config.validate_watermarks``, the check the
config gets at start); bad frames are answered with their protocol error.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from erllama.config import ConfigError
from erllama.protocol.codec import Decoder, encode, error_reply, peek_request_id, reply
from erllama.protocol.errors import ErllamaError, ErrorCode, InvalidRequestError, ProtocolError
from erllama.protocol.messages import (
    EnableScheduler,
    ForceSchedulerCheck,
    GetSchedulerStatus,
    GetVramInfo,
    Msg,
    SchedulerCheck,
    SetSchedulerThresholds,
)
from erllama.protocol.sockets import SCHEDULER_SOCK, ipc_endpoint, make_socket

if TYPE_CHECKING:
    from erllama.scheduler.scheduler import Scheduler

log = logging.getLogger(__name__)

SchedulerRequest = (
    GetSchedulerStatus
    | EnableScheduler
    | SetSchedulerThresholds
    | ForceSchedulerCheck
    | GetVramInfo
)
FORCE_WAIT_S = 60.0  # the router waits a little longer (schedlink.FORCE_TIMEOUT_S)
RECV_BATCH = 64


@dataclass(frozen=True, slots=True)
class _Waiter:
    peer: bytes
    request_id: str
    plan: int
    deadline: float


class SchedulerApi:
    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], run_dir: str, sched: Scheduler):
        self.sched = sched
        self.sock = make_socket(ctx, zmq.ROUTER, bind=ipc_endpoint(run_dir, SCHEDULER_SOCK))
        self._decoder: Decoder[Any] = Decoder(SchedulerRequest)
        self.waiters: list[_Waiter] = []

    def drain(self) -> None:
        for _ in range(RECV_BATCH):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.on_frames(frames)

    def on_frames(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            return
        peer = frames[0]
        try:
            msg = self._decoder.decode(frames[1:])
        except ProtocolError as exc:
            body = frames[2] if len(frames) > 2 else b""
            self._send(peer, error_reply(peek_request_id(body), exc.code, exc.message))
            return
        try:
            out = self.handle(peer, msg)
        except ErllamaError as exc:
            out = error_reply(msg.request_id, exc.code, exc.message)
        if out is not None:
            self._send(peer, out)

    def handle(self, peer: bytes, msg: Msg) -> Msg | None:
        """The reply to ``msg``; None when it comes later (a forced check's plan)."""
        s, rid = self.sched, msg.request_id
        if isinstance(msg, GetSchedulerStatus):
            return reply(rid, s.status())
        if isinstance(msg, EnableScheduler):
            s.set_enabled(msg.enabled)
            return reply(rid, s.status())
        if isinstance(msg, SetSchedulerThresholds):
            try:
                s.set_thresholds(msg.high, msg.low)
            except ConfigError as exc:
                raise InvalidRequestError(str(exc), code=ErrorCode.BAD_THRESHOLDS) from None
            return reply(rid, s.status())
        if isinstance(msg, ForceSchedulerCheck):
            got = s.force_check()
            if isinstance(got, SchedulerCheck):
                return reply(rid, got)
            self.waiters.append(_Waiter(peer, rid, got, time.monotonic() + FORCE_WAIT_S))
            return None
        if isinstance(msg, GetVramInfo):
            return reply(rid, s.vram_info())
        return error_reply(rid, ErrorCode.NOT_SUPPORTED, f"{type(msg).__name__} not handled here")

    def plans_done(self) -> None:
        """Answer the forced checks whose plan has ended."""
        n, action, error = self.sched.last_done
        keep: list[_Waiter] = []
        for w in self.waiters:
            if w.plan > n:
                keep.append(w)
            elif error:
                self._send(w.peer, error_reply(w.request_id, ErrorCode.INTERNAL, error))
            else:
                reason = action.reason if action is not None else "forced"
                check = SchedulerCheck(
                    outcome="acted", reason=reason, last_ratio=self._ratio(), action=action
                )
                self._send(w.peer, reply(w.request_id, check))
        self.waiters = keep

    def expire(self, now: float) -> None:
        late = [w for w in self.waiters if w.deadline <= now]
        if not late:
            return
        self.waiters = [w for w in self.waiters if w.deadline > now]
        for w in late:
            check = SchedulerCheck(outcome="running", reason="forced", last_ratio=self._ratio())
            self._send(w.peer, reply(w.request_id, check))

    def next_deadline(self) -> float:
        return min((w.deadline for w in self.waiters), default=math.inf)

    def _ratio(self) -> float | None:
        s = self.sched.last_sample
        return round(s.ratio, 6) if s is not None else None

    def _send(self, peer: bytes, msg: Msg) -> None:
        try:
            self.sock.send_multipart([peer, *encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the router is gone (ROUTER_MANDATORY): drop it
            log.debug("scheduler reply dropped: %s", exc)

    def close(self) -> None:
        for w in self.waiters:
            self._send(w.peer, error_reply(w.request_id, ErrorCode.SHUTTING_DOWN, "stopping"))
        self.waiters = []
        self.sock.close(linger=200)
