"""The root's start order as a pure state machine."""

from __future__ import annotations

import pytest

from erllama.supervisor.boot import BootOrder, installed

pytestmark = pytest.mark.timeout(10)


def test_full_order_then_up_once_no_worker_is_starting() -> None:
    asked: list[bool] = []
    b = BootOrder(scheduler=lambda: asked.append(True) or True, gateway=True)
    assert b.advance(set()) is None
    assert b.advance({"meta"}) == "router"
    assert not asked, "the scheduler is looked up when the router is ready"
    assert b.advance({"meta"}) is None
    assert b.advance({"meta", "router"}) == "scheduler" and asked == [True]
    assert b.advance({"meta", "router", "scheduler"}) == "gateway"
    assert not b.up(lambda cid: False), "not up before the workers stage"
    assert b.advance({"meta", "router", "scheduler", "gateway"}) == "workers"
    b.workers += ["worker.a", "worker.b"]
    assert not b.up(lambda cid: cid == "worker.b")
    assert b.up(lambda cid: False) and b.stage == "up"
    assert not b.up(lambda cid: False), "up only once"
    assert b.advance({"meta", "router", "scheduler", "gateway"}) is None


def test_no_scheduler_and_no_gateway_go_straight_to_the_workers() -> None:
    b = BootOrder(scheduler=lambda: False, gateway=False)
    b.advance({"meta"})
    assert b.advance({"meta", "router"}) == "workers"
    assert b.up(lambda cid: True), "no configured models: up at once"
    b = BootOrder(scheduler=lambda: True, gateway=False)
    b.advance({"meta"})
    b.advance({"router"})
    assert b.advance({"scheduler"}) == "workers"


def test_installed() -> None:
    assert installed("erllama.supervisor.boot")
    assert not installed("erllama.no_such_module")
    assert not installed("no_such_package.child")
