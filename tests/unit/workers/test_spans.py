"""Thinking and tool-call spans (workers/spans.py): the detector, one request's run, the engine.

The stub tokenizes byte by byte, so every marker arrives split over several
tokens; ``StubOpts.script`` makes the stub say a given text.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from typing import Any

import msgspec
import pytest

from erllama.config import (
    CacheConfig,
    ConfigError,
    Markers,
    ModelSpec,
    StubOpts,
    convert_model_spec,
    validate_model_spec,
)
from erllama.protocol.errors import ErrorCode, InvalidRequestError
from erllama.protocol.messages import (
    DoneEvent,
    ErrorReply,
    Msg,
    ThinkingDelta,
    ThinkingEnd,
    TokenEvent,
    ToolCallDelta,
    ToolCallEnd,
)
from erllama.protocol.tokens import unpack_tokens
from erllama.workers.backend import SamplerOptions
from erllama.workers.request import Request
from erllama.workers.spans import Segment, SpanDetector, SpanRun, SpanSetup, sign_block
from erllama.workers.stub import EOS, StubBackend, StubSampler

from .fakes import Harness

pytestmark = pytest.mark.timeout(60)

THINK = Markers(start="<think>", end="</think>")
TOOL = Markers(start="<tool>", end="</tool>")
TOOL_PAYLOAD = Markers(start="<tool>", end="</tool>", payload_start="<arg>", payload_end="</arg>")
KEY = "secret"


def sig(block: str, key: str = KEY) -> bytes:
    return hmac.new(key.encode(), block.encode(), hashlib.sha256).digest()


def spec(
    script: str | None = None,
    *,
    thinking: Markers | None = THINK,
    tool: Markers | None = TOOL,
    key: str | None = KEY,
    n_ctx: int = 512,
    **kw: Any,
) -> ModelSpec:
    return ModelSpec(
        id="m",
        backend="stub",
        default_response_tokens=kw.pop("default_response_tokens", 64),
        stub=StubOpts(n_ctx=n_ctx, n_vocab=300, script=script, **kw),
        thinking_markers=thinking,
        tool_call_markers=tool,
        thinking_signing_key=key,
    )


def feed_all(det: SpanDetector, parts: Sequence[str]) -> list[Segment]:
    out: list[Segment] = []
    for p in parts:
        out.extend(det.feed(p))
    out.extend(det.finish())
    return merge(out)


def merge(segs: list[Segment]) -> list[Segment]:
    """Adjacent content segments of one kind joined (feeds split them arbitrarily)."""
    out: list[Segment] = []
    for s in segs:
        if out and s.kind == out[-1].kind and s.kind in ("text", "think", "tool"):
            out[-1] = Segment(s.kind, out[-1].text + s.text)
        else:
            out.append(s)
    return out


# ================================================================ the detector
TEXT = "Hi <think>let me see</think>Answer: <tool>{f}</tool> done"
EXPECTED = [
    Segment("text", "Hi "),
    Segment("think_start", "<think>"),
    Segment("think", "let me see"),
    Segment("think_end", "</think>", "let me see"),
    Segment("text", "Answer: "),
    Segment("tool_start", "<tool>"),
    Segment("tool", "{f}"),
    Segment("tool_end", "</tool>", "{f}"),
    Segment("text", " done"),
]


def test_detector_whole_text_at_once() -> None:
    assert feed_all(SpanDetector(THINK, TOOL), [TEXT]) == EXPECTED


def test_detector_one_character_at_a_time() -> None:
    assert feed_all(SpanDetector(THINK, TOOL), list(TEXT)) == EXPECTED


@pytest.mark.parametrize("cut", range(1, len(TEXT)))
def test_detector_any_split_point(cut: int) -> None:
    assert feed_all(SpanDetector(THINK, TOOL), [TEXT[:cut], TEXT[cut:]]) == EXPECTED


def test_detector_holds_back_a_possible_marker_and_releases_a_false_start() -> None:
    det = SpanDetector(THINK, TOOL)
    assert det.feed("a <thi") == [Segment("text", "a ")]
    assert det.held == "<thi"
    assert det.feed("s is") == [Segment("text", "<this is")]
    assert det.held == ""
    assert det.feed("x <") == [Segment("text", "x ")]
    assert det.finish() == [Segment("text", "<")]  # the end: held text is plain after all


def test_detector_end_marker_outside_a_span_is_plain_text() -> None:
    assert feed_all(SpanDetector(THINK, TOOL), ["a</think>b"]) == [Segment("text", "a</think>b")]


def test_detector_open_span_at_the_end_has_no_end_segment() -> None:
    det = SpanDetector(THINK, TOOL)
    segs = feed_all(det, ["<think>abc</th"])
    assert segs == [Segment("think_start", "<think>"), Segment("think", "abc</th")]
    assert det.state == "think"


def test_detector_two_blocks_and_the_leftmost_marker_wins() -> None:
    segs = feed_all(SpanDetector(THINK, TOOL), ["<tool>x</tool><think>y</think><think>z</think>"])
    assert [(s.kind, s.block) for s in segs if s.kind.endswith("_end")] == [
        ("tool_end", "x"),
        ("think_end", "y"),
        ("think_end", "z"),
    ]


def test_detector_payload_markers_switch_greedy_and_stay_in_the_span() -> None:
    det = SpanDetector(None, TOOL_PAYLOAD)
    assert not det.greedy
    det.feed("<tool>{name: f, ")
    assert det.greedy  # tool syntax: greedy
    det.feed("<arg>free text")
    assert not det.greedy  # the payload: the request's sampler
    det.feed("</arg>}")
    assert det.greedy
    segs = det.feed("</tool>")
    assert segs[-1] == Segment("tool_end", "</tool>", "{name: f, <arg>free text</arg>}")
    assert not det.greedy and det.state == "plain"


def test_detector_close_thinking_swallows_held_text() -> None:
    det = SpanDetector(THINK, None)
    det.feed("<think>abc</th")
    seg = det.close_thinking()
    assert seg == Segment("think_end", "</th", "abc")
    assert det.state == "plain" and det.held == ""
    assert det.close_thinking() is None
    assert det.feed("ok") == [Segment("text", "ok")]


def test_detector_without_markers_is_plain() -> None:
    det = SpanDetector(None, None)
    assert det.feed("<think>") == [Segment("text", "<think>")]


def test_sign_block() -> None:
    assert sign_block(b"k", "abc") == hmac.new(b"k", b"abc", hashlib.sha256).digest()
    assert sign_block(b"", "abc") == b""


# ================================================================ one request's run
def make_run(
    *, thinking: bool = True, budget: int | None = None, stops: list[str] | None = None, **kw: Any
) -> tuple[SpanRun, Request, StubBackend]:
    s = spec(**kw)
    backend = StubBackend(s)
    req = Request(
        client_id=b"c",
        request_id="r",
        mode="stream",
        prompt=[1],
        max_tokens=100,
        sampler_opts=SamplerOptions(),
        stop_sequences=stops or [],
        parent_key=None,
        session_id=None,
        received_at=0.0,
        thinking=thinking,
        thinking_budget=budget,
    )
    return SpanRun(SpanSetup(s, backend), req), req, backend


def feed(run: SpanRun, token: int, piece: bytes, *, eog: bool = False) -> list[Msg]:
    run.feed(token, piece, eog=eog)
    return run.take()


def end(run: SpanRun) -> list[Msg]:
    run.finish()
    return run.take()


def run_pieces(run: SpanRun, pieces: Sequence[str], *, eog: bool = True) -> list[Msg]:
    """Feed each piece as one token (ids 1000+i), then EOG; all events."""
    out: list[Msg] = []
    for i, p in enumerate(pieces):
        out += feed(run, 1000 + i, p.encode())
    if eog:
        out += feed(run, EOS, b"", eog=True)
    run.finish()
    out += run.take()
    return out


def texts(events: list[Msg], cls: type[Msg]) -> list[str]:
    return [e.text for e in events if isinstance(e, cls)]  # type: ignore[attr-defined]


def test_run_multi_character_tokens_with_split_markers() -> None:
    run, req, _ = make_run()
    pieces = ["Hel", "lo <th", "ink>deep", " th", "ought</th", "ink>", "Bye"]
    events = run_pieces(run, pieces)
    assert "".join(texts(events, TokenEvent)) == "Hello Bye"
    assert texts(events, ThinkingDelta) == ["deep", " th", "ought"]
    ends = [e for e in events if isinstance(e, ThinkingEnd)]
    assert len(ends) == 1 and ends[0].signature == sig("deep thought")
    # the token with plain text before the marker is visible; the rest of the block hidden
    assert req.generated == [1000, 1001, 1006, EOS]
    assert [e.seq for e in events] == list(range(len(events)))  # type: ignore[attr-defined]
    # thinking_end comes before any later token event
    kinds = [type(e).__name__ for e in events]
    assert kinds.index("ThinkingEnd") < max(i for i, k in enumerate(kinds) if k == "TokenEvent")


def test_run_held_tokens_are_decided_later_in_order() -> None:
    run, req, _ = make_run()
    assert feed(run, 1, b"<") == [] and run.undecided == 1
    assert feed(run, 2, b"t") == [] and run.undecided == 2
    events = feed(run, 3, b"x")  # "<tx": not a marker after all
    assert [(e.token_id, e.text) for e in events] == [(1, "<tx"), (2, ""), (3, "")]  # type: ignore[attr-defined]
    assert req.generated == [1, 2, 3] and run.undecided == 0


def test_run_marker_tokens_are_hidden_one_byte_at_a_time() -> None:
    run, req, _ = make_run()
    events = run_pieces(run, list("<think>ab</think>c"))
    assert texts(events, ThinkingDelta) == ["a", "b"]
    assert "".join(texts(events, TokenEvent)) == "c"
    assert req.generated == [1000 + len("<think>ab</think>"), EOS]


def test_run_thinking_not_enabled() -> None:
    run, _, _ = make_run(thinking=False)
    run.feed(1, b"ok <think")
    with pytest.raises(InvalidRequestError) as ei:
        run.feed(2, b">")
    assert ei.value.code == ErrorCode.THINKING_NOT_ENABLED


def test_run_without_key_signs_nothing() -> None:
    run, _, _ = make_run(key=None)
    events = run_pieces(run, ["<think>x</think>"])
    assert [e.signature for e in events if isinstance(e, ThinkingEnd)] == [b""]


def test_run_budget() -> None:
    run, req, _ = make_run(budget=2)
    run.feed(1, b"<think>")
    assert not run.budget_exhausted
    run.feed(2, b"a")
    run.feed(3, b"")  # an empty piece is no delta
    assert not run.budget_exhausted
    run.feed(4, b"b</th")
    assert run.deltas == 2 and run.budget_exhausted
    run.close_thinking()
    events = run.take()
    assert texts(events, ThinkingDelta) == ["a", "b"] and isinstance(events[-1], ThinkingEnd)
    assert events[-1].signature == sig("ab")  # what was delivered; held "</th" is not
    assert not run.budget_exhausted
    assert req.generated == []
    events = feed(run, 5, b"Hi") + end(run)
    assert texts(events, TokenEvent) == ["Hi"] and req.generated == [5]


def test_run_stop_sequences_match_plain_text_only() -> None:
    run, req, _ = make_run(stops=["STOP"])
    events = feed(run, 1, b"<think>STOP</think>a")
    assert run.matched is None
    events += feed(run, 2, b"bST") + feed(run, 3, b"OPxyz") + end(run)
    assert run.matched == "STOP"
    assert "".join(texts(events, TokenEvent)) == "ab"
    assert texts(events, ThinkingDelta) == ["STOP"]
    assert req.generated == [1, 2, 3]


def test_run_held_plain_text_released_at_the_end_inside_thinking() -> None:
    run, req, _ = make_run(stops=["xyz"])
    events = feed(run, 1, b"ab x")  # " x" could start the stop: held
    assert texts(events, TokenEvent) == ["ab"]
    events = feed(run, 2, b"<think>hm") + end(run)
    # the block never closed; the held plain text still reaches the client
    assert texts(events, TokenEvent) == [" x"] and texts(events, ThinkingDelta) == ["hm"]
    assert req.generated == [1]


def test_run_held_plain_text_joins_the_last_token_event() -> None:
    run, req, _ = make_run(stops=["xyz"])
    assert texts(feed(run, 1, b"abcd"), TokenEvent) == ["ab"]  # "cd" could start "xyz"
    run.feed(2, b" x")  # releases "cd", holds " x"; then the reply is cut (a limit)
    run.finish()
    events = run.take()
    assert [(e.token_id, e.text) for e in events] == [(2, "cd x")]  # type: ignore[attr-defined]
    assert req.generated == [1, 2]


def test_run_tool_call_tokens_are_visible_with_empty_token_text() -> None:
    run, req, _ = make_run()
    events = run_pieces(run, ["call <to", 'ol>{"a"', ": 1}</tool> ok"])
    assert texts(events, ToolCallDelta) == ['{"a"', ": 1}"]
    assert texts(events, ToolCallEnd) == ['{"a": 1}']
    assert "".join(texts(events, TokenEvent)) == "call  ok"
    assert req.generated == [1000, 1001, 1002, EOS]


def test_run_control_token_markers_render_as_their_text() -> None:
    class Special(StubBackend):
        """A stub whose <think> / </think> are single tokens rendering as nothing."""

        IDS = {"<think>": 290, "</think>": 291}

        def tokenize(
            self, text: str, *, add_special: bool = True, parse_special: bool = False
        ) -> list[int]:
            if parse_special and text in self.IDS:
                return [self.IDS[text]]
            return super().tokenize(text, add_special=add_special, parse_special=parse_special)

    s = spec()
    backend = Special(s)
    setup = SpanSetup(s, backend)
    assert setup.marker_pieces == {290: b"<think>", 291: b"</think>"}
    assert setup.piece(backend, 290) == b"<think>" and setup.piece(backend, 70) == b"C"
    assert setup.think_end_tokens == [291]


# ================================================================ through the engine
SCRIPT = '<think>abc def</think>Hello <tool>{"a": 1}</tool> bye'


def events_of(h: Harness, rid: str) -> list[Msg]:
    msgs = h.for_request(rid)
    assert [m.seq for m in msgs] == list(range(len(msgs)))  # type: ignore[attr-defined]
    return msgs


def test_engine_stream_routes_every_span() -> None:
    h = Harness(spec=spec(SCRIPT))
    h.complete("s", "Q?", mode="stream", thinking="enabled")
    h.run()  # asserts the stub's KV == KvState.tokens (D27)
    msgs = events_of(h, "s")
    assert isinstance(msgs[-1], DoneEvent)
    assert "".join(texts(msgs, ThinkingDelta)) == "abc def"
    assert [m.signature for m in msgs if isinstance(m, ThinkingEnd)] == [sig("abc def")]
    assert "".join(texts(msgs, ToolCallDelta)) == '{"a": 1}'
    assert texts(msgs, ToolCallEnd) == ['{"a": 1}']
    assert "".join(texts(msgs, TokenEvent)) == "Hello  bye"
    stats = msgs[-1].stats
    prompt = h.backend.tokenize("Q?")
    # the KV holds everything, thinking included; generated only what is visible
    assert h.engine.kv.tokens == prompt + h.backend.tokenize(SCRIPT, add_special=False) + [EOS]
    visible = [m.token_id for m in msgs if isinstance(m, TokenEvent)]
    assert h.backend.detokenize(visible) == 'Hello <tool>{"a": 1}</tool> bye'
    assert stats.completion_tokens == len(visible)
    assert stats.committed_tokens == len(h.engine.kv.tokens)
    assert stats.finish_reason == "stop"


def test_engine_complete_reply_drops_thinking_keeps_tool_calls() -> None:
    h = Harness(spec=spec(SCRIPT))
    h.complete("c", "Q?", thinking="enabled")
    h.run()
    r = h.result("c")
    assert r.reply == 'Hello <tool>{"a": 1}</tool> bye'
    assert h.backend.detokenize(unpack_tokens(r.generated)) == r.reply
    ctx = unpack_tokens(r.context_tokens)
    assert ctx == h.engine.kv.tokens and h.backend.detokenize(ctx) == "Q?" + SCRIPT
    # the finish save keys exactly the KV (thinking tokens included)
    assert r.finish_key is not None
    assert h.cache.rows[r.finish_key][0] == ctx


def test_engine_thinking_not_enabled_is_an_error_without_done() -> None:
    h = Harness(spec=spec(SCRIPT))
    h.complete("s", "Q?", mode="stream")
    h.complete("c", "Q?")
    h.run()
    msgs = h.for_request("s")
    assert isinstance(msgs[-1], ErrorReply) and msgs[-1].code == "thinking_not_enabled"
    assert not any(isinstance(m, DoneEvent) for m in msgs)
    assert h.error("c").code == "thinking_not_enabled"


def test_engine_budget_closes_the_block_and_the_model_goes_on() -> None:
    h = Harness(spec=spec("<think>abcdefgh</think>Answer"))
    h.complete("s", "Q?", mode="stream", thinking="enabled", thinking_budget_tokens=3)
    h.run()
    msgs = events_of(h, "s")
    assert texts(msgs, ThinkingDelta) == ["a", "b", "c"]
    assert [m.signature for m in msgs if isinstance(m, ThinkingEnd)] == [sig("abc")]
    assert "".join(texts(msgs, TokenEvent)) == "Answer"
    # the end marker was decoded into the KV right after the budget: the model answered
    assert h.backend.detokenize(h.engine.kv.tokens) == "Q?<think>abc</think>Answer"
    assert isinstance(msgs[-1], DoneEvent) and msgs[-1].stats.finish_reason == "stop"


def test_engine_budget_badarg() -> None:
    h = Harness(spec=spec(SCRIPT))
    h.complete("b", "Q?", thinking="enabled", thinking_budget_tokens=0)
    h.run()
    assert h.error("b").code == "badarg"


def test_engine_response_tokens_count_visible_tokens() -> None:
    h = Harness(spec=spec("<think>" + "x" * 30 + "</think>" + "y" * 30))
    h.complete("c", "Q?", thinking="enabled", response_tokens=4)
    h.run()
    r = h.result("c")
    assert r.reply == "yyyy" and r.finish_reason == "length"
    assert len(unpack_tokens(r.context_tokens)) == 3 + 7 + 30 + 8 + 4


def test_engine_context_full_of_thinking_is_length() -> None:
    h = Harness(spec=spec("<think>" + "z" * 200, n_ctx=64))
    h.complete("s", "Q?", mode="stream", thinking="enabled")
    h.run()
    msgs = events_of(h, "s")
    done = msgs[-1]
    assert isinstance(done, DoneEvent) and done.stats.finish_reason == "length"
    assert done.stats.completion_tokens == 0 and done.stats.committed_tokens == 64
    assert not any(isinstance(m, ThinkingEnd) for m in msgs)  # never closed


def test_engine_cancel_inside_thinking() -> None:
    def on_emit(h: Harness, cid: bytes, msg: Msg) -> None:
        if isinstance(msg, ThinkingDelta) and msg.text == "b":
            h.cancel("s")

    h = Harness(spec=spec("<think>" + "abcdefgh" * 4 + "</think>ok"), on_emit=on_emit)
    h.complete("s", "Q?", mode="stream", thinking="enabled")
    h.run()
    done = h.for_request("s")[-1]
    assert isinstance(done, DoneEvent) and done.stats.cancelled


class SpySampler:
    """Counts the samples of one chain."""

    def __init__(self, inner: StubSampler, log: list[str], name: str) -> None:
        self._inner, self._log, self._name = inner, log, name

    def sample(self, row: int = -1) -> int:
        self._log.append(self._name)
        return self._inner.sample(row)

    def sample_tokens(self, tokens: list[int]) -> int:
        return self._inner.sample_tokens(tokens)

    def close(self) -> None:
        self._inner.close()


def spy_samplers(h: Harness) -> list[str]:
    log: list[str] = []
    built: list[SamplerOptions] = []
    orig = h.backend.new_sampler

    def new_sampler(seq: int, opts: SamplerOptions) -> SpySampler:
        built.append(opts)
        name = "greedy" if len(built) % 2 == 0 else "request"
        return SpySampler(orig(seq, opts), log, name)

    h.backend.new_sampler = new_sampler  # type: ignore[method-assign,assignment]
    return log


def test_engine_greedy_chain_inside_tool_syntax_only() -> None:
    script = "a<tool>fn<arg>xy</arg>z</tool>b"
    h = Harness(spec=spec(script, tool=TOOL_PAYLOAD))
    log = spy_samplers(h)
    h.complete("c", "Q?", thinking="enabled")
    h.run()
    assert h.result("c").reply == script
    # sample i picks token i: request for "a<tool>", greedy for "fn<arg>", request for the
    # payload "xy</arg>", greedy for "z</tool>", request after the span
    names = "".join("g" if n == "greedy" else "r" for n in log)
    expected = "r" * 7 + "g" * 7 + "r" * 8 + "g" * 8 + "r" * 2
    assert names == expected


def test_engine_no_tool_markers_builds_one_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[SamplerOptions] = []
    for tool, n in ((None, 1), (TOOL, 2)):
        h = Harness(spec=spec(SCRIPT.replace("<tool>", "").replace("</tool>", ""), tool=tool))
        orig = h.backend.new_sampler
        built.clear()

        def new_sampler(seq: int, opts: SamplerOptions, orig: Any = orig) -> StubSampler:
            built.append(opts)
            return orig(seq, opts)  # type: ignore[no-any-return]

        h.backend.new_sampler = new_sampler  # type: ignore[method-assign]
        h.complete("c", "Q?", thinking="enabled")
        h.run()
        assert len(built) == n  # D12: the greedy chain only with tool-call markers


def test_engine_without_markers_keeps_the_plain_loop() -> None:
    h = Harness(spec=spec(SCRIPT, thinking=None, tool=None))
    assert h.engine.spans is None
    h.complete("c", "Q?", thinking="enabled")
    h.run()
    assert h.result("c").reply == SCRIPT  # markers are just text for this model


def test_stub_script_resumes_after_an_injected_piece() -> None:
    b = StubBackend(spec("<think>abcdef</think>Hi"))
    toks = b.tokenize("Q?")
    out = []
    for _ in range(40):
        t = b.predict(toks)
        if t == EOS:
            break
        toks.append(t)
        out.append(t)
    assert b.detokenize(out) == "<think>abcdef</think>Hi"
    jumped = b.tokenize("Q?<think>ab</think>")
    assert b.detokenize([b.predict(jumped)]) == "H"


# ================================================================ config
def test_marker_config_validation() -> None:
    cache = CacheConfig()
    for bad in (
        {"thinking_markers": {"start": "", "end": "</think>"}},
        {"tool_call_markers": {"start": "<t>", "end": "</t>", "payload_start": "<a>"}},
    ):
        s = convert_model_spec({"backend": "stub", **bad})
        with pytest.raises(ConfigError):
            validate_model_spec(s, cache)
    ok = convert_model_spec(
        {
            "backend": "stub",
            "thinking_markers": {"start": "<t>", "end": "</t>"},
            "thinking_signing_key": "k",
        }
    )
    validate_model_spec(ok, cache)
    assert msgspec.to_builtins(ok)["thinking_signing_key"] == "k"


def test_span_events_go_out_before_their_token_is_decoded() -> None:
    """One generation loop for both sinks: emit, then decode (the plain loop's order)."""
    kv_at_emit: list[int] = []

    def watch(h: Harness, _cid: bytes, msg: object) -> None:
        if isinstance(msg, ThinkingDelta | TokenEvent):
            kv_at_emit.append(len(h.backend.seq_tokens(0)))

    h = Harness(spec=spec(SCRIPT), on_emit=watch)
    h.complete("s", "Q?", mode="stream", thinking="enabled")
    h.run()
    prompt = len(h.backend.tokenize("Q?"))
    # the first thinking delta ("a", the token after the 7 tokens of "<think>") went out
    # while the KV held only the prompt and the marker (a one-character token each)
    assert SCRIPT.startswith("<think>a")
    assert kv_at_emit and kv_at_emit[0] == prompt + len("<think>")
