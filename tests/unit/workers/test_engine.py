"""The request engine on a StubBackend with an in-memory cache (no sockets, no processes)."""

from __future__ import annotations

import os
from typing import Any

import msgspec
import pytest

from erllama.cache.kvc import SaveReason
from erllama.config import PolicyConfig
from erllama.protocol.codec import decode_result
from erllama.protocol.errors import ErrorCode
from erllama.protocol.messages import (
    Complete,
    Detokenize,
    DoneEvent,
    ErrorReply,
    Evict,
    ListCachedPrefixes,
    ModelStatus,
    Msg,
    Reply,
    RequestOptions,
    ShutdownModel,
    TokenEvent,
    Tokenize,
    WorkerStatus,
)
from erllama.protocol.tokens import pack_tokens, unpack_tokens
from erllama.workers.engine import FatalEngineError, StopRequest
from erllama.workers.saver import SaveJob, SubmitResult
from erllama.workers.stub import EOS
from erllama.workers.textstream import TextStream

from .fakes import SMALL_POLICY, FakeCache, Harness, stub_spec

pytestmark = pytest.mark.timeout(60)

P48 = "Q" * 47  # 48 tokens with BOS: ladder rungs 16, 32, 48 under SMALL_POLICY


def reference(prompt: str | list[int], **opts: Any) -> tuple[list[int], str]:
    """Generated tokens and reply of a cold run on a fresh engine and cache."""
    h = Harness()
    h.complete("ref", prompt, **opts)
    h.run()
    r = h.result("ref")
    return unpack_tokens(r.generated), r.reply


# ================================================================ basics
def test_complete_cold() -> None:
    h = Harness()
    h.complete("r1", P48)
    h.run()
    r = h.result("r1")
    gen = unpack_tokens(r.generated)
    assert len(gen) == 8  # spec.default_response_tokens
    assert r.finish_reason == "length"
    assert r.cache_hit_kind == "cold"
    prompt = h.backend.tokenize(P48)
    assert unpack_tokens(r.context_tokens) == prompt + gen == h.engine.kv.tokens
    assert r.committed_tokens == 56
    assert r.reply == h.backend.detokenize(gen)
    assert r.cache_delta.read == 0 and r.cache_delta.created == 56
    assert r.finish_key is not None and r.finish_key in h.cache.rows
    assert r.stats.prompt_tokens == 48 and r.stats.completion_tokens == 8
    assert r.stats.prefill_ms >= 0 and r.stats.generation_ms >= 0
    assert h.cache.counters["misses"] == 1 and h.cache.counters["pack_total_ns"] > 0
    assert h.cache.pins == 0


def test_stream_matches_complete() -> None:
    gen, text = reference(P48, response_tokens=20)
    h = Harness()
    h.complete("s1", P48, mode="stream", response_tokens=20)
    h.run()
    tokens, done = h.stream("s1")
    assert [t.token_id for t in tokens] == gen
    assert "".join(t.text for t in tokens) == text
    assert done.stats.finish_reason == "length" and done.stats.completion_tokens == 20
    assert not done.stats.cancelled


def test_infer_defaults_to_64_and_caps_at_context() -> None:
    h = Harness()
    h.complete("i1", [1, 50, 60, 70], mode="infer")
    h.run()
    tokens, done = h.stream("i1")
    assert len(tokens) == 64
    h2 = Harness(spec=stub_spec(n_ctx=40))
    h2.complete("i2", [1, 50, 60, 70], mode="infer", response_tokens=1000)
    h2.run()
    tokens, done = h2.stream("i2")
    assert len(tokens) == 36 and done.stats.finish_reason == "length"
    assert done.stats.committed_tokens == 40


def test_phase_and_status_pushes() -> None:
    h = Harness()
    h.complete("r1", "hello", mode="stream")
    h.run()
    phases = [s.phase for s in h.statuses()]
    assert phases[0] == "idle" or "prefilling" in phases
    assert "prefilling" in phases and "generating" in phases and phases[-1] == "idle"
    busy = [s for s in h.statuses() if s.phase == "generating"]
    assert busy and all(s.queue_depth == 1 and s.active == 1 for s in busy)
    assert h.statuses()[-1].last_cache_hit is not None
    assert h.statuses()[-1].last_cache_hit.kind == "cold"  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", ["complete", "stream"])
