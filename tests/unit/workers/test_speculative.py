"""``verify`` on the engine (workers/speculative.py) with the stub backend.

The stub's greedy choice is a function of the whole token list, so the
expected argmax of every position is ``backend.predict(prefix)``.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from erllama.protocol.codec import decode_result
from erllama.protocol.errors import ErrorCode
from erllama.protocol.messages import (
    ErrorReply,
    Msg,
    Reply,
    TokenEvent,
    Verify,
    VerifyResult,
)
from erllama.protocol.tokens import pack_tokens, unpack_tokens
from erllama.workers.sequence import KvState
from erllama.workers.speculative import verify
from erllama.workers.stub import EOS, StubBackend

from .fakes import Harness, stub_spec

pytestmark = pytest.mark.timeout(60)

P40 = "the quick brown fox jumps over the lazy"  # 40 tokens with BOS


def vmsg(rid: str, prefix: list[int], cands: list[int], k: int) -> Verify:
    return Verify(
        request_id=rid, model="m", prefix=pack_tokens(prefix), candidates=pack_tokens(cands), k=k
    )


def run_verify(h: Harness, prefix: list[int], cands: list[int], k: int, rid: str = "v") -> Any:
    h.send(vmsg(rid, prefix, cands, k))
    h.run()
    msgs = h.for_request(rid)
    assert len(msgs) == 1, msgs
    if isinstance(msgs[0], ErrorReply):
        return msgs[0]
    assert isinstance(msgs[0], Reply)
    return decode_result(msgs[0].result, VerifyResult)


def greedy(backend: StubBackend, prefix: list[int], n: int) -> list[int]:
    toks = list(prefix)
    out = []
    for _ in range(n):
        t = backend.predict(toks)
        out.append(t)
        toks.append(t)
    return out


def test_verify_accepts_a_greedy_draft() -> None:
    h = Harness()
    prefix = h.backend.tokenize(P40)
    draft = greedy(h.backend, prefix, 8)
    r = run_verify(h, prefix, draft, 8)
    assert (r.accepted, r.eos) == (8, False)
    assert r.next_token == h.backend.predict(prefix + draft)


def test_verify_the_draft_of_an_infer() -> None:
    h = Harness()
    prefix = h.backend.tokenize(P40)
    h.complete("d", prefix, mode="infer", response_tokens=6)
    h.run()
    draft = [m.token_id for m in h.for_request("d") if isinstance(m, TokenEvent)]
    assert run_verify(h, prefix, draft, 6).accepted == 6


@pytest.mark.parametrize("j", [0, 1, 4, 7])
def test_a_corrupted_candidate_stops_acceptance(j: int) -> None:
    h = Harness()
    prefix = h.backend.tokenize(P40)
    draft = greedy(h.backend, prefix, 8)
    bad = list(draft)
    bad[j] = 260 if draft[j] != 260 else 261  # valid ids, never the stub's choice
    r = run_verify(h, prefix, bad, 8)
    assert r.accepted == j
    assert r.next_token == draft[j]  # the model's own token at the first disagreement


def test_k_limits_the_candidates() -> None:
    h = Harness()
    prefix = h.backend.tokenize(P40)
    draft = greedy(h.backend, prefix, 8)
    r = run_verify(h, prefix, draft, 3)
    assert r.accepted == 3 and r.next_token == draft[3]
    r = run_verify(h, prefix, draft, 100, rid="v2")  # K' = min(k, len(candidates))
    assert r.accepted == 8
    r = run_verify(h, prefix, [], 5, rid="v3")
    assert r.accepted == 0 and r.next_token == draft[0]


def test_eos_is_never_accepted_and_comes_back_as_eos() -> None:
    h = Harness(spec=stub_spec(script="ab"))  # the stub says "ab", then EOS
    prefix = h.backend.tokenize("Q")
    ab = h.backend.tokenize("ab", add_special=False)
    r = run_verify(h, prefix, [*ab, EOS], 3)
    assert (r.accepted, r.next_token, r.eos) == (2, EOS, True)
    r = run_verify(h, prefix, ab[:1], 1, rid="v2")
    assert (r.accepted, r.eos) == (1, False) and r.next_token == ab[1]


@pytest.mark.parametrize(
    ("prefix", "cands", "k", "code"),
    [
        ([1, 50], [60], 0, "badarg"),
        ([1, 50], [60], -3, "badarg"),
        ([], [60], 1, "empty_prefix"),
        ([1, 50], [299, 300], 2, "invalid_token"),
        ([1] * 600, [60], 1, "context_overflow"),
    ],
)
def test_bad_input(prefix: list[int], cands: list[int], k: int, code: str) -> None:
    h = Harness()
    err = run_verify(h, prefix, cands, k)
    assert isinstance(err, ErrorReply) and err.code == code


def test_ragged_token_bytes_are_bad_request() -> None:
    h = Harness()
    msg = msgspec.structs.replace(vmsg("v", [1, 50], [60], 1), prefix=b"\x01\x00\x00")
    h.send(msg)
    h.run()
    assert h.error("v").code == "bad_request"


def test_invalid_candidate_beyond_k_is_ignored() -> None:
    h = Harness()
    prefix = h.backend.tokenize(P40)
    draft = greedy(h.backend, prefix, 2)
    assert run_verify(h, prefix, [*draft, 10**6], 2).accepted == 2


def test_not_supported_without_prefill_all_logits() -> None:
    class Plain:
        """Only what check_verify reads before refusing."""

        info = StubBackend(stub_spec()).info

    with pytest.raises(Exception) as ei:
        verify(Plain(), KvState(), vmsg("v", [1, 50], [60], 1), busy=False)  # type: ignore[arg-type]
    assert getattr(ei.value, "code", None) == ErrorCode.NOT_SUPPORTED


def test_busy_while_a_request_runs_or_waits() -> None:
    sent: list[str] = []

    def on_emit(h: Harness, cid: bytes, msg: Msg) -> None:
        if isinstance(msg, TokenEvent) and not sent:
            sent.append("x")
            h.send(vmsg("busy1", [1, 50], [60], 1))
            h.complete("queued", "other", mode="stream", response_tokens=2)
            h.send(vmsg("busy2", [1, 50], [60], 1))

    h = Harness(on_emit=on_emit)
    h.complete("s", P40, mode="stream", response_tokens=5)
    h.run()
    assert h.error("busy1").code == "busy"
    assert h.error("busy2").code == "busy"
    # once idle, verify runs
    assert run_verify(h, [1, 50], [60], 1, rid="idle").accepted in (0, 1)


def test_shutting_down() -> None:
    from erllama.workers.engine import StopRequest

    h = Harness()
    h.engine._begin_stop(StopRequest(drain=True))
    err = run_verify(h, [1, 50], [60], 1)
    assert err.code == "shutting_down"


# ================================================================ the KV afterwards (D28)
def reference(prompt: list[int], n: int = 12) -> list[int]:
    h = Harness()
    h.complete("ref", prompt, response_tokens=n)
    h.run()
    return unpack_tokens(h.result("ref").generated)


def _warm(h: Harness, prompt: list[int]) -> list[int]:
    h.complete("w", prompt, response_tokens=12)
    h.run()
    return list(h.engine.kv.tokens)


def test_verify_on_an_unrelated_prefix_clears_and_a_request_after_is_unchanged() -> None:
    h = Harness()
    prompt = h.backend.tokenize(P40)
    _warm(h, prompt)
    other = h.backend.tokenize("completely different words here")
    run_verify(h, other, greedy(h.backend, other, 4), 4)
    assert h.engine.kv.tokens == [] and h.backend.seq_tokens(0) == []
    h.complete("after", prompt, response_tokens=12)
    h.run()
    assert unpack_tokens(h.result("after").generated) == reference(prompt)


def test_verify_on_a_shared_prefix_keeps_the_cells_it_reused() -> None:
    h = Harness()
    prompt = h.backend.tokenize(P40)
    live = _warm(h, prompt)  # prompt + 12 generated tokens
    prefix = live[:45]
    draft = greedy(h.backend, prefix, 6)
    assert run_verify(h, prefix, draft, 6).accepted == 6
    # the reused part (up to P-1) stays, bit for bit; the rest is gone; the view is exact
    assert h.engine.kv.tokens == live[:44] == h.backend.seq_tokens(0)
    assert not h.engine.kv.fresh
    h.complete("after", prompt, response_tokens=12)
    h.run()
    r = h.result("after")
    assert unpack_tokens(r.generated) == reference(prompt)
    assert r.cache_hit_kind in ("exact", "partial")


def test_verify_extending_the_live_state_leaves_it_as_it_was() -> None:
    h = Harness()
    prompt = h.backend.tokenize(P40)
    live = _warm(h, prompt)
    cont = greedy(h.backend, live, 5)
    prefix = live + cont  # the live tokens are a prefix of prefix[:P-1]
    r = run_verify(h, prefix, greedy(h.backend, prefix, 3), 3)
    assert r.accepted == 3
    assert h.engine.kv.tokens == live == h.backend.seq_tokens(0)


def test_verify_of_a_short_shared_prefix_is_not_worth_keeping() -> None:
    h = Harness()
    prompt = h.backend.tokenize(P40)
    live = _warm(h, prompt)
    prefix = live[:10]
    run_verify(h, prefix, greedy(h.backend, prefix, 2), 2)
    assert h.engine.kv.tokens == []  # < MIN_PARTIAL_TOKENS in common: cleared


def test_a_failing_pass_leaves_an_exact_view() -> None:
    h = Harness()
    prompt = h.backend.tokenize(P40)
    live = _warm(h, prompt)

    def boom(seq: int, tokens: Any, start_pos: int) -> list[int]:
        h.backend.prefill(seq, tokens, start_pos)
        raise RuntimeError("decode failed")

    h.backend.prefill_all_logits = boom  # type: ignore[method-assign]
    err = run_verify(h, live[:45], [60, 61], 2)
    assert err.code == "internal"
    assert h.engine.kv.tokens == live[:44] == h.backend.seq_tokens(0)
