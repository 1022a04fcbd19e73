"""The request engine's view of the KV cache: the ``WorkerCache`` protocol and ``MetaCache``.

The engine (compute thread) needs five things from the cache: pin a row by
key (exact / parent_key), pin the row sharing the longest prefix with a
prompt, load a pinned row (full validation) to restore it, unpin, and hand a
snapshot to the asynchronous saver. ``WorkerCache`` is exactly that; the
engine never sees a socket, a file or a ``MetaUnavailable``.

``MetaCache`` is the real implementation over this thread's ``MetaClient``
(lookups and pins), ``tiers.load_row`` (map + CRC + key replay; a bad file is
reported to meta with ``report_corrupt`` and the lookup is a miss, D19) and a
``saver.Saver`` (its own writer thread and MetaClient). A dead or slow meta
makes every lookup a miss and every save dropped, never an error to a client.

Unit tests use an in-memory fake with the same protocol
(``tests/unit/workers/fakes.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from erllama.cache.client import MetaClient
from erllama.cache.keys import KvcError, Namespace
from erllama.cache.tiers import LoadedRow, load_row
from erllama.protocol.errors import ErllamaError, TransportError
from erllama.protocol.meta_messages import Pin
from erllama.protocol.tokens import pack_tokens, unpack_tokens
from erllama.workers.saver import MetaBreaker, SaveJob, Saver, SubmitResult

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(eq=False, slots=True)
class Candidate:
    """A pinned row the engine may restore.

    Attributes:
        key: the row's key.
        n_tokens: how many tokens the row holds.
        match_len: the common prefix with the prompt as the index reported it
            (``n_tokens`` for a lookup by key, where the engine checks it after load).
        handle: the implementation's pin.
    """

    key: bytes
    n_tokens: int
    match_len: int
    handle: object


class LoadedState(Protocol):
    """A validated row: its tokens and a (mapped) payload; ``close()`` unmaps."""

    @property
    def tokens(self) -> list[int]: ...

    @property
    def payload(self) -> bytes | memoryview: ...

    @property
    def logits(self) -> bytes | None:
        """Logits stored after the row's last token (None: the row has none)."""
        ...

    def close(self) -> None: ...