def test_the_idle_status_goes_out_before_the_terminal_message(mode: str) -> None:
    # the router answers `status` from the pushes: one sent after the reply lets a client
    # that asks at once see its own, finished request still running
    h = Harness()
    h.complete("r1", "hello", mode=mode)
    h.run()
    last = max(i for i, (_, m) in enumerate(h.out) if getattr(m, "request_id", None) == "r1")
    before = [m for _, m in h.out[:last] if isinstance(m, WorkerStatus)]
    after = [m for _, m in h.out[last:] if isinstance(m, WorkerStatus)]
    assert before[-1].phase == "idle" and before[-1].active == 0, before[-1]
    assert all(s.phase == "idle" for s in after)


def test_fifo_order_and_pending_len() -> None:
    h = Harness(spec=stub_spec(token_delay_ms=0))
    for rid in ("a", "b", "c"):
        h.complete(rid, f"prompt {rid}")
    h.run()
    replies = [m.request_id for _, m in h.out if isinstance(m, Reply)]
    assert replies == ["a", "b", "c"]
    assert max(s.pending_len for s in h.statuses()) == 2
    assert h.statuses()[-1].pending_len == 0


# ================================================================ cancel
def test_cancel_mid_stream() -> None:
    def hook(h: Harness, cid: bytes, msg: Msg) -> None:
        if isinstance(msg, TokenEvent) and msg.request_id == "s1" and msg.seq == 2:
            h.cancel("s1")

    h = Harness(on_emit=hook)
    h.complete("s1", P48, mode="stream", response_tokens=50)
    h.run()
    tokens, done = h.stream("s1")
    assert len(tokens) == 3
    assert done.stats.cancelled and done.stats.finish_reason == "cancelled"
    # a cancelled request still saves (finish gate: context >= min_tokens)
    assert done.stats.finish_key is not None
    assert h.cache.reasons()[-1] == "finish"


def test_cancel_queued_request() -> None:
    def hook(h: Harness, cid: bytes, msg: Msg) -> None:
        if isinstance(msg, TokenEvent) and msg.request_id == "a" and msg.seq == 0:
            h.cancel("b")

    h = Harness(on_emit=hook)
    h.complete("a", "first", mode="stream", response_tokens=10)
    h.complete("b", "second", mode="stream")
    h.complete("c", "third")
    h.run()
    order = [m.request_id for _, m in h.out if isinstance(m, DoneEvent | Reply)]
    assert order == ["b", "a", "c"]  # b answered at once, before a finished
    tokens, done = h.stream("b")
    assert tokens == [] and done.stats.cancelled and done.stats.completion_tokens == 0
    assert done.stats.finish_reason == "cancelled" and done.stats.finish_key is None
    assert h.stream("a")[1].stats.completion_tokens == 10
    assert h.result("c").finish_reason == "length"


def test_cancel_unknown_is_noop() -> None:
    h = Harness()
    h.cancel("nope")
    h.complete("r1", "x")
    h.run()
    assert h.result("r1").finish_reason == "length"
    assert not h.cancels.marked(b"c1", "nope")


# ================================================================ stop sequences
def test_stop_sequence_cuts_reply_and_stream() -> None:
    gen, text = reference(P48, response_tokens=40)
    stop = text[12:15]
    cut = text[: text.find(stop)]
    h = Harness()
    h.complete("r1", P48, response_tokens=40, stop_sequences=[stop, "", "never-there"])
    h.complete("s1", P48, mode="stream", response_tokens=40, stop_sequences=[stop])
    h.run()
    r = h.result("r1")
    assert r.finish_reason == "stop" and r.stop_sequence == stop
    assert r.reply == cut
    # the token that completed the match stays in generated and in the context
    n = text.find(stop) + len(stop)
    assert unpack_tokens(r.generated) == gen[:n]
    tokens, done = h.stream("s1")
    assert "".join(t.text for t in tokens) == cut
    assert done.stats.stop_sequence == stop and done.stats.finish_reason == "stop"


