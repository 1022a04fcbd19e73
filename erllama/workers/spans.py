"""Thinking and tool-call spans of a generated reply, detected statefully (REFERENCE §8.8, D26).

Upstream tagged a token only when its id was one of a marker's token ids, so
a marker made of several tokens was missed and span bodies streamed as plain
text (D26). Here the configured marker *strings* (``ModelSpec.thinking_markers``
and ``tool_call_markers``) are matched in the decoded text stream:

* ``SpanDetector`` is a pure text state machine (``plain`` -> ``think`` ->
  ``plain``, ``plain`` -> ``tool`` -> ``plain``, with a ``payload`` sub-state
  inside a tool call). A marker may arrive split over any number of tokens:
  text that could still become a marker (a suffix of the text that is a
  proper prefix of a marker the current state looks for) is held back until
  the next text decides it, or until ``finish``.
* ``SpanRun`` turns the detector's segments of one request into stream
  events and decides, token by token, what is in ``generated``:

  - plain text -> ``token`` events (stop sequences match the plain text only,
    one ``TextStream`` over it, so a stop string matches the reply as the
    client reads it even when a thinking block sits in the middle);
  - thinking -> ``thinking_delta`` (one per token, non-empty only); the
    closing marker -> ``thinking_end`` with ``signature`` = HMAC-SHA256 of the
    block's UTF-8 bytes keyed with ``ModelSpec.thinking_signing_key`` (empty
    when no key is set). A start marker on a request without
    ``thinking="enabled"`` fails it with ``thinking_not_enabled`` (upstream; no
    ``done`` follows). ``thinking_budget_tokens``: once that many non-empty
    deltas went out, ``thinking_end`` is synthesised and the end marker's
    tokens are decoded into the KV (hidden), so the model goes on *after* its
    thinking instead of thinking on in plain text;
  - tool call -> ``tool_call_delta`` per token (payload markers included), and
    ``tool_call_end`` with the whole span text (the concatenation of the
    deltas; the start and end markers are not part of it).

  A token is *hidden* (not in ``generated``, no ``token`` event) when all of
  its characters belong to a thinking block or a thinking marker; every other
  token is visible, tool-call tokens included, so ``complete``'s ``reply``
  (``generated`` detokenized) keeps tool calls verbatim and drops thinking.
  A token whose text is held back is decided once its text is (events keep
  token order). Hidden tokens and injected end markers are still decoded into
  the KV and appended to ``KvState.tokens``: ``context_tokens`` (and every
  cache key) is exactly what is in the KV (D27 R), so it includes the
  thinking tokens that ``generated`` leaves out.

* ``generation.SpanSink`` feeds ``SpanRun`` from the engine's one generation
  loop: it samples with a greedy chain inside a tool-call span outside its
  payload (built only when tool-call markers are configured, D12 R), counts the
  response limit in visible tokens (held-back tokens count once decided, so a
  false marker start can take the reply a few tokens past it), and stops when
  the KV is full.

Marker tokens that render as nothing (llama.cpp control tokens: their piece is
empty unless ``special`` is asked for) are mapped back to their marker text
when the marker tokenizes to that single token, so they are seen too.

Alternatives turned down: matching marker token-id sequences (a model may
spell a marker with other tokens than the tokenizer's, and the text is what
the client sees); a regex over the whole reply after each token (quadratic,
and it cannot stream).
"""

from __future__ import annotations

import codecs
import hashlib
import hmac
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import msgspec

from erllama.config import Markers, ModelSpec
from erllama.protocol.errors import ErrorCode, InvalidRequestError
from erllama.protocol.messages import (
    Msg,
    ThinkingDelta,
    ThinkingEnd,
    TokenEvent,
    ToolCallDelta,
    ToolCallEnd,
)
from erllama.workers.backend import ModelBackend
from erllama.workers.request import Request
from erllama.workers.textstream import TextStream

if TYPE_CHECKING:
    pass

State = Literal["plain", "think", "tool"]
SegmentKind = Literal["text", "think_start", "think", "think_end", "tool_start", "tool", "tool_end"]
_CLASS: dict[str, State] = {
    "text": "plain",
    "think_start": "think",
    "think": "think",
    "think_end": "think",
    "tool_start": "tool",
    "tool": "tool",
    "tool_end": "tool",
}


