"""The root's part of keep_alive: stop a worker to sleep, keep its slot, start it on a wake.

The router owns the timers (``router/keepalive.py``) and asks, over control:

* ``SleepWorker(model, reason)``: a ready worker is stopped exactly as an unload
  stops it (``Stop(drain)``, shutdown saves, then SIGTERM/SIGKILL past the
  deadlines), but when it has exited its slot stays: the model is ``sleeping``
  (``ModelStateChanged``, event ``sleep``), keeps its spec, LoRA adapters and
  restart history, and still lists. Its cache rows stay as every row does.
* ``WakeWorker(model)``: a sleeping worker is spawned again (event ``wake``, then
  ``spawn``; state ``loading``, then ``ready``). A wake that arrives while the
  worker is still stopping to sleep is remembered and done at the exit.

A request the root cannot act on (the model is restarting, unloading, failed, the
daemon is stopping) is answered with the model's current state, so the router's
table never stays on a guess. An ``Unload`` of a sleeping model removes it at once
(``control.py``); one that arrives while it stops to sleep wins over the sleep.
Neither a sleep nor a wake counts as a restart.

Pure decisions over one slot: each function returns the effects the root carries
out (``effects.py``); nothing here sends, spawns or signals.
"""

from __future__ import annotations

import logging

from erllama.supervisor.effects import BeginStop, Effect, Publish, Spawn, Tell
from erllama.supervisor.slot import Slot
from erllama.supervisor.tree import ChildState

log = logging.getLogger(__name__)

# What ModelStateChanged can carry (the router needs no other words).
ROUTER_STATES = frozenset({"loading", "ready", "restarting", "failed", "unloaded", "sleeping"})


def sleep_worker(slot: Slot, reason: str, *, stopping: bool) -> list[Effect]:
    """``SleepWorker``: stop a ready worker and keep its model registered."""
    if (
        stopping
        or slot.proc is None
        or slot.phase != "ready"
        or slot.tracker.state is not ChildState.RUNNING
    ):
        log.info("event=sleep_refused model=%s state=%s", slot.model_id, slot.model_state())
        return resync(slot)
    slot.sleep_reason = reason
    slot.wake_requested = False
    log.info("event=sleeping model=%s reason=%s", slot.model_id, reason)
    return [BeginStop(slot)]


def wake_worker(slot: Slot, *, stopping: bool) -> list[Effect]:
    """``WakeWorker``: start a sleeping worker again (or once it has finished stopping)."""
    if stopping:
        return []
    if slot.asleep:
        return _wake(slot)
    if slot.sleep_reason is not None and not slot.unload_waiters:
        slot.wake_requested = True  # still stopping: woken at its exit
        return []
    return resync(slot)


def after_stop(slot: Slot, pid: int, *, stopping: bool) -> list[Effect] | None:
    """A worker stopped by request has exited: its effects if the slot stays (asleep or
    woken), None if it goes."""
    if slot.sleep_reason is None or slot.unload_waiters:
        slot.sleep_reason = None
        return None
    effects: list[Effect] = [Publish("sleep", slot.child_id, pid, {"reason": slot.sleep_reason})]
    if slot.wake_requested and not stopping:
        return effects + _wake(slot)
    return [*effects, Tell(slot, "sleeping")]


def resync(slot: Slot) -> list[Effect]:
    """Tell the router the model's current state (it acted on an older one)."""
    state = slot.model_state()
    return [Tell(slot, state)] if state in ROUTER_STATES else []


def _wake(slot: Slot) -> list[Effect]:
    slot.sleep_reason = None
    slot.wake_requested = False
    slot.tracker.on_wake()
    return [Publish("wake", slot.child_id, None), Spawn(slot, waking=True)]