def test_stop_sequence_leftmost_wins() -> None:
    _, text = reference(P48, response_tokens=40)
    late_short, early_long = text[10:12], text[5:12]  # both complete on the same token
    h = Harness()
    h.complete("r1", P48, response_tokens=40, stop_sequences=[late_short, early_long])
    h.run()
    r = h.result("r1")
    first = min(
        (text.find(s), i) for i, s in enumerate([late_short, early_long]) if text.find(s) >= 0
    )
    expected = [late_short, early_long][first[1]]
    assert r.stop_sequence == expected
    assert r.reply == text[: text.find(expected)]


def test_stream_holds_back_and_flushes() -> None:
    _, text = reference(P48, response_tokens=20)
    h = Harness()
    h.complete(
        "s1", P48, mode="stream", response_tokens=20, stop_sequences=["\x00\x00\x00\x00\x00"]
    )
    h.run()
    tokens, done = h.stream("s1")
    assert [t.text for t in tokens[:4]] == ["", "", "", ""]
    assert tokens[4].text == text[0]
    assert len(tokens[-1].text) == 5  # the held-back tail is flushed with the last token
    assert "".join(t.text for t in tokens) == text
    assert done.stats.finish_reason == "length" and done.stats.stop_sequence is None


def test_textstream_rules() -> None:
    ts = TextStream(["bcd", "cd"])
    out = ts.feed(b"a") + ts.feed(b"bcde")
    assert ts.matched == "bcd" and out == "a"  # leftmost by position
    ts = TextStream(["cde", "cdx", "cd"])
    assert ts.feed(b"abcdef") == "ab" and ts.matched == "cde"  # tie: earlier list entry
    ts = TextStream()
    assert ts.feed("é".encode()[:1]) == "" and ts.feed("é".encode()[1:]) == "é"
    ts = TextStream()
    assert ts.feed(b"\xe2\x82") == "" and ts.finish() == "\ufffd"


# ================================================================ finish reasons and EOG
def test_eog_finishes_with_stop() -> None:
    h = Harness()
    h.complete("r1", "please end <eos>")
    h.complete("s1", "please end <eos>", mode="stream")
    h.run()
    r = h.result("r1")
    assert unpack_tokens(r.generated) == [EOS]
    assert r.finish_reason == "stop" and r.stop_sequence is None and r.reply == ""
    tokens, done = h.stream("s1")
    assert [t.token_id for t in tokens] == [EOS] and done.stats.finish_reason == "stop"


# ================================================================ cache paths
def test_exact_hit_restores_and_matches_cold_output() -> None:
    cache = FakeCache()
    h1 = Harness(cache)
    h1.complete("r1", P48)
    h1.run()
    cold = h1.result("r1")
    assert h1.cache.reasons() == ["cold", "cold", "cold", "finish"]
    assert [len(unpack_tokens(j.meta.tokens)) for j in cache.saves] == [16, 32, 48, 56]

    h2 = Harness(cache)  # a fresh worker: nothing live
    h2.complete("r2", P48)
    h2.run()
    warm = h2.result("r2")
    assert warm.cache_hit_kind == "exact"
    assert warm.generated == cold.generated  # the primer makes the restore exact
    assert warm.cache_delta.read == 48 and warm.cache_delta.created == 8
    assert cache.counters["hits_exact"] == 1 and cache.counters["load_total_ns"] > 0
    assert cache.pins == 0
    # the finish row already existed: no second snapshot, still a finish_key
    assert warm.finish_key == cold.finish_key
    assert len(cache.saves) == 4


def test_partial_longest_prefix_hit() -> None:
    cache = FakeCache()
    h1 = Harness(cache)
    h1.complete("r1", P48)
    h1.run()
    other = "Q" * 39 + "different tail here!"  # 40 shared tokens (BOS + 39)
    gen, _ = reference(other)
    h2 = Harness(cache)
    h2.complete("r2", other)
    h2.run()
    r = h2.result("r2")
    assert r.cache_hit_kind == "partial" and r.cache_delta.read == 40
    assert unpack_tokens(r.generated) == gen
    assert cache.counters["hits_longest_prefix"] == 1
    assert r.cache_delta.created == r.committed_tokens - 40


