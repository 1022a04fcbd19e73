"""What the root's pure decisions return: the effects ``daemon.Root`` carries out, in order.

``table.SlotTable`` (load, unload, worker ready / exit, daemon stop) and
``sleeping`` (sleep, wake) decide over slots and return lists of these; only the
root touches sockets and processes. No sockets, no I/O here.

* ``Answer(waiter, ...)``: reply to a tree op (``code`` empty: ok, with ``result``).
* ``Spawn(slot, waking)``: start a worker a ``LoadModel`` added; if the process
  cannot even be started, the model is forgotten again (``SlotTable.remove``). With
  ``waking``: a sleeping worker woken; if it cannot be started, the router is told
  the model's state (``sleeping.resync``).
* ``BeginStop(slot)``: stop a worker by request (``Stop(drain)``, SIGTERM, SIGKILL).
* ``Publish(word, child_id, pid, fields)``: a lifecycle event (``events.py``).
* ``Tell(slot, state)``: ``ModelStateChanged`` to the router.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from erllama.supervisor.slot import Slot, Waiter


@dataclass(frozen=True, slots=True)
class Answer:
    waiter: Waiter
    code: str = ""  # empty: ok
    message: str = ""
    result: Any = None


@dataclass(frozen=True, slots=True)
class Spawn:
    slot: Slot
    waking: bool = False  # a sleeping worker's wake ("loading", not "restarting")


@dataclass(frozen=True, slots=True)
class BeginStop:
    slot: Slot


@dataclass(frozen=True, slots=True)
class Publish:
    word: str
    child_id: str
    pid: int | None = None
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Tell:
    slot: Slot
    state: str


Effect = Answer | Spawn | BeginStop | Publish | Tell
