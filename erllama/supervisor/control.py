"""The root's end of ``control.sock``: the handshake, heartbeats and the tree operations.

Frame shapes (docs/ARCHITECTURE.md):

* child -> root: ``[child_id, b"ERL1", body]`` (Hello, Ready, StartFailed, Pong;
  from workers AdaptersChanged, kept in the slot and sent in the next incarnation's
  Init, and ShutdownSaving, which holds a stopping worker's SIGTERM for its saves)
* root -> child: ``[child_id, b"ERL1", body]`` (Init, Ping, Stop; ModelStateChanged and
  WorkerExited to the router; HoldersDied to meta)
* router -> root: ``[b"router", client_id, b"ERL1", body]`` (LoadModel, Unload),
  answered ``[b"router", client_id, b"ERL1", reply]``; and, as the router's own
  control messages ``[b"router", b"ERL1", body]``, SleepWorker / WakeWorker (keep_alive,
  handed to ``supervisor/sleeping.py``; answered with ModelStateChanged).

The socket is a ROUTER with ``ROUTER_MANDATORY``: a send to a child that is
gone raises ``EHOSTUNREACH``, which is caught and logged (the child's death
reaches the loop through its sentinel anyway). Bad input is answered (tree
ops) or dropped (child messages), never fatal.

``ControlChannel`` is only the channel: it decodes frames into typed events
(``FromChild``, ``FromRouter``, ``TreeOp``), dropping what the sender may not send
now (an unknown or dead child, a Hello or Ready out of phase), and hands each to
the root's handler; it sends what the root tells it to. It decides nothing about
the tree (``table.py``, ``sleeping.py``) and reads the slot table only to address
and gate messages. Binds ``control.sock``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import zmq

from erllama.protocol.codec import PROTOCOL_ID, Decoder, encode, error_reply, peek_request_id, reply
from erllama.protocol.errors import ProtocolError
from erllama.protocol.messages import (
    AdaptersChanged,
    ControlMessage,
    Hello,
    HoldersDied,
    Init,
    LoadModel,
    ModelStateChanged,
    Msg,
    Ping,
    Pong,
    Ready,
    ShutdownSaving,
    SleepWorker,
    StartFailed,
    Stop,
    Unload,
    WakeWorker,
    WorkerExited,
)
from erllama.protocol.sockets import CONTROL_SOCK, ipc_endpoint, make_socket
from erllama.supervisor.payloads import slot_view
from erllama.supervisor.slot import Slot, Waiter, worker_id

log = logging.getLogger(__name__)

CONTROL_BATCH = 256
ROUTER_ID = b"router"

ChildMessage = Hello | Ready | StartFailed | Pong | ShutdownSaving | AdaptersChanged


@dataclass(frozen=True, slots=True)
class FromChild:
    """A message from a live child (AdaptersChanged: from a worker, live or not)."""

    slot: Slot
    msg: ChildMessage


@dataclass(frozen=True, slots=True)
class FromRouter:
    """The router asks to put a worker to sleep or wake it (keep_alive)."""

    target: Slot
    msg: SleepWorker | WakeWorker


@dataclass(frozen=True, slots=True)
class TreeOp:
    """A client's ``LoadModel`` / ``Unload`` the router forwarded (answer to ``waiter``)."""

    waiter: Waiter
    msg: LoadModel | Unload


ControlEvent = FromChild | FromRouter | TreeOp


