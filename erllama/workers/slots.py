"""Which sequence of the llama context serves which request: slots, session pins, the FIFO.

Pure decisions, no backend, no sockets, no clock (every ``now`` is passed in, a
``time.monotonic()`` value): the engine asks, acts on the answer (restore,
truncate, save, prefill) and reports back with ``release`` / ``fail_slot``.

A context with ``n_seq_max = N`` has N slots (sequence ids ``0..N-1``). Each slot
mirrors what its KV holds (``tokens``), how much of that is not known cached
(``unsaved``), when it was last used, its running request (``owner``) and the
session pinned to it (``session_id``).

Rules of ``admit`` (first that applies):

1. ``sticky``: the request's session is pinned to an idle slot -> that slot, even
   if another slot shares a longer prefix (the session's own KV is the one it
   continues). Its pinned slot busy, or a request of the session already queued
   -> ``Reject(sticky_busy)``. A sticky request may pass the queue: nobody queued
   can take a pinned slot.
2. Requests already wait -> this one waits behind them (FIFO), or
   ``Reject(seq_capacity)`` with ``on_full="error"``.
3. Among idle *unpinned* slots: ``live``, the one sharing the longest common
   prefix with the prompt, when that is at least ``min(MIN_LIVE, len(prompt))``
   (ties: the least tail lost, then the lowest slot); else ``free``, an empty
   one; else ``lru``, the least recently used. ``evict_save`` says the engine
   must save the slot's unsaved tokens first (``lru``, or ``live`` cutting a tail).
4. None -> ``Queued`` (``on_full="block"``) or ``Reject(seq_capacity)``.

A request with a session pins the slot it is assigned to (unless already pinned).
A pinned slot is reserved for its session: never taken by ``live``, ``free`` or
``lru`` for another request, and not counted in ``available()`` (upstream's
``available_seqs``). So when every idle slot is pinned the request waits: evicting
a session's KV behind its back would turn its next turn into a cold prefill, which
is worse than a wait the client chose (``on_full``); ``end_session`` frees the pin.
Alternative turned down: LRU-evict pinned idle slots (upstream never does).

Consequence, checked by the state machine test: requests wait only while no idle
unpinned slot exists (a queued request's session is never pinned, rule 1), so
the queue is served strictly FIFO by ``release`` / ``fail_slot`` /
``end_session``, each returning the ``Started`` requests.

``clear_all`` (adapter change, context reset) drops every slot's KV mirror and
keeps the pins and owners, as upstream does on a context reset: a session keeps
its slot and continues from an empty KV. ``reset_session`` does the same for one
session and hands back the running request to fail with ``engine_reset``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from erllama.protocol.errors import ErrorCode

MIN_LIVE = 32  # the live KV of another prompt is reused only from this many shared tokens

Key = tuple[bytes, str]  # (client identity, request id)
Reason = Literal["sticky", "live", "free", "lru"]
OnFull = Literal["block", "error"]


@dataclass(eq=False, slots=True)
class Slot:
    """One sequence of the context (read it; only ``SlotTable`` changes it)."""

    seq: int
    tokens: list[int] = field(default_factory=list)
    session_id: str | None = None
    owner: Key | None = None
    last_used: float = 0.0
    unsaved: int = 0


@dataclass(frozen=True, slots=True)
class Assign:
    """Serve the request on ``slot``; ``live_common`` of its tokens are already in the KV."""

    slot: int
    live_common: int
    reason: Reason
    evict_save: bool = False


@dataclass(frozen=True, slots=True)
class Queued:
    position: int  # 1 = next to start


@dataclass(frozen=True, slots=True)
class Reject:
    code: ErrorCode
    message: str


@dataclass(frozen=True, slots=True)
class Started:
    """A queued request that now has a slot."""

    key: Key
    assign: Assign


@dataclass(frozen=True, slots=True)
class Reset:
    """``reset_session``: the session's slot (None if it only had a queued request)
    and the request to fail with ``engine_reset`` (None if none)."""

    slot: int | None
    fail: Key | None


@dataclass(frozen=True, slots=True)
class Mismatch:
    stored_len: int
    expected_len: int
    diverge_at: int


@dataclass(frozen=True, slots=True)
class _Waiting:
    key: Key
    prompt: tuple[int, ...]
    session_id: str | None


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    # compare in blocks first: cheap for the long shared prefixes of chat turns
    step = 256
    while i + step <= n and a[i : i + step] == b[i : i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


def transcript_check(stored: list[int], expected: list[int]) -> Mismatch | None:
    """``continue_``'s ``expect_committed``: None when the transcripts are equal."""
    if stored == expected:
        return None
    return Mismatch(len(stored), len(expected), common_prefix(stored, expected))


