"""An in-memory ``WorkerCache`` for engine tests, and a harness around ``Engine``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from erllama.cache.keys import Namespace
from erllama.config import ModelSpec, PolicyConfig, StubOpts
from erllama.protocol.codec import decode_result
from erllama.protocol.messages import (
    Complete,
    CompletionResult,
    DoneEvent,
    ErrorReply,
    Msg,
    Reply,
    RequestOptions,
    TokenEvent,
    WorkerStatus,
)
from erllama.protocol.tokens import pack_tokens, unpack_tokens
from erllama.workers.cachelink import Candidate
from erllama.workers.engine import CancelSet, Engine, Inbound, InboxItem
from erllama.workers.saver import SaveJob, SubmitResult
from erllama.workers.slots import common_prefix
from erllama.workers.stub import StubBackend


@dataclass
class FakeLoaded:
    tokens: list[int]
    payload: bytes
    logits: bytes | None = None
    closed: bool = False

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeCache:
    """Rows in a dict; saves land synchronously (``fired``) unless told otherwise."""

    rows: dict[bytes, tuple[list[int], bytes]] = field(default_factory=dict)
    saves: list[SaveJob] = field(default_factory=list)
    counters: Counter[str] = field(default_factory=Counter)
    corrupt: set[bytes] = field(default_factory=set)
    reported: list[bytes] = field(default_factory=list)
    pins: int = 0
    meta_down: bool = False
    refuse_saves: bool = False
    checkouts: list[tuple[str, bytes | None]] = field(default_factory=list)
    tails: dict[bytes, int] = field(default_factory=dict)

    def _cand(self, key: bytes, match: int | None = None) -> Candidate:
        toks = self.rows[key][0]
        self.pins += 1
        return Candidate(
            key=key, n_tokens=len(toks), match_len=len(toks) if match is None else match, handle=key
        )

    def checkout(self, key: bytes, *, wait_ms: int = 0) -> Candidate | None:
        self.checkouts.append(("key", key))
        if self.meta_down or key not in self.rows:
            return None
        return self._cand(key)

    def checkout_longest(
        self, ns: Namespace, tokens: Sequence[int], *, min_len: int
    ) -> Candidate | None:
        self.checkouts.append(("longest", None))
        if self.meta_down:
            return None
        best: tuple[int, bytes] | None = None
        for key, (toks, _) in self.rows.items():
            c = common_prefix(toks, tokens)
            if c >= min_len and (best is None or c > best[0]):
                best = (c, key)
        return None if best is None else self._cand(best[1], best[0])

    def load(self, cand: Candidate) -> FakeLoaded | None:
        if cand.key in self.corrupt:
            self.reported.append(cand.key)
            return None
        toks, payload = self.rows[cand.key]
        tail = self.tails.get(cand.key, 0)
        if tail:
            return FakeLoaded(list(toks), payload[:-tail], payload[-tail:])
        return FakeLoaded(list(toks), payload)

    def report_corrupt(self, key: bytes, reason: str) -> None:
        self.reported.append(key)

    def checkin(self, cand: Candidate) -> None:
        self.pins -= 1

    def contains(self, key: bytes) -> bool:
        return not self.meta_down and key in self.rows

    def longest_prefix_len(self, ns: Namespace, tokens: Sequence[int], *, min_len: int) -> int:
        cand = self.checkout_longest(ns, tokens, min_len=min_len)
        if cand is None:
            return 0
        self.checkin(cand)
        return cand.match_len

    def submit_save(self, job: SaveJob) -> SubmitResult:
        self.saves.append(job)
        if self.refuse_saves:
            job.status = "dropped"
            job.done.set()
            return SubmitResult(False, 1)
        if job.key in self.rows:
            job.status = "already_present"
        else:
            self.rows[job.key] = (unpack_tokens(job.meta.tokens), bytes(job.payload))
            self.tails[job.key] = job.meta.logits_tail
            job.status = "fired"
        job.done.set()
        return SubmitResult(True)

    def add_counters(self, deltas: Mapping[str, int]) -> None:
        self.counters.update(deltas)

    def flush(self, timeout_s: float) -> bool:
        return True

    def close(self) -> None:
        pass

    def reasons(self) -> list[str]:
        return [j.meta.save_reason.name.lower() for j in self.saves]


SMALL_POLICY = PolicyConfig(
    min_tokens=8,
    cold_min_tokens=8,
    cold_max_tokens=100_000,
    continued_interval=64,
    boundary_trim_tokens=0,
    boundary_align_tokens=16,
    session_resume_wait_ms=0,
    prefill_chunk_size=8,
)


def stub_spec(**stub: Any) -> ModelSpec:
    opts = {"n_ctx": 512, "n_vocab": 300, **stub}
    return ModelSpec(id="m", backend="stub", default_response_tokens=8, stub=StubOpts(**opts))


class Harness:
    """An engine on a StubBackend with captured output."""

    def __init__(
        self,
        cache: FakeCache | None = None,
        *,
        policy: PolicyConfig = SMALL_POLICY,
        spec: ModelSpec | None = None,
        on_emit: Callable[[Harness, bytes, Msg], None] | None = None,
    ) -> None:
        self.spec = spec or stub_spec()
        self.backend = StubBackend(self.spec)
        self.cache = cache if cache is not None else FakeCache()
        self.out: list[tuple[bytes, Msg]] = []
        self.cancels = CancelSet()
        self._on_emit = on_emit
        self.engine = Engine(
            self.backend,
            self.cache,
            model_id="m",
            spec=self.spec,
            policy=policy,
            emit=self._emit,
            cancels=self.cancels,
        )

    def _emit(self, cid: bytes, msg: Msg) -> None:
        self.out.append((cid, msg))
        if self._on_emit is not None:
            self._on_emit(self, cid, msg)

    def put(self, item: InboxItem) -> None:
        self.engine.inbox.put(item)

    def send(self, msg: Msg, cid: bytes = b"c1") -> None:
        self.put(Inbound(cid, msg))

    def cancel(self, target: str, cid: bytes = b"c1") -> None:
        from erllama.protocol.messages import Cancel

        self.cancels.mark(cid, target)
        self.put(Inbound(cid, Cancel(request_id="", target=target)))

    def run(self) -> None:
        self.engine.run_until_idle()
        assert self.backend.seq_tokens(0) == self.engine.kv.tokens  # D27: the view is exact

    def for_request(self, rid: str) -> list[Msg]:
        return [
            m
            for _, m in self.out
            if getattr(m, "request_id", None) == rid and not isinstance(m, WorkerStatus)
        ]

    def statuses(self) -> list[WorkerStatus]:
        return [m for _, m in self.out if isinstance(m, WorkerStatus)]

    def result(self, rid: str) -> CompletionResult:
        msgs = self.for_request(rid)
        assert len(msgs) == 1 and isinstance(msgs[0], Reply), msgs
        return decode_result(msgs[0].result, CompletionResult)

    def error(self, rid: str) -> ErrorReply:
        msgs = self.for_request(rid)
        assert len(msgs) == 1 and isinstance(msgs[0], ErrorReply), msgs
        return msgs[0]

    def stream(self, rid: str) -> tuple[list[TokenEvent], DoneEvent]:
        msgs = self.for_request(rid)
        assert msgs and isinstance(msgs[-1], DoneEvent), msgs
        tokens = [m for m in msgs[:-1] if isinstance(m, TokenEvent)]
        assert len(tokens) == len(msgs) - 1
        assert [m.seq for m in msgs] == list(range(len(msgs)))  # type: ignore[attr-defined]
        return tokens, msgs[-1]

    def complete(
        self, rid: str, prompt: str | list[int], *, mode: str = "complete", **opts: Any
    ) -> None:
        text = prompt if isinstance(prompt, str) else None
        tokens = None if isinstance(prompt, str) else pack_tokens(prompt)
        msg = msgspec.convert(
            {"request_id": rid, "model": "m", "mode": mode, "t": "complete"}, Complete
        )
        msg = msgspec.structs.replace(
            msg, prompt=text, tokens=tokens, options=RequestOptions(**opts)
        )
        self.send(msg)
