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
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from erllama.supervisor.slot import Slot
from erllama.supervisor.tree import ChildState

if TYPE_CHECKING:
    from erllama.supervisor.daemon import Root

log = logging.getLogger(__name__)

# What ModelStateChanged can carry (the router needs no other words).
ROUTER_STATES = frozenset({"loading", "ready", "restarting", "failed", "unloaded", "sleeping"})


def sleep_worker(root: Root, slot: Slot, reason: str, now: float) -> None:
    """``SleepWorker``: stop a ready worker and keep its model registered."""
    if (
        root.exit_code is not None
        or slot.proc is None
        or slot.phase != "ready"
        or slot.tracker.state is not ChildState.RUNNING
    ):
        log.info("event=sleep_refused model=%s state=%s", slot.model_id, slot.model_state())
        resync(root, slot)
        return
    slot.sleep_reason = reason
    slot.wake_requested = False
    log.info("event=sleeping model=%s reason=%s", slot.model_id, reason)
    root.begin_stop(slot, now, root.sup.drain_timeout_s)


def wake_worker(root: Root, slot: Slot, now: float) -> None:
    """``WakeWorker``: start a sleeping worker again (or once it has finished stopping)."""
    if root.exit_code is not None:
        return
    if slot.asleep:
        _spawn_awake(root, slot, now)
    elif slot.sleep_reason is not None and not slot.unload_waiters:
        slot.wake_requested = True  # still stopping: woken at its exit
    else:
        resync(root, slot)


def after_stop(root: Root, slot: Slot, pid: int, now: float) -> bool:
    """A worker stopped by request has exited: True if its slot stays (asleep or woken)."""
    if slot.sleep_reason is None or slot.unload_waiters:
        slot.sleep_reason = None
        return False
    root.events.publish("sleep", slot.child_id, pid, reason=slot.sleep_reason)
    if slot.wake_requested and root.exit_code is None:
        _spawn_awake(root, slot, now)
    else:
        root.control.model_changed(slot, "sleeping")
    return True


def resync(root: Root, slot: Slot) -> None:
    """Tell the router the model's current state (it acted on an older one)."""
    state = slot.model_state()
    if state in ROUTER_STATES:
        root.control.model_changed(slot, state)


def _spawn_awake(root: Root, slot: Slot, now: float) -> None:
    slot.sleep_reason = None
    slot.wake_requested = False
    slot.tracker.on_wake()
    root.events.publish("wake", slot.child_id, None)
    if root.spawn(slot, now, waking=True):
        return
    # the process could not even be started: the tracker counted a failed start
    log.error("event=wake_failed model=%s reason=%s", slot.model_id, slot.last_exit)
    resync(root, slot)