def test_tiny_prefix_match_is_skipped() -> None:
    cache = FakeCache()
    h1 = Harness(cache)
    h1.complete("r1", P48)
    h1.run()
    h2 = Harness(cache)
    h2.complete("r2", "Q" * 20 + "z" * 30)  # 21 shared tokens < 32: not worth a restore
    h2.run()
    assert h2.result("r2").cache_hit_kind == "cold"
    assert cache.counters["misses"] == 2


def test_live_kv_reuse_and_sticky() -> None:
    cache = FakeCache()
    h = Harness(cache)
    h.complete("t1", P48, session_id="s")
    h.run()
    r1 = h.result("t1")
    turn2 = P48 + r1.reply + " and more"
    gen, _ = reference(turn2)
    h.complete("t2", turn2, session_id="s")
    h.complete("t3", turn2 + "x" * 40)  # no session: partial
    h.run()
    r2 = h.result("t2")
    assert r2.cache_hit_kind == "sticky" and r2.cache_delta.read == 56
    assert unpack_tokens(r2.generated) == gen
    r3 = h.result("t3")
    assert r3.cache_hit_kind == "partial"
    assert r3.cache_delta.read == len(h.backend.tokenize(turn2))  # t2's prompt, not its reply
    assert cache.counters["hits_live"] == 2
    # the same prompt again: all of it live, primer only
    h.complete("t4", turn2 + "x" * 40)
    h.run()
    r4 = h.result("t4")
    assert r4.cache_hit_kind == "exact" and r4.generated == r3.generated


def test_parent_key_resume() -> None:
    cache = FakeCache()
    h1 = Harness(cache)
    h1.complete("t1", P48)
    h1.run()
    r1 = h1.result("t1")
    turn2 = P48 + r1.reply + " next turn"
    gen, _ = reference(turn2)
    h2 = Harness(cache)
    h2.complete("t2", turn2, parent_key=r1.finish_key)
    h2.run()
    r2 = h2.result("t2")
    assert r2.cache_hit_kind == "partial" and r2.cache_delta.read == 56
    assert unpack_tokens(r2.generated) == gen
    assert cache.counters["hits_resume"] == 1
    assert ("key", r1.finish_key) in cache.checkouts


def test_failed_parent_key_falls_back_to_walk() -> None:
    cache = FakeCache()
    h1 = Harness(cache)
    h1.complete("t1", P48)
    h1.run()
    r1 = h1.result("t1")
    h2 = Harness(cache)
    h2.complete("t2", P48 + r1.reply + " next", parent_key=os.urandom(32))
    h2.run()
    assert h2.result("t2").cache_hit_kind == "partial"
    assert cache.counters["hits_longest_prefix"] == 1 and cache.counters["hits_resume"] == 0


def test_corrupt_rows_fall_through_to_cold() -> None:
    cache = FakeCache()
    h1 = Harness(cache)
    h1.complete("r1", P48)
    h1.run()
    cold = h1.result("r1")
    cache.corrupt = set(cache.rows)
    h2 = Harness(cache)
    h2.complete("r2", P48)
    h2.run()
    r = h2.result("r2")
    assert r.cache_hit_kind == "cold" and r.generated == cold.generated
    assert cache.reported and cache.pins == 0


def test_meta_down_is_a_miss_and_saves_drop() -> None:
    cache = FakeCache(meta_down=True, refuse_saves=True)
    h = Harness(cache)
    h.complete("r1", P48)
    h.run()
    r = h.result("r1")
    assert r.cache_hit_kind == "cold" and r.finish_key is None
    assert r.cache_delta.created == 0
    assert cache.counters["saves_dropped"] == 4


def test_continued_saves_at_absolute_frontiers() -> None:
    policy = msgspec.structs.replace(SMALL_POLICY, continued_interval=16)
    h = Harness(policy=policy)
    h.complete("r1", "x" * 19, response_tokens=40)  # 20 tokens, context grows to 60
    h.run()
    lengths = [(j.meta.save_reason, len(unpack_tokens(j.meta.tokens))) for j in h.cache.saves]
    assert lengths == [
        (SaveReason.COLD, 20),  # the prompt's own row; the rung at 16 would leave a 4-token batch
        (SaveReason.CONTINUED, 32),
        (SaveReason.CONTINUED, 48),
        (SaveReason.FINISH, 60),
    ]
    meta = h.cache.saves[0].meta
    assert meta.state_format == b"stub-v1" and meta.fingerprint_mode == 0
    assert meta.context_size == 512 and meta.quant == 1 and meta.quant_bits == 16