class SlotTable:
    """The N slots of one context and the FIFO of its waiting requests (module docstring).

    Args:
        n_seq: the context's ``n_seq_max`` (>= 1).
    """

    def __init__(self, n_seq: int) -> None:
        if n_seq < 1:
            raise ValueError(f"n_seq must be >= 1, got {n_seq}")
        self.slots = [Slot(i) for i in range(n_seq)]
        self._queue: deque[_Waiting] = deque()
        self._sessions: dict[str, int] = {}  # pinned session -> slot
        self._running: dict[Key, int] = {}

    # ------------------------------------------------------------ reads
    def available(self) -> int:
        """Idle unpinned slots (sticky-pinned ones count as unavailable)."""
        return sum(1 for s in self.slots if s.owner is None and s.session_id is None)

    def queue_depth(self) -> int:
        return len(self._queue)

    def running(self) -> int:
        return len(self._running)

    def running_slot(self, key: Key) -> int | None:
        return self._running.get(key)

    def session_slot(self, session_id: str) -> int | None:
        return self._sessions.get(session_id)

    def queued_keys(self) -> list[Key]:
        return [w.key for w in self._queue]

    # ------------------------------------------------------------ admission
    def admit(
        self,
        key: Key,
        prompt_tokens: list[int],
        session_id: str | None,
        on_full: OnFull,
        now: float,
    ) -> Assign | Queued | Reject:
        """Decide where a new request runs (rules 1-4 of the module docstring).

        Raises:
            ValueError: ``key`` is already running or queued.
        """
        if key in self._running or any(w.key == key for w in self._queue):
            raise ValueError(f"request {key!r} is already admitted")
        if session_id is not None:
            if any(w.session_id == session_id for w in self._queue):
                return Reject(ErrorCode.STICKY_BUSY, f"session {session_id!r} has a queued request")
            pinned = self._sessions.get(session_id)
            if pinned is not None:
                slot = self.slots[pinned]
                if slot.owner is not None:
                    return Reject(
                        ErrorCode.STICKY_BUSY, f"session {session_id!r} has a running request"
                    )
                common = common_prefix(slot.tokens, prompt_tokens)
                assign = Assign(pinned, common, "sticky")
                self._start(key, session_id, assign, now)
                return assign
        waiting = _Waiting(key, tuple(prompt_tokens), session_id)
        assign_or_none = None if self._queue else self._choose(waiting.prompt)
        if assign_or_none is not None:
            self._start(key, session_id, assign_or_none, now)
            return assign_or_none
        if on_full == "error":
            return Reject(
                ErrorCode.SEQ_CAPACITY,
                f"all {len(self.slots)} sequences are busy or pinned",
            )
        self._queue.append(waiting)
        return Queued(len(self._queue))

    def _choose(self, prompt: tuple[int, ...]) -> Assign | None:
        idle = [s for s in self.slots if s.owner is None and s.session_id is None]
        if not idle:
            return None
        need = min(MIN_LIVE, len(prompt))
        best: tuple[int, int, int] | None = None  # (-common, tail lost, seq)
        for s in idle:
            common = common_prefix(s.tokens, prompt)
            if common and common >= need:
                cand = (-common, len(s.tokens) - common, s.seq)
                if best is None or cand < best:
                    best = cand
        if best is not None:
            slot = self.slots[best[2]]
            return Assign(slot.seq, -best[0], "live", slot.unsaved > 0 and best[1] > 0)
        for s in idle:
            if not s.tokens:
                return Assign(s.seq, 0, "free")
        lru = min(idle, key=lambda s: (s.last_used, s.seq))
        return Assign(lru.seq, 0, "lru", lru.unsaved > 0)

    def _start(self, key: Key, session_id: str | None, assign: Assign, now: float) -> None:
        slot = self.slots[assign.slot]
        slot.owner = key
        slot.last_used = now
        self._running[key] = slot.seq
        if session_id is not None and slot.session_id is None:
            slot.session_id = session_id
            self._sessions[session_id] = slot.seq

    def _dispatch(self, now: float) -> list[Started]:
        out: list[Started] = []
        while self._queue:
            assign = self._choose(self._queue[0].prompt)
            if assign is None:
                break
            w = self._queue.popleft()
            self._start(w.key, w.session_id, assign, now)
            out.append(Started(w.key, assign))
        return out

    # ------------------------------------------------------------ lifecycle
    def release(self, slot: int, tokens: list[int], unsaved: int, now: float) -> list[Started]:
        """The slot's request ended; its KV stays resident. Returns the requests to start."""
        s = self.slots[slot]
        if s.owner is None:
            raise ValueError(f"slot {slot} has no running request")
        del self._running[s.owner]
        s.owner = None
        s.tokens = list(tokens)
        s.unsaved = unsaved
        s.last_used = now
        return self._dispatch(now)

    def fail_slot(self, slot: int, now: float) -> list[Started]:
        """The slot's request crashed or its KV was reset: the KV is gone, the pin stays."""
        s = self.slots[slot]
        if s.owner is not None:
            del self._running[s.owner]
            s.owner = None
        s.tokens = []
        s.unsaved = 0
        return self._dispatch(now)

    def cancel_queued(self, key: Key) -> bool:
        for w in self._queue:
            if w.key == key:
                self._queue.remove(w)
                return True
        return False

    def end_session(self, session_id: str, now: float) -> list[Started] | None:
        """Unpin the session (None when unknown: ``not_found``); its KV stays for ``live``.

        A running request of the session keeps running; its slot is free for others
        once it is released.
        """
        seq = self._sessions.pop(session_id, None)
        if seq is None:
            return None
        self.slots[seq].session_id = None
        return self._dispatch(now)

    def reset_session(self, session_id: str) -> Reset | None:
        """Drop the session's KV (the pin stays) and its running or queued request."""
        seq = self._sessions.get(session_id)
        if seq is None:
            for w in self._queue:
                if w.session_id == session_id:
                    self._queue.remove(w)
                    return Reset(None, w.key)
            return None
        s = self.slots[seq]
        fail = s.owner
        if fail is not None:
            del self._running[fail]
            s.owner = None
        s.tokens = []
        s.unsaved = 0
        return Reset(seq, fail)

    def clear_all(self) -> None:
        """Every slot's KV was dropped (adapter change, context reset): pins and owners stay.

        The engine saves what it wants to keep (``unsaved``) before it clears the context.
        """
        for s in self.slots:
            s.tokens = []
            s.unsaved = 0
