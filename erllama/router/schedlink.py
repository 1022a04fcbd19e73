"""The router's link to the scheduler process: forward ``SCHEDULER_OPS``, match, expire.

One DEALER connected to the scheduler's ``scheduler.sock`` (``ZMQ_IMMEDIATE``: a
request is queued only on a live connection, so nothing waits in a socket queue for
a scheduler that is not there and runs much later). A request that finds no
connection is retried every ``RETRY_S`` for ``CONNECT_GRACE_S`` (a restarted
scheduler is reconnected within ~100 ms of binding). Each forwarded request gets a
request id of the router's own and a deadline; the reply is sent back to its client
under the client's request id::

    client [cid, ERL1, op(rid)] -> router -> [ERL1, op(sN)] -> scheduler
    client [cid, ERL1, reply(rid)] <- router <- [ERL1, reply(sN)] <- scheduler

The scheduler runs whether or not it is enabled (``scheduler/scheduler.py``); when it
is not there (not installed, restarting) a request is answered at once: ``no_gpu``
for ``vram_info`` (as on a machine without NVML), ``timeout`` for the others, as
for a scheduler that does not answer before its deadline.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import msgspec
import zmq

from erllama.protocol.codec import Decoder, encode, error_reply
from erllama.protocol.errors import ErrorCode, ProtocolError
from erllama.protocol.messages import ErrorReply, ForceSchedulerCheck, GetVramInfo, Msg, Reply
from erllama.protocol.sockets import SCHEDULER_SOCK, ipc_endpoint, make_socket

log = logging.getLogger(__name__)

CONNECT_GRACE_S = 1.0
RETRY_S = 0.02
TIMEOUT_S = 5.0  # status, switches and vram_info (an NVML read waits at most 2 s)
FORCE_TIMEOUT_S = 70.0  # a forced check answers within 60 s (scheduler/api.FORCE_WAIT_S)


@dataclass(frozen=True, slots=True)
class _Call:
    client_id: bytes
    request_id: str
    vram: bool
    deadline: float


@dataclass(frozen=True, slots=True)
class _Unsent:
    call: _Call
    rid: str  # the router's
    frames: list[bytes | memoryview]
    give_up: float


Send = tuple[bytes, Msg]  # (client id, reply) for the router to send


class SchedulerLink:
    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], run_dir: str) -> None:
        self.sock = make_socket(ctx, zmq.DEALER, linger_ms=0)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock.connect(ipc_endpoint(run_dir, SCHEDULER_SOCK))
        self._decoder: Decoder[Reply | ErrorReply] = Decoder(Reply | ErrorReply)
        self._calls: dict[str, _Call] = {}
        self._unsent: list[_Unsent] = []
        self._seq = 0

    def forward(self, client_id: bytes, msg: Msg, now: float) -> None:
        """Send ``msg`` to the scheduler (or hold it while there is no connection)."""
        self._seq += 1
        rid = f"s{self._seq}"
        vram = isinstance(msg, GetVramInfo)
        timeout = FORCE_TIMEOUT_S if isinstance(msg, ForceSchedulerCheck) else TIMEOUT_S
        call = _Call(client_id, msg.request_id, vram, now + timeout)
        frames = encode(msgspec.structs.replace(msg, request_id=rid))
        if self._unsent or not self._send(rid, call, frames):
            self._unsent.append(_Unsent(call, rid, frames, now + CONNECT_GRACE_S))

    def _send(self, rid: str, call: _Call, frames: list[bytes | memoryview]) -> bool:
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            return False
        self._calls[rid] = call
        return True

    def retry(self, now: float) -> list[Send]:
        """Send what waits for a connection, in order; answer what waited too long."""
        out: list[Send] = []
        while self._unsent:
            u = self._unsent[0]
            if not self._send(u.rid, u.call, u.frames):
                break
            self._unsent.pop(0)
        keep = []
        for u in self._unsent:
            if u.give_up <= now:
                why = "the scheduler is not running"
                out.append((u.call.client_id, _unavailable(u.call.request_id, u.call.vram, why)))
            else:
                keep.append(u)
        self._unsent = keep
        return out

    def on_frames(self, frames: list[bytes]) -> Send | None:
        try:
            msg = self._decoder.decode(frames)
        except ProtocolError as exc:
            log.warning("bad reply from the scheduler dropped: %s", exc)
            return None
        call = self._calls.pop(msg.request_id, None)
        if call is None:
            return None  # its deadline passed: the client was answered already
        return call.client_id, msgspec.structs.replace(msg, request_id=call.request_id)

    def expire(self, now: float) -> list[Send]:
        """Retry the held requests; answer the calls past their deadline."""
        out = self.retry(now)
        late = [rid for rid, c in self._calls.items() if c.deadline <= now]
        for rid in late:
            c = self._calls.pop(rid)
            out.append(
                (
                    c.client_id,
                    _unavailable(c.request_id, c.vram, "the scheduler did not answer in time"),
                )
            )
        return out

    def next_deadline(self, now: float) -> float:
        if self._unsent:
            return now + RETRY_S
        return min((c.deadline for c in self._calls.values()), default=math.inf)

    def drain_all(self, code: str, message: str) -> list[Send]:
        calls = [*self._calls.values(), *(u.call for u in self._unsent)]
        self._calls.clear()
        self._unsent.clear()
        return [(c.client_id, error_reply(c.request_id, code, message)) for c in calls]

    def close(self) -> None:
        self.sock.close(linger=0)


def _unavailable(rid: str, vram: bool, why: str) -> ErrorReply:
    if vram:
        return error_reply(rid, ErrorCode.NO_GPU, f"no NVML reading ({why})")
    return error_reply(rid, ErrorCode.TIMEOUT, why, retryable=True)