class ControlChannel:
    """The root's ROUTER on ``control.sock``.

    Args:
        ctx: the root's zmq context.
        run_dir: where ``control.sock`` is bound.
        slots: the root's slot table by child id (read only: who is there, in what phase).
    """

    def __init__(
        self, ctx: zmq.Context[zmq.Socket[bytes]], run_dir: Path, slots: Mapping[str, Slot]
    ) -> None:
        self.socket = make_socket(ctx, zmq.ROUTER, bind=ipc_endpoint(run_dir, CONTROL_SOCK))
        self._slots = slots
        self._decoder: Decoder[ControlMessage] = Decoder(ControlMessage)
        self._tree_decoder: Decoder[LoadModel | Unload] = Decoder(LoadModel | Unload)

    def close(self) -> None:
        self.socket.close(linger=0)

    # ================================================================ receive
    def drain(self, handle: Callable[[ControlEvent], None]) -> None:
        """Decode what is queued and hand each event to ``handle`` (bounded, so
        sentinels are not starved; a failing event is logged and dropped)."""
        for _ in range(CONTROL_BATCH):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                event = self._decode(frames)
                if event is not None:
                    handle(event)
            except Exception:
                log.exception("control message handling failed (dropped)")

    def _decode(self, frames: list[bytes]) -> ControlEvent | None:
        if len(frames) == 4 and frames[2] == PROTOCOL_ID:
            if frames[0] != ROUTER_ID:
                log.warning("tree op from %r (not the router) dropped", frames[0][:32])
                return None
            return self._decode_tree_op(frames[0], frames[1], frames[3])
        if len(frames) < 3:
            log.warning("control frames of length %d dropped", len(frames))
            return None
        child_id = frames[0].decode("utf-8", "replace")
        try:
            msg = self._decoder.decode(frames[1:])
        except ProtocolError as exc:
            log.warning("bad control message from %s dropped: %s", child_id, exc)
            return None
        slot = self._slots.get(child_id)
        if isinstance(msg, AdaptersChanged) and slot is not None and slot.is_worker:
            return FromChild(slot, msg)  # kept even when the worker is already gone
        if slot is None or slot.proc is None:
            log.warning("%s from unknown or dead child %s dropped", type(msg).__name__, child_id)
            return None
        if isinstance(msg, Hello):
            if slot.phase != "hello" or msg.pid != slot.proc.pid:
                log.warning("unexpected hello from %s pid=%d dropped", child_id, msg.pid)
                return None
            return FromChild(slot, msg)
        if isinstance(msg, Ready):
            if slot.phase != "init_sent":
                log.warning("unexpected ready from %s dropped", child_id)
                return None
            return FromChild(slot, msg)
        if isinstance(msg, StartFailed):
            return FromChild(slot, msg)
        if isinstance(msg, Pong):
            return FromChild(slot, msg) if slot.phase == "ready" else None
        if isinstance(msg, ShutdownSaving):
            return FromChild(slot, msg) if slot.is_worker else None
        if isinstance(msg, SleepWorker | WakeWorker) and slot.spec.role == "router":
            target = self._slots.get(worker_id(msg.model))
            if target is None or not target.is_worker:
                log.info("%s for unknown model %r dropped", type(msg).__name__, msg.model)
                return None
            return FromRouter(target, msg)
        log.warning("unexpected %s from %s dropped", type(msg).__name__, child_id)
        return None

    def _decode_tree_op(self, router_id: bytes, client_id: bytes, body: bytes) -> TreeOp | None:
        try:
            msg = self._tree_decoder.decode_body(body)
        except ProtocolError as exc:
            self.reply((router_id, client_id, peek_request_id(body)), exc.code, exc.message)
            return None
        return TreeOp((router_id, client_id, msg.request_id), msg)

    # ================================================================ send
    def send(self, child_id: str, msg: Msg) -> bool:
        """Send one message to a child; False if it is not connected (or gone)."""
        try:
            self.socket.send_multipart([child_id.encode(), *encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("send %s to %s failed: %s", type(msg).__name__, child_id, exc)
            return False
        return True

    def init(self, slot: Slot, config: dict[str, Any]) -> bool:
        return self.send(slot.child_id, Init(config=config, incarnation=slot.tracker.incarnation))

    def ping(self, slot: Slot) -> None:
        self.send(slot.child_id, Ping(seq=slot.ping_seq))

    def stop(self, slot: Slot) -> bool:
        return self.send(slot.child_id, Stop(drain=True))

    def _to_router(self, msg: Msg) -> None:
        router = self._slots.get("router")
        if router is not None and router.handshaken:
            self.send("router", msg)

    def model_changed(self, slot: Slot, state: Any) -> None:
        assert slot.model_id is not None
        info = slot_view(slot)
        if state == "unloaded":
            info = msgspec.structs.replace(info, state="unloaded", status="unloaded", pid=None)
        self._to_router(
            ModelStateChanged(
                model=slot.model_id,
                state=state,
                info=info,
                last_exit=slot.last_exit,
                restarts=slot.tracker.restarts,
            )
        )

    def worker_exited(self, slot: Slot, reason: str) -> None:
        assert slot.model_id is not None
        self._to_router(WorkerExited(model=slot.model_id, reason=reason))

    def holders_died(self, holders: list[str]) -> None:
        meta = self._slots.get("meta")
        if meta is not None and meta.handshaken:
            self.send("meta", HoldersDied(holders=holders))

    def reply(self, waiter: Waiter, code: str = "", message: str = "", result: Any = None) -> None:
        """Answer a tree op: ``code`` empty is ok with ``result``, else the error."""
        router_id, client_id, request_id = waiter
        msg = error_reply(request_id, code, message) if code else reply(request_id, result)
        try:
            self.socket.send_multipart([router_id, client_id, *encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.info("tree op reply to %r dropped: %s", client_id, exc)
