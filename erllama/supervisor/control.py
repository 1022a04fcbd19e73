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
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import msgspec
import zmq

from erllama.config import ConfigError, ModelSpec, convert_model_spec, validate_model_spec
from erllama.protocol.codec import PROTOCOL_ID, Decoder, encode, error_reply, peek_request_id, reply
from erllama.protocol.errors import ErrorCode, ProtocolError
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
from erllama.supervisor import payloads, sleeping
from erllama.supervisor.slot import Slot, Waiter
from erllama.supervisor.tree import ChildSpec, ChildState, RestartTracker

if TYPE_CHECKING:
    from erllama.supervisor.daemon import Root

log = logging.getLogger(__name__)

CONTROL_BATCH = 256
MAX_MODEL_ID_LEN = 200
ROUTER_ID = b"router"


def _check_model_id(model_id: str) -> None:
    if not model_id or len(model_id) > MAX_MODEL_ID_LEN:
        raise ConfigError(f"model id must be 1..{MAX_MODEL_ID_LEN} characters")
    if not model_id.isprintable() or any(c.isspace() for c in model_id):
        raise ConfigError("model id must be printable with no whitespace")


class ControlServer:
    def __init__(self, root: Root) -> None:
        self.root = root
        self.socket = make_socket(
            root.ctx, zmq.ROUTER, bind=ipc_endpoint(root.run_dir, CONTROL_SOCK)
        )
        self._decoder: Decoder[ControlMessage] = Decoder(ControlMessage)
        self._tree_decoder: Decoder[LoadModel | Unload] = Decoder(LoadModel | Unload)
        self._next_model_n = 1

    def close(self) -> None:
        self.socket.close(linger=0)

    # ================================================================ receive
    def drain(self) -> None:
        """Handle what is queued on the socket (bounded, so sentinels are not starved)."""
        for _ in range(CONTROL_BATCH):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._on_frames(frames)
            except Exception:
                log.exception("control message handling failed (dropped)")

    def _on_frames(self, frames: list[bytes]) -> None:
        if len(frames) == 4 and frames[2] == PROTOCOL_ID:
            if frames[0] != ROUTER_ID:
                log.warning("tree op from %r (not the router) dropped", frames[0][:32])
                return
            self._on_tree_op((frames[0], frames[1], ""), frames[3])
            return
        if len(frames) < 3:
            log.warning("control frames of length %d dropped", len(frames))
            return
        child_id = frames[0].decode("utf-8", "replace")
        try:
            msg = self._decoder.decode(frames[1:])
        except ProtocolError as exc:
            log.warning("bad control message from %s dropped: %s", child_id, exc)
            return
        slot = self.root.slots.get(child_id)
        if isinstance(msg, AdaptersChanged) and slot is not None and slot.is_worker:
            # kept even when the worker is already gone: it was sent before it died
            slot.adapters = msg
            log.info(
                "event=adapters_recorded model=%s handles=%s",
                slot.model_id,
                ",".join(a.handle for a in msg.adapters) or "-",
            )
            return
        if slot is None or slot.proc is None:
            log.warning("%s from unknown or dead child %s dropped", type(msg).__name__, child_id)
            return
        now = time.monotonic()
        if isinstance(msg, Hello):
            if slot.phase != "hello" or msg.pid != slot.proc.pid:
                log.warning("unexpected hello from %s pid=%d dropped", child_id, msg.pid)
                return
            init = Init(config=self._init_payload(slot), incarnation=slot.tracker.incarnation)
            if self.send(child_id, init):
                slot.phase = "init_sent"
        elif isinstance(msg, Ready):
            if slot.phase != "init_sent":
                log.warning("unexpected ready from %s dropped", child_id)
                return
            if slot.is_worker:
                slot.info = payloads.parse_ready_info(msg.info) or slot.info
            elif slot.spec.role == "gateway":
                slot.listen = str(msg.info.get("listen") or "")
            self.root.on_ready(slot, now)
        elif isinstance(msg, StartFailed):
            log.warning(
                "event=start_failed child=%s code=%s message=%s", child_id, msg.code, msg.message
            )
            slot.start_failed = (msg.code, msg.message)
        elif isinstance(msg, Pong):
            if slot.phase == "ready":
                self.root.on_pong(slot, msg.active, msg.progress, now)
        elif isinstance(msg, ShutdownSaving):
            if slot.is_worker:
                self.root.on_shutdown_saving(slot, msg.timeout_s, now)
        elif isinstance(msg, SleepWorker | WakeWorker) and slot.spec.role == "router":
            target = self.root.slots.get(f"worker.{msg.model}")
            if target is None or not target.is_worker:
                log.info("%s for unknown model %r dropped", type(msg).__name__, msg.model)
            elif isinstance(msg, SleepWorker):
                sleeping.sleep_worker(self.root, target, msg.reason, now)
            else:
                sleeping.wake_worker(self.root, target, now)
        else:
            log.warning("unexpected %s from %s dropped", type(msg).__name__, child_id)

    def _init_payload(self, slot: Slot) -> dict[str, Any]:
        cfg, root = self.root.cfg, self.root
        role = slot.spec.role
        if role == "meta":
            return payloads.meta_init(cfg, root.daemon_id)
        if role == "router":
            models = [self.view(s) for s in root.slots.values() if s.is_worker]
            return payloads.router_init(cfg, models, root.endpoint)
        if role == "scheduler":
            return payloads.scheduler_init(cfg, root.daemon_id, root.endpoint)
        if role == "gateway":
            return payloads.gateway_init(cfg, root.run_dir)
        assert slot.model is not None and slot.model_id is not None
        return payloads.worker_init(cfg, slot.model_id, slot.model, root.daemon_id, slot.adapters)

    # ================================================================ tree ops
    def _on_tree_op(self, waiter: Waiter, body: bytes) -> None:
        try:
            msg = self._tree_decoder.decode_body(body)
        except ProtocolError as exc:
            w = (waiter[0], waiter[1], peek_request_id(body))
            self.reply_error(w, exc.code, exc.message)
            return
        waiter = (waiter[0], waiter[1], msg.request_id)
        if self.root.exit_code is not None:
            self.reply_error(waiter, ErrorCode.SHUTTING_DOWN, "the daemon is stopping")
        elif isinstance(msg, LoadModel):
            self._load_model(waiter, msg)
        else:
            self._unload(waiter, msg)

    def _load_model(self, waiter: Waiter, msg: LoadModel) -> None:
        try:
            spec = convert_model_spec(msg.config)
            if msg.model_id is not None:
                spec = msgspec.structs.replace(spec, id=msg.model_id)
            validate_model_spec(spec, self.root.cfg.cache)
            if spec.id is not None:
                _check_model_id(spec.id)
        except ConfigError as exc:
            self.reply_error(waiter, ErrorCode.BAD_REQUEST, str(exc))
            return
        if spec.id is not None:
            old = self.root.slots.get(f"worker.{spec.id}")
            if old is not None:
                if old.tracker.state is ChildState.STOPPING:
                    self.reply_error(waiter, ErrorCode.BUSY, f"model {spec.id!r} is being unloaded")
                    return
                if old.tracker.state is not ChildState.FAILED:
                    self.reply_error(
                        waiter, ErrorCode.ALREADY_LOADED, f"model {spec.id!r} is loaded"
                    )
                    return
                self.root.slots.pop(old.child_id)  # a failed model may be loaded again
        try:
            slot = self.add_worker(spec, from_load=True)
        except OSError as exc:
            self.reply_error(waiter, ErrorCode.LOAD_FAILED, str(exc))
            return
        slot.load_waiters.append(waiter)
        if not self.root.spawn(slot, time.monotonic()):
            self.root.remove_model(slot, slot.last_exit or "spawn failed")

    def add_worker(self, spec: ModelSpec, *, from_load: bool) -> Slot:
        """A new worker slot (not spawned yet) for ``spec``; fills the id and the model path.

        Raises:
            OSError: the bundled model cannot be resolved.
        """
        model_id = spec.id or self._new_model_id()
        spec = payloads.resolve_model_path(msgspec.structs.replace(spec, id=model_id))
        child = ChildSpec(
            f"worker.{model_id}",
            "worker",
            self.root.modules["worker"],
            spec.restart.restart,
            spec.restart,
        )
        slot = Slot(
            spec=child,
            tracker=RestartTracker(child, fail_first_start=True),
            model_id=model_id,
            model=spec,
            from_load=from_load,
        )
        self.root.slots[child.child_id] = slot
        return slot

    def _new_model_id(self) -> str:
        while True:
            model_id = f"erllama_model_{self._next_model_n}"
            self._next_model_n += 1
            if f"worker.{model_id}" not in self.root.slots:
                return model_id

    def _unload(self, waiter: Waiter, msg: Unload) -> None:
        slot = self.root.slots.get(f"worker.{msg.model}")
        if slot is None:
            self.reply_error(waiter, ErrorCode.NOT_FOUND, f"model {msg.model!r} is not loaded")
            return
        if slot.proc is None:  # failed, or waiting out a backoff
            slot.tracker.on_stop_requested()
            slot.unload_waiters.append(waiter)
            self.root.events.publish("stop", slot.child_id, None, reason="unloaded")
            self.root.remove_model(slot, "unloaded")
            return
        slot.unload_waiters.append(waiter)
        self.root.begin_stop(slot, time.monotonic(), self.root.sup.drain_timeout_s)

    # ================================================================ send
    def send(self, child_id: str, msg: Msg) -> bool:
        """Send one message to a child; False if it is not connected (or gone)."""
        try:
            self.socket.send_multipart([child_id.encode(), *encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("send %s to %s failed: %s", type(msg).__name__, child_id, exc)
            return False
        return True

    def ping(self, slot: Slot) -> None:
        self.send(slot.child_id, Ping(seq=slot.ping_seq))

    def stop(self, slot: Slot) -> bool:
        return self.send(slot.child_id, Stop(drain=True))

    def view(self, slot: Slot) -> Any:
        assert slot.model is not None and slot.model_id is not None
        return payloads.model_view(
            slot.model_id,
            slot.model,
            slot.model_state(),
            last=slot.info,
            pid=slot.proc.pid if slot.proc is not None else None,
            restarts=slot.tracker.restarts,
            last_exit=slot.last_exit,
        )

    def _to_router(self, msg: Msg) -> None:
        router = self.root.slots.get("router")
        if router is not None and router.handshaken:
            self.send("router", msg)

    def model_changed(self, slot: Slot, state: Any) -> None:
        assert slot.model_id is not None
        info = self.view(slot)
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
        meta = self.root.slots.get("meta")
        if meta is not None and meta.handshaken:
            self.send("meta", HoldersDied(holders=holders))

    def reply_ok(self, waiter: Waiter, result: Any) -> None:
        self._reply(waiter, reply(waiter[2], result))

    def reply_error(self, waiter: Waiter, code: str, message: str) -> None:
        self._reply(waiter, error_reply(waiter[2], code, message))

    def _reply(self, waiter: Waiter, msg: Msg) -> None:
        router_id, client_id, _ = waiter
        try:
            self.socket.send_multipart([router_id, client_id, *encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.info("tree op reply to %r dropped: %s", client_id, exc)
