"""The keep-alive timers (router/keepalive.py) with a fake clock, and the table's sleeping state."""

from __future__ import annotations

import math
import time

import msgspec
import pytest

from erllama.router.keepalive import INF, KeepAlive, ModelView, Sleep, Wake, period_s
from erllama.router.table import Admit, ModelTable

from .test_table import A, changed, info

pytestmark = pytest.mark.timeout(10)


def view(model: str = "m", state: str = "ready", busy: bool = False, ka: float | None = 5.0):
    return ModelView(model, state, busy, ka)


def test_period_of_keep_alive_values() -> None:
    assert period_s(300) == 300.0
    assert period_s(0) == 0.0
    assert period_s(None) is None
    assert period_s(-1) is None
    assert period_s(math.inf) is None
    assert period_s(math.nan) is None


def test_idle_model_sleeps_once_after_its_keep_alive() -> None:
    k = KeepAlive()
    assert k.step(100.0, [view()]) == []  # idle from 100: the period starts
    assert k.next_deadline() == 105.0
    assert k.unload_in("m", 101.0) == 4.0
    assert k.step(104.9, [view()]) == []
    assert k.step(105.0, [view()]) == [Sleep("m", 5.0, 5.0)]
    assert k.step(106.0, [view()]) == [], "fires once per idle period"
    assert k.next_deadline() == INF
    assert k.unload_in("m", 106.0) is None


def test_a_request_restarts_the_idle_period() -> None:
    k = KeepAlive()
    k.step(0.0, [view()])
    k.used("m")
    assert k.step(4.0, [view(busy=True)]) == []
    assert k.next_deadline() == INF, "no timer while a request is in flight"
    assert k.step(20.0, [view(busy=True)]) == [], "a long request is no idle time"
    assert k.step(21.0, [view()]) == []  # it finished: a new period from 21
    assert k.step(25.9, [view()]) == []
    assert k.step(26.0, [view()]) == [Sleep("m", 5.0, 5.0)]


def test_request_keep_alive_overrides_for_the_period_after_it() -> None:
    k = KeepAlive()
    k.used("m")
    k.set_keep_alive("m", 0.0)
    k.step(0.0, [view(busy=True)])
    assert k.step(1.0, [view()]) == [Sleep("m", 0.0, 0.0)], "0: asleep as soon as idle"
    # the next request without keep_alive: the model's own again
    k.step(2.0, [view(state="loading")])
    k.used("m")
    k.set_keep_alive("m", None)
    k.step(3.0, [view(busy=True)])
    assert k.step(4.0, [view()]) == []
    assert k.unload_in("m", 4.0) == 5.0


def test_negative_keep_alive_never_sleeps() -> None:
    k = KeepAlive()
    k.used("m")
    k.set_keep_alive("m", -1.0)
    k.used("n")
    k.step(0.0, [view(busy=True), view("n", busy=True, ka=0.5)])
    assert k.step(1.0, [view(), view("n", ka=0.5)]) == []
    assert k.step(1.5, [view(), view("n", ka=0.5)]) == [Sleep("n", 0.5, 0.5)]
    assert k.step(1e6, [view(), view("n", state="sleeping", ka=0.5)]) == []
    assert k.unload_in("m", 1e6) is None and not k.may_sleep("m")
    # a model whose own keep_alive is never
    k2 = KeepAlive()
    assert k2.step(0.0, [view(ka=None), view("x", ka=-1.0)]) == []
    assert k2.step(1e9, [view(ka=None), view("x", ka=-1.0)]) == []
    assert k2.next_deadline() == INF


def test_last_request_sets_the_keep_alive() -> None:
    k = KeepAlive()
    k.used("m")
    k.set_keep_alive("m", 60.0)
    k.used("m")
    k.set_keep_alive("m", 2.0)  # a second request, still in flight with the first
    k.step(0.0, [view(busy=True)])
    k.step(10.0, [view()])
    assert k.unload_in("m", 10.0) == 2.0


