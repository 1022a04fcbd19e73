"""The models' keep-alive timers: pure state, the time passed in, effects out.

No sockets and no clock: ``router/sleep.py`` feeds it what the router's table
holds (``ModelView`` per model: its state, whether a request is in flight or
held) and the requests that use a model, and carries out what it returns
(``Sleep``: stop the worker, keep the model registered; ``Wake``: start it
again). Unit-tested with a fake clock in ``tests/unit/router/test_keepalive.py``.

The router owns the timers (not the root) because it alone sees every request
start and finish, and the keep_alive a request carries; the root only starts
and stops the worker when the router asks it to (docs/ARCHITECTURE.md).

Rules (Ollama's ``keep_alive``):

* A model is *idle* while it is ``ready`` with no request in flight and none held.
* An idle period starts when a model becomes idle after a request that used it
  (or after it became ready). Its length is the ``keep_alive`` of the last request
  that set one (``RequestOptions.keep_alive``: a ``complete``/``stream``/``infer``
  without it means the model's own ``keep_alive_s``), else the model's
  ``keep_alive_s``. ``None``, a negative value (or an infinite one): no timer, never
  put to sleep; ``0``: asleep as soon as idle.
* Housekeeping ops (``status``, ``evict``, ``shutdown``, ``cancel``) do not use the
  model: they neither restart the idle period nor wake a sleeping model; one in
  flight when the period ends defers the sleep until it is answered.
* When the period ends: ``Sleep(model)``, once per period.
* A ``sleeping`` model that has requests held: ``Wake(model)``, once per sleep.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

INF = math.inf


def period_s(keep_alive: float | None) -> float | None:
    """A keep_alive value as the length of an idle period; None: never."""
    if keep_alive is None or math.isnan(keep_alive) or keep_alive < 0 or keep_alive == INF:
        return None
    return float(keep_alive)


@dataclass(frozen=True, slots=True)
class ModelView:
    """What the timers need to know about one model of the table."""

    model: str
    state: str  # the table's state word: loading | ready | restarting | sleeping | ...
    busy: bool  # a request is in flight at the worker or held by the router
    keep_alive_s: float | None  # the model's own (ModelSpec.keep_alive_s)


@dataclass(frozen=True, slots=True)
class Sleep:
    """The model's idle period ended: stop its worker, keep it registered."""

    model: str
    idle_s: float
    keep_alive_s: float


@dataclass(frozen=True, slots=True)
class Wake:
    """A sleeping model has requests held: start its worker again."""

    model: str


Effect = Sleep | Wake


@dataclass(slots=True)
class _Timer:
    keep_alive: float | None = None  # the last request's; None: the model's own
    used: bool = False  # a request used the model since the period started
    idle: bool = False  # ready and not busy at the last step
    started: float | None = None  # start of the current idle period
    period: float | None = None  # its length (None: never)
    deadline: float | None = None  # when it ends (None: no timer, or it fired)
    woken: bool = False  # Wake sent during this sleep


class KeepAlive:
    """Keep-alive state of every model the router knows."""

    def __init__(self) -> None:
        self.timers: dict[str, _Timer] = {}

    # ================================================================ inputs
    def used(self, model: str) -> None:
        """A request that uses the model arrived: the next idle period starts afresh."""
        self.timers.setdefault(model, _Timer()).used = True

    def set_keep_alive(self, model: str, keep_alive: float | None) -> None:
        """The keep_alive of a request that carries the option field (None: the model's)."""
        self.timers.setdefault(model, _Timer()).keep_alive = keep_alive

    def step(self, now: float, views: Iterable[ModelView]) -> list[Effect]:
        """Bring every timer up to date with the table at ``now``; what to do now."""
        out: list[Effect] = []
        seen: set[str] = set()
        for v in views:
            seen.add(v.model)
            t = self.timers.setdefault(v.model, _Timer())
            t.idle = v.state == "ready" and not v.busy
            if v.state != "ready":
                t.started = t.period = t.deadline = None
            elif t.idle and (t.started is None or t.used):
                t.used = False
                t.started = now
                t.period = period_s(v.keep_alive_s if t.keep_alive is None else t.keep_alive)
                t.deadline = None if t.period is None else now + t.period
            if t.idle and t.deadline is not None and now >= t.deadline:
                assert t.started is not None and t.period is not None
                out.append(Sleep(v.model, now - t.started, t.period))
                t.deadline = None
            if v.state != "sleeping":
                t.woken = False
            elif v.busy and not t.woken:
                t.woken = True
                out.append(Wake(v.model))
        for gone in set(self.timers) - seen:
            del self.timers[gone]
        return out

    def undo(self, eff: Effect) -> None:
        """``eff`` could not be carried out (the root was unreachable): ``step`` returns it
        again, once the model is still idle (``Sleep``) or still has requests held (``Wake``)."""
        t = self.timers.get(eff.model)
        if t is None:
            return
        if isinstance(eff, Wake):
            t.woken = False
        elif t.started is not None and t.period is not None:
            t.deadline = t.started + t.period

    # ================================================================ queries
    def next_deadline(self) -> float:
        """When ``step`` next has something to do by itself (INF: only on new input)."""
        return min(
            (t.deadline for t in self.timers.values() if t.idle and t.deadline is not None),
            default=INF,
        )

    def unload_in(self, model: str, now: float) -> float | None:
        """Seconds until the model's timer fires; None while none runs."""
        t = self.timers.get(model)
        if t is None or not t.idle or t.deadline is None:
            return None
        return max(0.0, t.deadline - now)

    def may_sleep(self, model: str) -> bool:
        """Idle with a timer running: memory pressure may put it to sleep early."""
        t = self.timers.get(model)
        return t is not None and t.idle and t.deadline is not None
