"""The slot table: admission rules, release and the queue, sessions, and a state machine."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from erllama.protocol.errors import ErrorCode
from erllama.workers.slots import (
    MIN_LIVE,
    Assign,
    Mismatch,
    Queued,
    Reject,
    Reset,
    SlotTable,
    Started,
    transcript_check,
)

P = list(range(100, 100 + MIN_LIVE + 8))  # a prompt long enough for live reuse


def k(n: int) -> tuple[bytes, str]:
    return (b"c", f"r{n}")


def test_free_then_live_then_lru() -> None:
    t = SlotTable(2)
    assert t.admit(k(1), P, None, "block", 1.0) == Assign(0, 0, "free")
    assert t.admit(k(2), [1, 2, 3], None, "block", 2.0) == Assign(1, 0, "free")
    assert t.release(0, P, 5, 3.0) == []
    assert t.release(1, [1, 2, 3], 0, 4.0) == []
    # shares P's prefix: live on slot 0, its unsaved tail is cut -> save first
    assert t.admit(k(3), [*P[:-2], 7], None, "block", 5.0) == Assign(0, len(P) - 2, "live", True)
    # nothing shared with slot 1: no free slot, so the LRU idle one
    assert t.admit(k(4), [9] * 40, None, "block", 6.0) == Assign(1, 0, "lru", False)


def test_short_prompt_fully_shared_is_live() -> None:
    t = SlotTable(2)
    t.admit(k(1), [1, 2, 3], None, "block", 1.0)
    t.release(0, [1, 2, 3, 4], 0, 2.0)
    assert t.admit(k(2), [1, 2, 3], None, "block", 3.0) == Assign(0, 3, "live", False)
    t.release(0, [1, 2, 3], 0, 4.0)
    # a short shared prefix of a longer prompt is not worth reusing
    assert t.admit(k(3), [1, 2, *range(50, 90)], None, "block", 5.0) == Assign(1, 0, "free")


def test_sticky_wins_over_a_longer_live_prefix() -> None:
    t = SlotTable(3)
    t.admit(k(1), [5] * 40, "s", "block", 1.0)
    t.release(0, [5] * 40, 0, 2.0)
    t.admit(k(2), P, None, "block", 3.0)
    t.release(1, P, 0, 4.0)
    assert t.session_slot("s") == 0
    assert t.admit(k(3), P, "s", "block", 5.0) == Assign(0, 0, "sticky")


def test_sticky_busy_running_and_queued() -> None:
    t = SlotTable(1)
    t.admit(k(1), P, "s", "block", 1.0)
    r = t.admit(k(2), P, "s", "block", 2.0)
    assert isinstance(r, Reject) and r.code == ErrorCode.STICKY_BUSY
    t2 = SlotTable(1)
    t2.admit(k(1), P, None, "block", 1.0)
    assert t2.admit(k(2), P, "s", "block", 2.0) == Queued(1)
    r = t2.admit(k(3), P, "s", "block", 3.0)
    assert isinstance(r, Reject) and r.code == ErrorCode.STICKY_BUSY


def test_pinned_idle_slot_is_never_taken() -> None:
    t = SlotTable(1)
    t.admit(k(1), P, "s", "block", 1.0)
    t.release(0, P, 3, 2.0)
    assert t.available() == 0
    assert t.admit(k(2), P, None, "block", 3.0) == Queued(1)
    r = t.admit(k(3), P, None, "error", 3.0)
    assert isinstance(r, Reject) and r.code == ErrorCode.SEQ_CAPACITY
    # ending the session frees the slot: the queued request starts, live
    assert t.end_session("s", 4.0) == [Started(k(2), Assign(0, len(P), "live", False))]
    assert t.end_session("s", 5.0) is None


def test_release_starts_queued_in_fifo_order() -> None:
    t = SlotTable(1)
    t.admit(k(1), P, None, "block", 1.0)
    assert t.admit(k(2), [1] * 40, None, "block", 2.0) == Queued(1)
    assert t.admit(k(3), P, None, "block", 3.0) == Queued(2)
    assert t.queue_depth() == 2
    started = t.release(0, P, 0, 4.0)
    assert [s.key for s in started] == [k(2)]
    assert started[0].assign.reason == "lru"
    assert t.cancel_queued(k(3)) and not t.cancel_queued(k(3))
    assert t.release(0, [1] * 40, 0, 5.0) == []


def test_fail_slot_drops_kv_keeps_pin() -> None:
    t = SlotTable(2)
    t.admit(k(1), P, "s", "block", 1.0)
    assert t.fail_slot(0, 2.0) == []
    assert t.slots[0].tokens == [] and t.running() == 0
    assert t.session_slot("s") == 0


def test_reset_session() -> None:
    t = SlotTable(1)
    t.admit(k(1), P, "s", "block", 1.0)
    assert t.reset_session("s") == Reset(0, k(1))
    assert t.running() == 0 and t.session_slot("s") == 0
    assert t.reset_session("s") == Reset(0, None)
    assert t.reset_session("nope") is None
    t.end_session("s", 2.0)
    t.admit(k(2), P, None, "block", 3.0)
    t.admit(k(3), P, "q", "block", 3.0)
    assert t.reset_session("q") == Reset(None, k(3))
    assert t.queue_depth() == 0


def test_clear_all_keeps_pins() -> None:
    t = SlotTable(2)
    t.admit(k(1), P, "s", "block", 1.0)
    t.release(0, P, 4, 2.0)
    t.clear_all()
    assert t.slots[0].tokens == [] and t.slots[0].unsaved == 0
    assert t.session_slot("s") == 0


def test_transcript_check() -> None:
    assert transcript_check([1, 2, 3], [1, 2, 3]) is None
    assert transcript_check([1, 2, 3], [1, 2]) == Mismatch(3, 2, 2)
    assert transcript_check([1, 9], [1, 2, 3]) == Mismatch(2, 3, 1)


# ---------------------------------------------------------------- state machine
N = 3
PROMPTS = [tuple(P), tuple(P[:-4]), (1,) * 40, (1, 2, 3), (7,) * 36]
sess_st = st.sampled_from([None, None, "a", "b", "c", "d"])


class SlotMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.t = SlotTable(N)
        self.now = 0.0
        self.next = 0
        self.order: list[tuple[bytes, str]] = []  # model of the FIFO

    def tick(self) -> float:
        self.now += 1.0
        return self.now

    def started(self, out: list[Started]) -> None:
        n = len(out)
        assert [s.key for s in out] == self.order[:n], "queue not served FIFO"
        del self.order[:n]

    @rule(p=st.sampled_from(PROMPTS), sess=sess_st, on_full=st.sampled_from(["block", "error"]))
    def admit(self, p: tuple[int, ...], sess: str | None, on_full: str) -> None:
        self.next += 1
        key = k(self.next)
        had_available = self.t.available() > 0 and not self.order
        r = self.t.admit(
            key, list(p), sess, "block" if on_full == "block" else "error", self.tick()
        )
        if isinstance(r, Queued):
            self.order.append(key)
            assert r.position == len(self.order)
            assert not had_available
        elif isinstance(r, Assign):
            assert self.t.slots[r.slot].owner == key
            if r.reason != "sticky":
                assert had_available
        else:
            assert r.code in (ErrorCode.STICKY_BUSY, ErrorCode.SEQ_CAPACITY)

    @precondition(lambda self: self.t.running())
    @rule(data=st.data(), p=st.sampled_from(PROMPTS), unsaved=st.integers(0, 3))
    def release(self, data: st.DataObject, p: tuple[int, ...], unsaved: int) -> None:
        busy = [s.seq for s in self.t.slots if s.owner is not None]
        seq = data.draw(st.sampled_from(busy))
        self.started(self.t.release(seq, list(p), unsaved, self.tick()))

    @precondition(lambda self: self.t.running())
    @rule(data=st.data())
    def fail(self, data: st.DataObject) -> None:
        busy = [s.seq for s in self.t.slots if s.owner is not None]
        self.started(self.t.fail_slot(data.draw(st.sampled_from(busy)), self.tick()))

    @precondition(lambda self: self.order)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(self.order))
        assert self.t.cancel_queued(key)
        self.order.remove(key)

    @rule(sess=st.sampled_from(["a", "b", "c", "d"]))
    def end_session(self, sess: str) -> None:
        known = self.t.session_slot(sess) is not None
        out = self.t.end_session(sess, self.tick())
        assert (out is not None) == known
        if out is not None:
            self.started(out)

    @rule(sess=st.sampled_from(["a", "b", "c", "d"]))
    def reset_session(self, sess: str) -> None:
        r = self.t.reset_session(sess)
        if r is not None and r.slot is None:
            assert r.fail in self.order
            self.order.remove(r.fail)
        if r is not None and r.slot is not None:
            assert self.t.slots[r.slot].tokens == []

    @rule()
    def clear_all(self) -> None:
        self.t.clear_all()
        assert all(not s.tokens for s in self.t.slots)

    @invariant()
    def consistent(self) -> None:
        t = self.t
        owners = [s.owner for s in t.slots if s.owner is not None]
        queued = t.queued_keys()
        assert len(set(owners)) == len(owners), "a key runs on two slots"
        assert not set(owners) & set(queued), "a key both running and queued"
        assert queued == self.order
        assert t.running() == len(owners)
        for key in owners:
            seq = t.running_slot(key)
            assert seq is not None and t.slots[seq].owner == key
        for s in t.slots:
            if s.session_id is not None:
                assert t.session_slot(s.session_id) == s.seq
        pinned_idle = sum(1 for s in t.slots if s.owner is None and s.session_id is not None)
        assert t.available() + t.running() + pinned_idle == N
        if queued:
            assert t.available() == 0, "a request waits while a slot could take it"


TestSlotMachine = SlotMachine.TestCase
TestSlotMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