def test_housekeeping_in_flight_defers_but_does_not_restart() -> None:
    k = KeepAlive()
    k.step(0.0, [view()])
    # an evict/status op is in flight (busy, but no used())
    assert k.step(3.0, [view(busy=True)]) == []
    assert k.step(6.0, [view(busy=True)]) == [], "no sleep while anything is in flight"
    assert k.next_deadline() == INF, "the loop does not spin on a passed deadline"
    assert k.step(6.5, [view()]) == [Sleep("m", 6.5, 5.0)], "the old period, not a new one"


def test_not_ready_models_have_no_timer_and_start_fresh_when_ready() -> None:
    k = KeepAlive()
    k.step(0.0, [view(state="loading")])
    assert k.next_deadline() == INF
    assert k.step(100.0, [view(state="restarting")]) == []
    assert k.step(200.0, [view()]) == []
    assert k.next_deadline() == 205.0


def test_sleeping_model_with_held_requests_wakes_once() -> None:
    k = KeepAlive()
    assert k.step(0.0, [view(state="sleeping")]) == []
    assert k.step(1.0, [view(state="sleeping", busy=True)]) == [Wake("m")]
    assert k.step(2.0, [view(state="sleeping", busy=True)]) == [], "one wake per sleep"
    assert k.step(3.0, [view(state="loading", busy=True)]) == []
    assert k.step(4.0, [view(state="sleeping", busy=True)]) == [Wake("m")], "a new sleep"


def test_undo_gives_the_effect_back() -> None:
    k = KeepAlive()
    k.step(0.0, [view()])
    sleep = k.step(5.0, [view()])
    assert sleep == [Sleep("m", 5.0, 5.0)]
    k.undo(sleep[0])
    assert k.step(5.1, [view()]) == [Sleep("m", 5.1, 5.0)]
    wake = k.step(6.0, [view(state="sleeping", busy=True)])
    assert wake == [Wake("m")]
    k.undo(wake[0])
    assert k.step(6.1, [view(state="sleeping", busy=True)]) == [Wake("m")]


def test_may_sleep_only_idle_with_a_timer() -> None:
    k = KeepAlive()
    k.step(0.0, [view(), view("b", busy=True), view("c", ka=-1.0)])
    assert k.may_sleep("m")
    assert not k.may_sleep("b") and not k.may_sleep("c") and not k.may_sleep("nope")


def test_forgotten_models_drop_their_timers() -> None:
    k = KeepAlive()
    k.step(0.0, [view(), view("n")])
    k.step(1.0, [view()])
    assert set(k.timers) == {"m"}


# ---------------------------------------------------------------- the table's part
def test_table_holds_requests_for_a_sleeping_model_and_flushes_at_ready() -> None:
    t = ModelTable()
    t.load([info("m")])
    t.sleep("m")
    assert t.models["m"].state == "sleeping"
    assert t.admit("m", A, "r1", b"body").action is Admit.HOLD
    assert [v.busy for v in t.views()] == [True]
    assert t.model_info("m").state == "sleeping"  # type: ignore[union-attr]
    t.on_state(changed("m", "sleeping"))
    assert t.models["m"].queue, "still held while asleep"
    t.on_state(changed("m", "loading"))
    flush, fails = t.on_state(changed("m", "ready"))
    assert [p.request_id for p in flush] == ["r1"] and fails == []


def test_table_shows_the_countdown() -> None:
    t = ModelTable()
    t.load([msgspec.structs.replace(info("m"), keep_alive_s=1000.0)])
    assert t.model_info("m").unload_in_s is None  # type: ignore[union-attr]
    t.keep_alive.step(time.monotonic(), t.views())
    left = t.model_info("m").unload_in_s  # type: ignore[union-attr]
    assert left is not None and 990.0 < left <= 1000.0
