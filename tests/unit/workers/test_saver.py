"""The asynchronous save writer: bounded byte queue, overflow policy, flush, close."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping

import pytest

from erllama.cache.kvc import KvcMeta, SaveReason
from erllama.workers.saver import MetaBreaker, SaveJob, Saver

pytestmark = pytest.mark.timeout(30)


def job(n: int, reason: SaveReason, size: int = 40) -> SaveJob:
    meta = KvcMeta(
        save_reason=reason,
        quant_bits=16,
        context_size=64,
        fingerprint=b"\x01" * 32,
        fingerprint_mode=0,
        quant=1,
        ctx_hash=b"\x02" * 32,
        tokens=bytes(4 * n),
    )
    return SaveJob(key=bytes([n]) * 32, meta=meta, payload=b"x" * size)


class GatedWriter:
    """Blocks each write until the test opens the gate."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self.written: list[bytes] = []
        self.counters: Counter[str] = Counter()
        self.fail_next = False
        self.closed = False

    def write(self, j: SaveJob) -> tuple[str, str]:
        self.started.set()
        assert self.gate.wait(10)
        if self.fail_next:
            self.fail_next = False
            raise OSError("disk on fire")
        self.written.append(j.key)
        return "fired", ""

    def add_counters(self, deltas: Mapping[str, int]) -> None:
        self.counters.update(deltas)

    def close(self) -> None:
        self.closed = True


def make(limit: int = 100) -> tuple[Saver, GatedWriter, list[SaveJob]]:
    w = GatedWriter()
    done: list[SaveJob] = []
    s = Saver(lambda: w, queue_bytes=limit, on_done=done.append)
    s.start()
    return s, w, done


def test_overflow_drops_oldest_continued_then_refuses() -> None:
    s, w, done = make()
    first = job(1, SaveReason.COLD)
    assert s.submit(first).accepted
    assert w.started.wait(5)  # in flight, its 40 bytes still count
    cont = job(2, SaveReason.CONTINUED)
    assert s.submit(cont).accepted
    cold = job(3, SaveReason.COLD)
    res = s.submit(cold)
    assert res.accepted and res.dropped == 1
    assert cont.status == "dropped" and cont.done.is_set()
    late = job(4, SaveReason.FINISH)
    res = s.submit(late)
    assert not res.accepted and res.dropped == 1 and late.status == "dropped"
    huge = job(5, SaveReason.FINISH, size=1000)
    assert not s.submit(huge).accepted
    w.gate.set()
    assert s.flush(5)
    assert w.written == [first.key, cold.key]
    assert first.landed and cold.landed and s.queued_bytes == 0
    assert {j.key for j in done} == {first.key, cont.key, cold.key}
    s.close()
    assert w.closed


def test_writer_exception_is_a_dropped_save() -> None:
    s, w, _ = make()
    w.fail_next = True
    w.gate.set()
    bad, good = job(1, SaveReason.COLD), job(2, SaveReason.COLD)
    s.submit(bad)
    s.submit(good)
    assert s.flush(5)
    assert bad.status == "dropped" and good.status == "fired"
    assert w.counters["saves_dropped"] == 1
    s.close()


def test_close_writes_what_is_queued() -> None:
    s, w, _ = make(limit=1000)
    jobs = [job(i, SaveReason.CONTINUED) for i in range(5)]
    for j in jobs:
        assert s.submit(j).accepted
    w.gate.set()
    s.close(timeout_s=5)
    assert all(j.landed for j in jobs)
    after = job(9, SaveReason.FINISH)
    assert not s.submit(after).accepted


def test_close_timeout_abandons_the_rest() -> None:
    s, w, _ = make(limit=1000)
    jobs = [job(i, SaveReason.COLD) for i in range(3)]
    for j in jobs:
        s.submit(j)
    assert w.started.wait(5)
    s.close(timeout_s=0.0)
    assert [j.status for j in jobs[1:]] == ["dropped", "dropped"]
    w.gate.set()
    assert jobs[0].done.wait(5)


def test_breaker_backoff() -> None:
    now = [0.0]
    b = MetaBreaker("t", clock=lambda: now[0])
    assert not b.is_open()
    b.failed("x")
    assert b.is_open()
    now[0] = 1.5
    assert not b.is_open()
    b.failed("x")  # 2 s now
    now[0] = 3.0
    assert b.is_open()
    b.ok()
    now[0] = 10.0
    b.failed("x")  # back to 1 s after a success
    now[0] = 11.1
    assert not b.is_open()
