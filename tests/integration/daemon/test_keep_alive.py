"""keep_alive in a real daemon (stub models): idle models sleep, stay listed, wake warm.

Nothing here sleeps to wait: a test waits for the root's ``sleep`` event of the worker,
or polls ``list_models`` with a deadline for the state the router reports.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from erllama.protocol.codec import decode_result
from erllama.protocol.messages import (
    Complete,
    CompletionResult,
    ErrorReply,
    Evict,
    GetCounters,
    GetModelInfo,
    ListModels,
    ModelInfo,
    ModelStatus,
    Reply,
    RequestOptions,
    SleepModel,
    Unload,
)
from tests.support.daemon import Daemon, DaemonFactory, RawClient, stub_model, wait_until

pytestmark = pytest.mark.timeout(90)

PROMPT = "a system prompt long enough to be saved: " + "lorem ipsum dolor sit amet " * 4
CACHE = {"policy": {"min_tokens": 8, "cold_min_tokens": 8}}


def start(daemon_factory: DaemonFactory, *models: dict[str, Any]) -> tuple[Daemon, RawClient]:
    d = daemon_factory(list(models), cache=CACHE)
    return d, d.client()


def model(model_id: str, keep_alive_s: float) -> dict[str, Any]:
    return {**stub_model(model_id), "keep_alive_s": keep_alive_s}


def complete(c: RawClient, model_id: str, **opts: Any) -> CompletionResult:
    options = RequestOptions(response_tokens=4, **opts)
    r = c.call(Complete(model=model_id, prompt=PROMPT, options=options), timeout=30)
    assert isinstance(r, Reply), r
    return decode_result(r.result, CompletionResult)


def models(c: RawClient) -> dict[str, ModelInfo]:
    r = c.call(ListModels())
    assert isinstance(r, Reply), r
    return {m.id: m for m in decode_result(r.result, list[ModelInfo])}


def counters(c: RawClient) -> dict[str, int]:
    r = c.call(GetCounters())
    assert isinstance(r, Reply), r
    return decode_result(r.result, dict[str, int])


def state(c: RawClient, model_id: str) -> str:
    return models(c)[model_id].state


def log_count(d: Daemon, pattern: str) -> int:
    return len(re.findall(pattern, d.log_path.read_text(errors="replace")))


def test_idle_model_sleeps_stays_listed_and_wakes_warm(daemon_factory: DaemonFactory) -> None:
    d, c = start(daemon_factory, model("m1", 0.2))
    # idle since it became ready: asleep 0.2 s later, still registered
    d.wait_for_event("sleep", 15, child="worker.m1", reason="keep_alive")
    info = models(c)["m1"]
    assert (info.state, info.status, info.keep_alive_s) == ("sleeping", "sleeping", 0.2)
    r = c.call(GetModelInfo(model="m1"))
    assert isinstance(r, Reply) and decode_result(r.result, ModelInfo).state == "sleeping"
    wait_until(lambda: counters(c)["keep_alive_unloads"] >= 1, 5, what="the unload counted")
    assert log_count(d, r"event=unload model=m1 reason=keep_alive ") == 1
    # a request loads it again by itself
    base = counters(c)
    cold = complete(c, "m1")
    assert cold.reply and cold.cache_hit_kind == "cold"
    d.wait_for_event("wake", 5, child="worker.m1")
    wait_until(
        lambda: counters(c)["models_reloaded"] == base["models_reloaded"] + 1,
        5,
        what="the wake counted",
    )
    assert log_count(d, r"event=load model=m1 reason=keep_alive_wake") == 1
    # idle again after the request: asleep again; its shutdown saves are in by then
    d.wait_for_event("sleep", 15, child="worker.m1", reason="keep_alive")
    wait_until(lambda: state(c, "m1") == "sleeping", 5, what="m1 sleeping again")
    hits = counters(c)["hits_exact"]
    warm = complete(c, "m1")
    assert warm.cache_hit_kind == "exact", "the rows of the model hit warm after a wake"
    assert warm.reply == cold.reply
    after = counters(c)
    assert after["hits_exact"] == hits + 1
    assert after["models_reloaded"] == base["models_reloaded"] + 2
    assert after["keep_alive_unloads"] >= base["keep_alive_unloads"] + 1
    assert models(c)["m1"].restarts == 0


def test_request_keep_alive_zero_unloads_right_after(daemon_factory: DaemonFactory) -> None:
    d, c = start(daemon_factory, model("m1", 600.0))
    assert models(c)["m1"].unload_in_s is not None
    complete(c, "m1", keep_alive=0.0)
    finished = time.monotonic()
    d.wait_for_event("sleep", 10, child="worker.m1", reason="keep_alive")
    assert time.monotonic() - finished < 10  # far from the model's own 600 s
    assert state(c, "m1") == "sleeping"
    # the next request without keep_alive gets the model's own timer again
    complete(c, "m1")
    info = models(c)["m1"]
    assert info.state == "ready"
    assert info.unload_in_s is not None and info.unload_in_s > 500


def test_negative_keep_alive_never_unloads(daemon_factory: DaemonFactory) -> None:
    d, c = start(
        daemon_factory,
        model("forever", 0.2),  # its own timer is short, the request says never
        model("never", -1.0),  # the config says never
        model("short", 0.2),
    )
    complete(c, "forever", keep_alive=-1.0)
    complete(c, "short")
    # short went idle after forever did, with the same 0.2 s: once its timer has fired,
    # forever's would have too
    wait_until(lambda: state(c, "short") == "sleeping", 15, what="short asleep")
    now = models(c)
    assert (now["forever"].state, now["forever"].unload_in_s) == ("ready", None)
    assert (now["never"].state, now["never"].unload_in_s) == ("ready", None)
    assert log_count(d, r"event=unload model=never ") == 0
    assert complete(c, "never").reply


def test_housekeeping_does_not_wake_and_unload_removes_a_sleeping_model(
    daemon_factory: DaemonFactory,
) -> None:
    d, c = start(daemon_factory, model("m1", 0.0))
    d.wait_for_event("sleep", 15, child="worker.m1", reason="keep_alive")
    reloaded = counters(c)["models_reloaded"]
    r = c.call(ModelStatus(model="m1"))
    assert isinstance(r, Reply) and decode_result(r.result, str) == "idle"
    r = c.call(Evict(model="m1", release_context=True))
    assert isinstance(r, Reply) and decode_result(r.result, dict[str, bool]) == {"released": False}
    r = c.call(SleepModel(model="m1"))
    assert isinstance(r, Reply) and decode_result(r.result, bool) is False  # asleep already
    assert state(c, "m1") == "sleeping"
    assert counters(c)["models_reloaded"] == reloaded
    r = c.call(Unload(model="m1"), timeout=30)
    assert isinstance(r, Reply), r
    assert "m1" not in models(c)
    err = c.call(Complete(model="m1", prompt="x"))
    assert isinstance(err, ErrorReply) and err.code == "model_not_loaded"


def test_sleep_model_request_and_requests_held_while_it_stops(
    daemon_factory: DaemonFactory,
) -> None:
    # slow saves: the worker takes a while to stop, requests sent meanwhile are held
    slow = {**model("m1", 600.0), "stub": {"save_delay_ms": 300.0}}
    d, c = start(daemon_factory, slow)
    first = complete(c, "m1")
    r = c.call(SleepModel(model="m1"))
    assert isinstance(r, Reply) and decode_result(r.result, bool) is True
    assert state(c, "m1") == "sleeping", "held from the moment the router decided"
    again = complete(c, "m1")  # sent while the worker stops: woken at its exit
    assert again.reply == first.reply
    d.wait_for_event("sleep", 10, child="worker.m1", reason="request")
    d.wait_for_event("wake", 10, child="worker.m1")
    assert state(c, "m1") == "ready"