class WorkerCache(Protocol):
    """What the engine needs from the cache (see the module docstring)."""

    def checkout(self, key: bytes, *, wait_ms: int = 0) -> Candidate | None:
        """Pin the row of ``key``; None on a miss (or meta trouble)."""
        ...

    def checkout_longest(
        self, ns: Namespace, tokens: Sequence[int], *, min_len: int
    ) -> Candidate | None:
        """Pin the row sharing the longest common prefix (>= ``min_len``) with ``tokens``."""
        ...

    def load(self, cand: Candidate) -> LoadedState | None:
        """Map and fully validate a pinned row; None (reported as corrupt) if bad."""
        ...

    def report_corrupt(self, key: bytes, reason: str) -> None:
        """The backend refused a payload that passed validation: drop the row."""
        ...

    def checkin(self, cand: Candidate) -> None: ...

    def contains(self, key: bytes) -> bool:
        """Whether a published row has ``key`` (False when meta cannot tell)."""
        ...

    def longest_prefix_len(self, ns: Namespace, tokens: Sequence[int], *, min_len: int) -> int:
        """``list_cached_prefixes``: the longest cached common prefix (no pin kept)."""
        ...

    def submit_save(self, job: SaveJob) -> SubmitResult:
        """Queue a save for the writer thread (never blocks on I/O)."""
        ...

    def add_counters(self, deltas: Mapping[str, int]) -> None:
        """Fire-and-forget counter deltas."""
        ...

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued save is written (True) or the timeout passes."""
        ...

    def close(self) -> None: ...


class _Loaded:
    """``LoadedState`` over a ``tiers.LoadedRow``: the state bytes and the stored logits."""

    __slots__ = ("_row", "_state", "logits", "tokens")

    def __init__(self, row: LoadedRow) -> None:
        self._row = row
        self.tokens = unpack_tokens(row.meta.tokens)
        tail = row.meta.logits_tail
        whole = row.payload
        self._state = whole[: whole.nbytes - tail] if tail else whole
        self.logits: bytes | None = bytes(whole[whole.nbytes - tail :]) if tail else None

    @property
    def payload(self) -> memoryview:
        return self._state

    def close(self) -> None:
        if self._state is not self._row.payload:
            self._state.release()
        try:
            self._row.close()
        except BufferError:  # a backend kept a view of the payload: the map goes with it
            log.warning("mapped row still referenced; unmapped when released")


class MetaCache:
    """``WorkerCache`` over a ``MetaClient`` (compute thread) and a ``Saver``.

    A meta that does not answer opens a ``MetaBreaker``: for a growing back-off
    every lookup is an immediate miss, instead of a timeout per request.

    Args:
        meta: the compute thread's MetaClient (not shared with any other thread).
        saver: the asynchronous writer (owns its own MetaClient).
    """

    def __init__(self, meta: MetaClient, saver: Saver) -> None:
        self._meta = meta
        self._saver = saver
        self._breaker = MetaBreaker("lookups")

    def _guard(self, op: Callable[[], T], default: T, *, force: bool = False) -> T:
        if not force and self._breaker.is_open():
            return default
        try:
            out = op()
        except TransportError as exc:
            self._breaker.failed(exc)
            return default
        except ErllamaError as exc:
            log.debug("meta refused: %s", exc)
            return default
        self._breaker.ok()
        return out

    @staticmethod
    def _candidate(pin: Pin | None, match_len: int | None = None) -> Candidate | None:
        if pin is None:
            return None
        n = pin.row.n_tokens
        return Candidate(
            key=pin.row.key, n_tokens=n, match_len=n if match_len is None else match_len, handle=pin
        )

    def checkout(self, key: bytes, *, wait_ms: int = 0) -> Candidate | None:
        return self._candidate(self._guard(lambda: self._meta.checkout(key, wait_ms=wait_ms), None))

    def checkout_longest(
        self, ns: Namespace, tokens: Sequence[int], *, min_len: int
    ) -> Candidate | None:
        packed = pack_tokens(tokens)
        found = self._guard(
            lambda: self._meta.longest_prefix_checkout(ns, packed, min_len=min_len), None
        )
        return None if found is None else self._candidate(found[1], found[0])

    def load(self, cand: Candidate) -> LoadedState | None:
        assert isinstance(cand.handle, Pin)
        path = cand.handle.row.path
        try:
            return _Loaded(load_row(path, cand.key))
        except KvcError as exc:
            log.warning(
                "event=corrupt_row key=%s path=%s reason=%s", cand.key.hex()[:16], path, exc
            )
            self.report_corrupt(cand.key, exc.code)
        except OSError as exc:  # evicted between the pin and the open: a miss
            log.info("row %s unreadable: %s", cand.key.hex()[:16], exc)
        return None

    def report_corrupt(self, key: bytes, reason: str) -> None:
        self._guard(lambda: self._meta.report_corrupt(key, reason), None, force=True)

    def checkin(self, cand: Candidate) -> None:
        assert isinstance(cand.handle, Pin)
        pin_ref = cand.handle.pin_ref
        # always tried: the pin came from a meta that answered a moment ago
        self._guard(lambda: self._meta.checkin(pin_ref), None, force=True)

    def contains(self, key: bytes) -> bool:
        return self._guard(lambda: self._meta.lookup_exact(key), None) is not None

    def longest_prefix_len(self, ns: Namespace, tokens: Sequence[int], *, min_len: int) -> int:
        cand = self.checkout_longest(ns, tokens, min_len=min_len)
        if cand is None:
            return 0
        self.checkin(cand)
        return cand.match_len

    def submit_save(self, job: SaveJob) -> SubmitResult:
        return self._saver.submit(job)

    def add_counters(self, deltas: Mapping[str, int]) -> None:
        self._meta.add_counters(deltas)

    def flush(self, timeout_s: float) -> bool:
        return self._saver.flush(timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        """Let the writer finish what is queued (bounded), then close both sockets.

        One round trip first, so counter deltas sent fire-and-forget on this socket
        reach meta before the socket closes (it closes with linger 0).
        """
        self._saver.close(timeout_s=timeout_s)
        self._guard(lambda: self._meta.lookup_exact(bytes(32)), None)
        self._meta.close()