def test_saves_disabled_and_below_min_tokens() -> None:
    off = msgspec.structs.replace(SMALL_POLICY, saves_enabled=False)
    h = Harness(policy=off)
    h.complete("r1", P48)
    h.run()
    assert h.cache.saves == [] and h.result("r1").finish_key is None
    big = msgspec.structs.replace(SMALL_POLICY, min_tokens=100, cold_min_tokens=100)
    h = Harness(policy=big)
    h.complete("r1", "short")
    h.run()
    r = h.result("r1")
    assert h.cache.saves == [] and r.finish_key is None and r.cache_delta.created == 0


# ================================================================ bad input
@pytest.mark.parametrize(
    ("msg", "code"),
    [
        (Complete(request_id="x", model="m", prompt="y" * 600), ErrorCode.CONTEXT_OVERFLOW),
        (
            Complete(request_id="x", model="m", tokens=pack_tokens([1, 300])),
            ErrorCode.INVALID_TOKEN,
        ),
        (Complete(request_id="x", model="m", tokens=b""), ErrorCode.EMPTY_PREFIX),
        (Complete(request_id="x", model="m", tokens=b"\x01\x00"), ErrorCode.BAD_REQUEST),
        (Complete(request_id="x", model="m"), ErrorCode.BAD_REQUEST),
        (
            Complete(
                request_id="x", model="m", prompt="a", options=RequestOptions(response_tokens=0)
            ),
            ErrorCode.BADARG,
        ),
        (
            Complete(request_id="x", model="m", prompt="a", options=RequestOptions(grammar="")),
            ErrorCode.BADARG,
        ),
        (
            Complete(request_id="x", model="m", prompt="a", options=RequestOptions(grammar="r")),
            ErrorCode.NOT_SUPPORTED,
        ),
        (
            Complete(
                request_id="x",
                model="m",
                prompt="a",
                options=RequestOptions(temperature=float("nan")),
            ),
            ErrorCode.BADARG,
        ),
    ],
)
def test_bad_input_codes_and_engine_survives(msg: Complete, code: str) -> None:
    h = Harness()
    h.send(msg)
    h.complete("ok", "fine")
    h.run()
    err = h.error("x")
    assert err.code == code and err.message
    assert h.result("ok").finish_reason == "length"


def test_duplicate_request_id_refused() -> None:
    def hook(h: Harness, cid: bytes, msg: Msg) -> None:
        if isinstance(msg, TokenEvent) and msg.seq == 0:
            h.complete("dup", "again", mode="stream")

    h = Harness(on_emit=hook)
    h.complete("dup", "first", mode="stream", response_tokens=3)
    h.run()
    msgs = h.for_request("dup")
    assert any(isinstance(m, ErrorReply) and m.code == ErrorCode.BAD_REQUEST for m in msgs)


# ================================================================ other operations
def test_tokenize_detokenize_status_prefixes() -> None:
    h = Harness()
    h.send(Tokenize(request_id="t", model="m", text="hi"))
    h.send(Detokenize(request_id="d", model="m", tokens=pack_tokens([1, 107, 108])))
    h.send(ModelStatus(request_id="st", model="m"))
    h.complete("r1", P48)
    h.run()
    h.send(
        ListCachedPrefixes(
            request_id="lp", model="m", tokens=pack_tokens(h.backend.tokenize(P48 + "zz"))
        )
    )
    h.send(ListCachedPrefixes(request_id="lp0", model="m", tokens=b""))
    h.run()

    def res(rid: str, t: type) -> object:
        (m,) = h.for_request(rid)
        assert isinstance(m, Reply)
        return decode_result(m.result, t)

    assert unpack_tokens(res("t", bytes)) == [1, ord("h") + 3, ord("i") + 3]  # type: ignore[arg-type]
    assert res("d", str) == "hi"
    assert res("st", str) == "idle"
    assert res("lp", int) == 48
    assert res("lp0", int) == 0


