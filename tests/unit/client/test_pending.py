"""The client's IO-free halves: the ``Pending`` table and the exchanges (``Unary``, ``Draft``)."""

from __future__ import annotations

import asyncio
import collections
import threading

import msgspec
import pytest

from erllama.client._core import Draft, Unary
from erllama.client.pending import Item, Pending
from erllama.client.requests import Call
from erllama.protocol.errors import (
    DaemonUnavailableError,
    ErllamaError,
    ErrorCode,
    RequestTimeoutError,
    UnknownModelError,
)
from erllama.protocol.messages import Complete, DoneEvent, ErrorReply, ListModels, Reply, TokenEvent

from .fake_router import stats

pytestmark = pytest.mark.timeout(30)

Box = collections.deque[Item]


def table() -> Pending[Box]:
    return Pending(collections.deque, collections.deque.append)


def token(rid: str, token_id: int) -> TokenEvent:
    return TokenEvent(request_id=rid, seq=token_id, text="x", token_id=token_id)


def done(rid: str) -> DoneEvent:
    return DoneEvent(request_id=rid, seq=9, stats=stats(1, 2))


# ================================================================ Pending
def test_delivers_to_pending_requests_and_drops_the_rest() -> None:
    t = table()
    t.add("a", cancellable=False)
    assert t.deliver("a", token("a", 1))
    assert not t.deliver("b", token("b", 2))  # never added: dropped
    assert [m.request_id for m in t.box("a")] == ["a"]
    t.forget("a")
    assert not t.deliver("a", token("a", 3))  # forgotten: dropped
    with pytest.raises(RuntimeError, match="not pending"):
        t.box("a")
    t.forget("a")  # idempotent


def test_fail_all_gives_each_waiter_its_own_error() -> None:
    t = table()
    t.add("a", cancellable=False)
    t.add("b", cancellable=True)
    t.fail_all(lambda: DaemonUnavailableError("gone"))
    a, b = t.box("a")[0], t.box("b")[0]
    assert isinstance(a, DaemonUnavailableError) and isinstance(b, DaemonUnavailableError)
    assert a is not b


def test_close_returns_abandoned_then_cancellable_and_keeps_the_inboxes() -> None:
    t = table()
    t.add("plain", cancellable=False)
    t.add("c1", cancellable=True)
    t.add("c2", cancellable=True)
    t.abandon("gone")
    to_cancel = t.close()
    assert to_cancel[0] == "gone" and sorted(to_cancel[1:]) == ["c1", "c2"]
    assert t.close() == []  # cancellation is tracked no more
    assert t.ids() == ["plain", "c1", "c2"]  # inboxes stay until clear (waiters are woken first)
    t.clear()
    assert t.ids() == []


def test_forget_drops_the_cancellable_mark() -> None:
    t = table()
    t.add("a", cancellable=True)
    t.forget("a")
    assert t.close() == []


def test_take_abandoned_forgets_each_and_returns_it_once() -> None:
    t = table()
    for rid in ("a", "b", "c"):
        t.add(rid, cancellable=True)
    t.abandon("b")
    t.abandon("a")
    assert t.take_abandoned() == ["b", "a"]
    assert t.take_abandoned() == []
    assert t.ids() == ["c"]
    assert t.close() == ["c"]


def test_abandon_from_other_threads_is_taken_by_the_owner() -> None:
    t = table()
    rids = [f"r{i}" for i in range(200)]
    for rid in rids:
        t.add(rid, cancellable=True)
    threads = [
        threading.Thread(target=lambda part=rids[i::4]: [t.abandon(r) for r in part])
        for i in range(4)
    ]
    taken: list[str] = []
    for th in threads:
        th.start()
    while any(th.is_alive() for th in threads) or t.ids():
        taken += t.take_abandoned()
    for th in threads:
        th.join(5)
    assert sorted(taken) == sorted(rids)


def test_an_async_inbox_wakes_its_waiter() -> None:
    async def main() -> Item:
        t: Pending[asyncio.Queue[Item]] = Pending(asyncio.Queue, asyncio.Queue.put_nowait)
        t.add("a", cancellable=False)
        waiter = asyncio.ensure_future(t.box("a").get())
        await asyncio.sleep(0)
        t.deliver("a", done("a"))
        return await asyncio.wait_for(waiter, 5)

    assert isinstance(asyncio.run(main()), DoneEvent)


# ================================================================ exchanges
def list_call() -> Call[list[str]]:
    def parse(raw: msgspec.Raw) -> list[str]:
        return list(msgspec.msgpack.decode(raw, type=list[str]))

    return Call(ListModels(request_id="u"), parse)


def test_unary_ignores_stream_events_and_ends_at_the_terminal_reply() -> None:
    ex = Unary(list_call(), timeout_s=None)
    assert not ex.feed(token("u", 1))
    assert not ex.ended
    assert ex.feed(Reply(request_id="u", result=msgspec.Raw(msgspec.msgpack.encode(["m"]))))
    assert ex.ended and ex.value == ["m"]


def test_unary_error_reply_raises_and_has_ended() -> None:
    ex = Unary(list_call(), timeout_s=1.0)
    err = ErrorReply(request_id="u", code=ErrorCode.NOT_FOUND, message="no such model")
    with pytest.raises(UnknownModelError):
        ex.feed(err)
    assert ex.ended  # nothing to cancel
    timeout = RequestTimeoutError("late")
    assert ex.timed_out(timeout) is timeout


def test_draft_collects_token_ids_until_done() -> None:
    ex = Draft(Complete(request_id="d", model="m", mode="infer"), timeout_s=0.5)
    assert ex.cancellable
    assert not ex.feed(token("d", 5))
    assert not ex.feed(token("d", 7))
    assert not ex.ended
    assert ex.feed(done("d"))
    assert ex.ended and ex.value == [5, 7]
    late = ex.timed_out(RequestTimeoutError("late"))
    assert isinstance(late, RequestTimeoutError) and late.code == ErrorCode.TIMEOUT
    assert "0.5 s" in late.message


def test_draft_error_event_raises_mapped_and_has_ended() -> None:
    ex = Draft(Complete(request_id="d", model="m", mode="infer"), timeout_s=30.0)
    err = ErrorReply(request_id="d", code=ErrorCode.WORKER_CRASHED, message="boom")
    with pytest.raises(ErllamaError) as info:
        ex.feed(err)
    assert info.value.code == ErrorCode.WORKER_CRASHED
    assert ex.ended