@dataclass(frozen=True, slots=True)
class Segment:
    """A piece of the text: ``text`` is the characters it consumed (a marker's own text
    for ``*_start`` / ``*_end``); ``block`` is the whole thinking block (``think_end``)
    or the whole tool-call span (``tool_end``)."""

    kind: SegmentKind
    text: str
    block: str = ""

    @property
    def cls(self) -> State:
        return _CLASS[self.kind]


def _held_len(text: str, markers: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a marker."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best


class SpanDetector:
    """The text state machine (see the module docstring); pure, no tokens."""

    def __init__(self, thinking: Markers | None, tool: Markers | None) -> None:
        self._thinking = thinking
        self._tool = tool
        self.state: State = "plain"
        self.in_payload = False
        self._held = ""
        self._block: list[str] = []

    @property
    def held(self) -> str:
        """Text held back because it could still be (the start of) a marker."""
        return self._held

    @property
    def greedy(self) -> bool:
        """Inside a tool-call span and outside its payload: sample greedily (§8.8)."""
        return self.state == "tool" and not self.in_payload

    def _markers(self) -> list[tuple[str, SegmentKind | None]]:
        """What the current state looks for: ``(marker, kind)``; kind None = payload toggle."""
        th, tc = self._thinking, self._tool
        if self.state == "plain":
            out: list[tuple[str, SegmentKind | None]] = []
            if th is not None:
                out.append((th.start, "think_start"))
            if tc is not None:
                out.append((tc.start, "tool_start"))
            return out
        if self.state == "think":
            assert th is not None
            return [(th.end, "think_end")]
        assert tc is not None
        out = [(tc.end, "tool_end")]
        if self.in_payload and tc.payload_end:
            out.append((tc.payload_end, None))
        elif not self.in_payload and tc.payload_start:
            out.append((tc.payload_start, None))
        return out

    def _content(self, text: str, out: list[Segment]) -> None:
        if not text:
            return
        kind: SegmentKind = (
            "text" if self.state == "plain" else "think" if self.state == "think" else "tool"
        )
        if kind != "text":
            self._block.append(text)
        if out and out[-1].kind == kind:
            out[-1] = Segment(kind, out[-1].text + text)
        else:
            out.append(Segment(kind, text))

    def feed(self, text: str) -> list[Segment]:
        """Add decoded text; the segments that are decided now, in text order."""
        buf = self._held + text
        self._held = ""
        out: list[Segment] = []
        while buf:
            markers = self._markers()
            best: tuple[int, int, str, SegmentKind | None] | None = None
            for marker, kind in markers:
                pos = buf.find(marker)
                # leftmost wins; at the same position the longer marker
                if pos >= 0 and (
                    best is None or pos < best[0] or (pos == best[0] and len(marker) > best[1])
                ):
                    best = (pos, len(marker), marker, kind)
            if best is None:
                hold = _held_len(buf, [m for m, _ in markers])
                self._content(buf[: len(buf) - hold], out)
                self._held = buf[len(buf) - hold :]
                break
            pos, n, marker, kind = best
            self._content(buf[:pos], out)
            buf = buf[pos + n :]
            if kind is None:  # a payload marker: part of the tool call's text
                self._content(marker, out)
                self.in_payload = not self.in_payload
            elif kind in ("think_start", "tool_start"):
                self.state = "think" if kind == "think_start" else "tool"
                self._block = []
                out.append(Segment(kind, marker))
            else:
                out.append(Segment(kind, marker, "".join(self._block)))
                self.state = "plain"
                self.in_payload = False
                self._block = []
        return out

    def finish(self) -> list[Segment]:
        """The end of the reply: held text is content of the current state. An open span
        stays open (no end segment: ``thinking_end`` / ``tool_call_end`` mark *closed* spans)."""
        out: list[Segment] = []
        self._content(self._held, out)
        self._held = ""
        return out

    def close_thinking(self) -> Segment | None:
        """End the open thinking block now (the budget): ``think_end`` whose ``text`` is the
        held-back text it swallows (never delivered, not part of the signed block)."""
        if self.state != "think":
            return None
        seg = Segment("think_end", self._held, "".join(self._block))
        self._held = ""
        self._block = []
        self.state = "plain"
        return seg


def sign_block(key: bytes, block: str) -> bytes:
    """The ``thinking_end`` signature: HMAC-SHA256 of the block's UTF-8 bytes (b"" unkeyed)."""
    if not key:
        return b""
    return hmac.new(key, block.encode("utf-8"), hashlib.sha256).digest()


class SpanSetup:
    """What span detection needs of one model, built once when the engine starts.

    Args:
        spec: the model's spec (markers, signing key).
        backend: the loaded model (tokenizes the markers).
    """

    def __init__(self, spec: ModelSpec, backend: ModelBackend) -> None:
        self.thinking = spec.thinking_markers
        self.tool = spec.tool_call_markers
        self.key = (spec.thinking_signing_key or "").encode("utf-8")
        self.marker_pieces: dict[int, bytes] = {}
        texts = [m for ms in (self.thinking, self.tool) if ms is not None for m in _texts(ms)]
        for text in texts:
            toks = backend.tokenize(text, add_special=False, parse_special=True)
            if len(toks) == 1 and not backend.token_to_piece(toks[0]):
                self.marker_pieces[toks[0]] = text.encode("utf-8")
        self.think_end_tokens: list[int] = []
        if self.thinking is not None:
            self.think_end_tokens = backend.tokenize(
                self.thinking.end, add_special=False, parse_special=True
            )

    @classmethod
    def for_model(cls, spec: ModelSpec, backend: ModelBackend) -> SpanSetup | None:
        """None when the model has no markers (the engine keeps its plain loop)."""
        if spec.thinking_markers is None and spec.tool_call_markers is None:
            return None
        return cls(spec, backend)

    def piece(self, backend: ModelBackend, token: int) -> bytes:
        """The token's bytes; a marker's control token renders as the marker's text."""
        piece = backend.token_to_piece(token)
        if not piece:
            return self.marker_pieces.get(token, piece)
        return piece


def _texts(m: Markers) -> list[str]:
    return [t for t in (m.start, m.end, m.payload_start, m.payload_end) if t]


@dataclass(slots=True)
class _Tok:
    """A generated token whose place (visible or hidden) is not decided yet."""

    token: int
    start: int  # its characters in the decoded text: [start, end)
    end: int
    eog: bool
    visible: bool = False
    think: bool = False


class SpanRun:
    """The events and the ``generated`` list of one request (see the module docstring).

    ``feed`` one token at a time (then ``close_thinking`` or ``finish`` if due);
    ``take`` returns the events of that token: the engine sends them together, so
    text released at the very end can still join the token's own event.
    """

    def __init__(self, setup: SpanSetup, req: Request) -> None:
        self._setup = setup
        self._req = req
        self.detector = SpanDetector(setup.thinking, setup.tool)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._plain = TextStream(req.stop_sequences)
        self._queue: deque[_Tok] = deque()
        self._fed = 0  # characters fed to the detector
        self._pos = 0  # characters decided by the detector
        self._pending = ""  # plain text released, not yet carried by a token event
        self._events: list[Msg] = []
        self._last: _Tok | None = None
        self._last_event: int | None = None  # index in _events of this token's event
        self.deltas = 0  # non-empty thinking deltas sent
        self.matched: str | None = None

    # ------------------------------------------------------------ state
    @property
    def undecided(self) -> int:
        """Tokens whose text is still held back (not in ``generated`` yet)."""
        return len(self._queue)

    @property
    def greedy(self) -> bool:
        return self.detector.greedy

    @property
    def budget_exhausted(self) -> bool:
        """Thinking on, a budget set and spent, and a block still open."""
        req = self._req
        return (
            req.thinking
            and req.thinking_budget is not None
            and self.deltas >= req.thinking_budget
            and self.detector.state == "think"
        )

    # ------------------------------------------------------------ input
    def take(self) -> list[Msg]:
        """The events since the last ``take``, in order."""
        events, self._events = self._events, []
        self._last_event = None
        return events

    def feed(self, token: int, piece: bytes, *, eog: bool = False) -> None:
        """One generated token (its events wait for ``take``).

        Raises:
            InvalidRequestError: ``thinking_not_enabled``: a thinking block started and the
                request did not ask for thinking.
        """
        self._last_event = None
        chars = self._decoder.decode(piece)
        tok = _Tok(token, self._fed, self._fed + len(chars), eog)
        self._fed = tok.end
        self._last = tok
        self._queue.append(tok)
        if eog:
            tok.visible = True  # the end of the reply is never thinking
        if self.matched is None:
            for seg in self.detector.feed(chars):
                self._segment(seg)
                if self.matched is not None:
                    break
        self._decide()

    def close_thinking(self) -> None:
        """Synthesise ``thinking_end`` now (the budget is spent)."""
        seg = self.detector.close_thinking()
        if seg is not None:
            self._segment(seg)
            self._decide()

    def finish(self) -> None:
        """The last token was fed: release what was held back, decide what is left."""
        if self.matched is None:
            tail = self._decoder.decode(b"", final=True)
            if tail and self._last is not None:
                self._last.end += len(tail)
            self._fed += len(tail)
            for seg in [*self.detector.feed(tail), *self.detector.finish()]:
                self._segment(seg)
                if self.matched is not None:
                    break
        # what is left has no text of its own: it goes with the state the reply ended in
        in_think = self.detector.state == "think" and self.matched is None
        for tok in self._queue:
            if not tok.think and not in_think:
                tok.visible = True
        self._decide(final=True)
        if self.matched is None:
            self._pending += self._plain.finish()
        if self._pending:
            self._carry_pending()

    # ------------------------------------------------------------ internals
    def _segment(self, seg: Segment) -> None:
        req = self._req
        if seg.kind == "think_start" and not req.thinking:
            raise InvalidRequestError(
                "the model started a thinking block; ask for it with thinking='enabled'",
                code=ErrorCode.THINKING_NOT_ENABLED,
            )
        r0 = self._pos
        self._pos += len(seg.text)
        if seg.kind == "text":
            self._pending += self._plain.feed(seg.text.encode("utf-8"))
            self.matched = self._plain.matched
        self._classify(r0, self._pos, seg.cls)
        self._decide()
        rid = req.request_id
        if seg.kind == "think" and seg.text:
            self.deltas += 1
            self._events.append(ThinkingDelta(request_id=rid, seq=req.next_seq(), text=seg.text))
        elif seg.kind == "think_end":
            sig = sign_block(self._setup.key, seg.block)
            self._events.append(ThinkingEnd(request_id=rid, seq=req.next_seq(), signature=sig))
        elif seg.kind == "tool" and seg.text:
            self._events.append(ToolCallDelta(request_id=rid, seq=req.next_seq(), text=seg.text))
        elif seg.kind == "tool_end":
            self._events.append(ToolCallEnd(request_id=rid, seq=req.next_seq(), text=seg.block))

    def _classify(self, r0: int, r1: int, cls: State) -> None:
        """Characters ``[r0, r1)`` are decided as ``cls``: mark the tokens they belong to."""
        for tok in self._queue:
            if tok.start >= r1:
                break
            overlap = min(tok.end, r1) - max(tok.start, r0)
            # a token with no text of its own (partial UTF-8, an empty piece) goes with
            # the character that follows it
            empty_here = tok.start == tok.end and r0 <= tok.start < r1
            if overlap > 0 or empty_here:
                if cls == "think":
                    tok.think = True
                else:
                    tok.visible = True

    def _decide(self, *, final: bool = False) -> None:
        """Pop the decided tokens at the head: visible ones join ``generated`` with an event."""
        while self._queue:
            tok = self._queue[0]
            if tok.visible:
                self._queue.popleft()
                self._req.generated.append(tok.token)
                self._token_event(tok.token)
            elif final or (tok.think and tok.end <= self._pos and tok.start < tok.end):
                self._queue.popleft()  # hidden: in the KV, not in generated
            else:
                return

    def _token_event(self, token: int) -> None:
        req = self._req
        text, self._pending = self._pending, ""
        self._last_event = len(self._events)
        self._events.append(
            TokenEvent(request_id=req.request_id, seq=req.next_seq(), text=text, token_id=token)
        )

    def _carry_pending(self) -> None:
        """Plain text released at the very end: onto this token's event; if this token is
        hidden (the reply ended inside a thinking block), onto an event of its own that
        carries its id (the text's tokens are in ``generated`` already)."""
        i = self._last_event
        if i is not None:
            ev = self._events[i]
            assert isinstance(ev, TokenEvent)
            self._events[i] = msgspec.structs.replace(ev, text=ev.text + self._pending)
            self._pending = ""
        elif self._last is not None:
            self._token_event(self._last.token)


# ================================================================ the engine's loop