def test_evict_saves_then_frees_kv_and_shutdown_keeps_it() -> None:
    h = Harness()
    h.complete("r1", P48)
    h.run()
    assert h.engine.kv.tokens
    h.send(ShutdownModel(request_id="sh", model="m"))
    h.run()
    assert h.cache.reasons()[-1] == "shutdown"
    assert h.engine.kv.tokens
    h.send(Evict(request_id="ev", model="m"))
    h.run()
    assert isinstance(h.for_request("ev")[0], Reply)
    assert h.cache.saves[-1].meta.save_reason == SaveReason.EVICT
    assert h.engine.kv.tokens == [] and h.backend.seq_tokens(0) == []
    # idle and empty: nothing to save
    n = len(h.cache.saves)
    h.send(Evict(request_id="ev2", model="m"))
    h.run()
    assert len(h.cache.saves) == n


def test_unexpected_exception_is_internal_and_fatal() -> None:
    h = Harness(spec=stub_spec(crash_after_tokens=2, crash_mode="raise"))
    h.complete("s1", "boom", mode="stream")
    with pytest.raises(FatalEngineError):
        h.engine.run_until_idle()
    msgs = h.for_request("s1")
    # two decodes succeed; the third token is sent before its decode raises
    assert [type(m) for m in msgs] == [TokenEvent, TokenEvent, TokenEvent, ErrorReply]
    err = msgs[-1]
    assert isinstance(err, ErrorReply) and err.code == ErrorCode.INTERNAL
    assert err.remote_traceback and "RuntimeError" in err.remote_traceback


def test_graceful_stop_rejects_pending_and_saves() -> None:
    h = Harness()
    h.complete("a", P48)
    h.complete("b", "queued")
    h.put(StopRequest(drain=True))
    h.engine.run()  # returns after the stop
    assert h.result("a").finish_reason == "length"
    err = h.error("b")
    assert err.code == ErrorCode.SHUTTING_DOWN and err.retryable
    assert h.cache.saves[-1].meta.save_reason == SaveReason.SHUTDOWN
    h.complete("c", "too late")
    h.run()
    assert h.error("c").code == ErrorCode.SHUTTING_DOWN


class StuckCache(FakeCache):
    """Saves are queued but never written (a disk slower than evict_save_timeout_ms)."""

    def submit_save(self, job: SaveJob) -> SubmitResult:
        self.saves.append(job)
        return SubmitResult(True)

    def flush(self, timeout_s: float) -> bool:
        return not any(not j.done.is_set() for j in self.saves)


@pytest.mark.parametrize("how", ["evict", "shutdown_model", "stop"])
def test_a_save_cut_by_evict_save_timeout_is_counted(how: str) -> None:
    h = Harness(StuckCache(), policy=PolicyConfig(saves_enabled=False))
    h.engine.save_timeout_s = 0.05
    h.complete("r1", P48)
    h.run()
    if how == "stop":
        h.put(StopRequest(drain=True))
        h.engine.run()
    else:
        msg = Evict if how == "evict" else ShutdownModel
        h.send(msg(request_id="ev", model="m"))
        h.run()
        assert isinstance(h.for_request("ev")[0], Reply)  # answered, not hung
    assert [j.meta.save_reason for j in h.cache.saves] == [
        SaveReason.EVICT if how == "evict" else SaveReason.SHUTDOWN
    ]
    assert h.cache.counters["saves_timed_out"] == 1


def test_a_save_within_evict_save_timeout_is_not_counted() -> None:
    h = Harness(policy=PolicyConfig(saves_enabled=False))
    h.complete("r1", P48)
    h.run()
    h.put(StopRequest(drain=True))
    h.engine.run()
    assert h.cache.reasons() == ["shutdown"]
    assert h.cache.counters["saves_timed_out"] == 0


def test_drain_timeout_cancels_running_request() -> None:
    def hook(h: Harness, cid: bytes, msg: Msg) -> None:
        if isinstance(msg, TokenEvent) and msg.seq == 1:
            h.put(StopRequest(drain=True))

    h = Harness(on_emit=hook)
    h.engine.drain_timeout_s = 0.0
    h.complete("s1", P48, mode="stream", response_tokens=100)
    h.engine.run()
    tokens, done = h.stream("s1")
    assert done.stats.cancelled and len(tokens) == 2


