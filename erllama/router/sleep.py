"""The router's hands for the keep-alive timers: it puts idle models to sleep and wakes them.

``keepalive.KeepAlive`` (pure, in the table) decides; this module carries its
effects out over the router's sockets:

* ``Sleep`` (the timer ran out) or a ``SleepModel`` request (the scheduler under
  memory pressure, or an operator): the table holds every later request for the
  model (``table.sleep``) and the root gets ``SleepWorker`` on control; it stops
  the worker as an unload does and reports the model ``sleeping``. Log
  ``event=unload model=... reason=keep_alive|pressure|request``; counter
  ``keep_alive_unloads`` for the timer.
* ``Wake`` (a held request for a sleeping model): ``WakeWorker`` to the root, which
  starts the worker again (``loading``, then ``ready``: the table flushes what it
  held). Log ``event=load model=... reason=keep_alive_wake``; counter
  ``models_reloaded``.

Housekeeping ops for a sleeping model (``status``, ``evict``, ``shutdown``) are
answered here without waking it: it is idle and its shutdown save already ran.
Counters go to meta as ``add_counters`` (fire and forget).
"""

from __future__ import annotations

import logging
import time

import zmq

from erllama.protocol.codec import encode, reply
from erllama.protocol.messages import (
    Cancel,
    Complete,
    Evict,
    ModelStatus,
    Msg,
    ShutdownModel,
    SleepReason,
    SleepWorker,
    WakeWorker,
)
from erllama.protocol.meta_messages import AddCounters
from erllama.router.keepalive import Sleep
from erllama.router.table import ModelTable

log = logging.getLogger(__name__)

RETRY_S = 0.1  # a message to the root that could not be queued is sent again this soon
# Ops that do not use the model: they keep neither it awake nor wake it.
HOUSEKEEPING: frozenset[type[Msg]] = frozenset({ModelStatus, Evict, ShutdownModel, Cancel})


class Sleeper:
    def __init__(self, table: ModelTable, control: zmq.Socket[bytes], meta: zmq.Socket[bytes]):
        self.table = table
        self.control = control
        self.meta = meta
        self._retry_at: float | None = None  # a send to the root failed: try again then

    def on_request(self, model: str, msg: Msg) -> Msg | None:
        """A worker op for ``model`` arrived; the reply when the router answers it itself."""
        if type(msg) in HOUSEKEEPING:
            entry = self.table.models.get(model)
            if entry is None or entry.state != "sleeping" or isinstance(msg, Cancel):
                return None
            if isinstance(msg, ModelStatus):
                return reply(msg.request_id, "idle")
            if isinstance(msg, Evict) and msg.release_context:
                return reply(msg.request_id, {"released": False})
            return reply(msg.request_id, None)
        self.table.keep_alive.used(model)
        if isinstance(msg, Complete):
            self.table.keep_alive.set_keep_alive(model, msg.options.keep_alive)
        return None

    def sleep_now(self, model: str, reason: SleepReason) -> bool:
        """``SleepModel``: put an idle, ready model to sleep now (pressure: if it may)."""
        entry = self.table.models.get(model)
        if entry is None or entry.state != "ready" or entry.busy:
            return False
        if reason == "pressure" and not self.table.keep_alive.may_sleep(model):
            return False
        return self._sleep(model, reason, "")

    def tick(self, now: float) -> None:
        """Bring the timers up to date (after every batch of messages) and act."""
        if self._retry_at is not None and now < self._retry_at:
            return
        self._retry_at = None
        for eff in self.table.keep_alive.step(now, self.table.views()):
            if isinstance(eff, Sleep):
                detail = f" idle_s={eff.idle_s:.3f} keep_alive_s={eff.keep_alive_s:g}"
                done = self._sleep(eff.model, "keep_alive", detail)
            elif done := self._to_root(WakeWorker(model=eff.model)):
                held = len(self.table.models[eff.model].queue)
                log.info("event=load model=%s reason=keep_alive_wake held=%d", eff.model, held)
                self._count("models_reloaded")
            if not done:
                self.table.keep_alive.undo(eff)

    def next_deadline(self) -> float:
        """The next ``tick`` that has work of its own (a timer, or a retry)."""
        if self._retry_at is not None:
            return self._retry_at
        return self.table.keep_alive.next_deadline()

    def _sleep(self, model: str, reason: SleepReason, detail: str) -> bool:
        if not self._to_root(SleepWorker(model=model, reason=reason)):
            return False
        self.table.sleep(model)
        log.info("event=unload model=%s reason=%s%s", model, reason, detail)
        if reason == "keep_alive":
            self._count("keep_alive_unloads")
        return True

    def _to_root(self, msg: Msg) -> bool:
        try:
            self.control.send_multipart(encode(msg), zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("event=root_unreachable %s dropped: %s", type(msg).__name__, exc)
            self._retry_at = time.monotonic() + RETRY_S
            return False
        return True

    def _count(self, name: str) -> None:
        try:
            self.meta.send_multipart(encode(AddCounters(deltas={name: 1})), zmq.NOBLOCK)
        except zmq.ZMQError:
            log.debug("counter %s dropped (meta unreachable)", name)