def test_policy_fixture_is_valid() -> None:
    from erllama.cache.policy import validate_policy

    validate_policy(SMALL_POLICY)
    assert isinstance(SMALL_POLICY, PolicyConfig)


def _count_prefills(h: Harness) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []
    real = h.backend.prefill

    def counting(seq: int, tokens: Any, start_pos: int) -> None:
        calls.append((start_pos, len(tokens)))
        real(seq, tokens, start_pos)

    h.backend.prefill = counting  # type: ignore[method-assign]
    return calls


def test_exact_hit_samples_from_stored_logits_without_a_primer() -> None:
    cache = FakeCache()
    h1 = Harness(cache)
    h1.complete("r1", P48)
    h1.run()
    cold = h1.result("r1")
    # every save taken right after a decode carries the logits of its last position
    assert all(j.meta.logits_tail > 0 for j in cache.saves)
    h2 = Harness(cache)
    calls = _count_prefills(h2)
    h2.complete("r2", P48)
    h2.run()
    warm = h2.result("r2")
    assert warm.cache_hit_kind == "exact" and warm.generated == cold.generated
    assert calls == []  # nothing re-decoded: the first token came from the stored logits
    # the same prompt once more hits the live KV, again without a primer
    h2.complete("r3", P48)
    h2.run()
    assert h2.result("r3").generated == cold.generated
    assert calls == []


def test_rows_without_logits_still_use_the_primer() -> None:
    cache = FakeCache()
    h1 = Harness(cache)
    h1.complete("r1", P48)
    h1.run()
    cold = h1.result("r1")
    cache.tails.clear()
    for key, (toks, payload) in list(cache.rows.items()):
        job = next(j for j in cache.saves if j.key == key)
        cache.rows[key] = (toks, payload[: len(payload) - job.meta.logits_tail])
    h2 = Harness(cache)
    calls = _count_prefills(h2)
    h2.complete("r2", P48)
    h2.run()
    assert h2.result("r2").generated == cold.generated
    assert calls == [(47, 1)]  # the primer: the last prompt token decoded again


def test_prefill_never_leaves_a_small_tail_batch() -> None:
    h = Harness(policy=msgspec.structs.replace(SMALL_POLICY, saves_enabled=False))
    calls = _count_prefills(h)
    h.complete("r1", "x" * 36)  # 37 tokens with BOS, chunk 8: 8,8,8,13 (not 8,8,8,8,5)
    h.run()
    assert [n for _, n in calls] == [8, 8, 8, 13]


def test_prefill_only_then_parent_key_resume() -> None:
    from erllama.protocol.messages import PrefillResult

    cache = FakeCache()
    h = Harness(cache)
    prompt = h.backend.tokenize(P48)
    h.complete("p1", prompt, mode="prefill")
    h.run()
    msgs = h.for_request("p1")
    assert len(msgs) == 1 and isinstance(msgs[0], Reply)
    pre = decode_result(msgs[0].result, PrefillResult)
    assert unpack_tokens(pre.context_tokens) == prompt and pre.committed_tokens == len(prompt)
    assert pre.finish_key is not None and pre.cache_hit_kind == "cold"
    assert pre.finish_key == h.cache.saves[-1].key  # the 48-token rung already holds it
    follow = P48 + " and then some more text"
    gen, _ = reference(follow)
    h2 = Harness(cache)  # another worker: only the cache can help
    h2.complete("c1", follow, parent_key=pre.finish_key)
    h2.run()
    r = h2.result("c1")
    assert r.cache_hit_kind == "partial" and r.cache_delta.read == len(prompt)
    assert unpack_tokens(r.generated) == gen
    assert cache.counters["hits_resume"] == 1


def test_batch_safe_rungs() -> None:
    from erllama.workers.engine import batch_safe_rungs

    assert batch_safe_rungs([256, 512, 768], 0, 1024, 128) == [256, 512, 768]
    assert batch_safe_rungs([256, 512, 768], 0, 860, 128) == [256, 512]  # 92 after 768
    assert batch_safe_rungs([768], 700, 860, 128) == []  # 68 before, 92 after: both small
    assert batch_safe_rungs([256, 300, 512], 0, 700, 128) == [256, 512]
    assert batch_safe_rungs([512], 0, 600, 128) == []  # 88 after the rung
