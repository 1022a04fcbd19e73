"""``erllama.chat_cli.Chat`` against a scripted fake client: turns, errors, Ctrl-C, status line."""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

import pytest

from erllama.chat_cli import Chat, status_line
from erllama.client import Client, Event
from erllama.protocol.errors import ErllamaError, InvalidRequestError, NotSupportedError
from erllama.protocol.messages import CacheDelta, Stats

pytestmark = pytest.mark.timeout(30)


def _stats(kind: str = "cold", read: int = 0, finish: str = "stop") -> Stats:
    return Stats(
        prompt_tokens=10,
        completion_tokens=64,
        prefill_ms=35.2,
        generation_ms=1234.0,
        cache_hit_kind=kind,  # type: ignore[arg-type]
        finish_reason=finish,  # type: ignore[arg-type]
        cancelled=finish == "cancelled",
        finish_key=None,
        committed_tokens=74,
        cache_delta=CacheDelta(read=read),
    )


class FakeStream:
    def __init__(self, rid: str, texts: list[str], interrupt_at: int | None) -> None:
        self.request_id = rid
        self.texts = texts
        self.interrupt_at = interrupt_at
        self.closed = 0

    def __iter__(self) -> Iterator[Event]:
        for i, text in enumerate(self.texts):
            if i == self.interrupt_at:
                raise KeyboardInterrupt
            yield Event("token", self.request_id, seq=i, text=text)
        yield Event("done", self.request_id, seq=len(self.texts), stats=_stats("partial", 412))

    def close(self) -> None:
        self.closed += 1


class FakeClient:
    def __init__(self) -> None:
        self.rendered: list[list[dict[str, str]]] = []
        self.template_error: ErllamaError | None = None
        self.infer_error: ErllamaError | None = None
        self.interrupt_at: int | None = None
        self.streams: list[FakeStream] = []
        self.cancelled: list[str] = []

    def apply_chat_template(self, model: str, request: Mapping[str, Any]) -> list[int]:
        if self.template_error is not None:
            raise self.template_error
        self.rendered.append([dict(m) for m in request["messages"]])
        return [1, 2, 3]

    def infer(self, model: str, tokens: Sequence[int], **opts: Any) -> FakeStream:
        if self.infer_error is not None:  # once
            error, self.infer_error = self.infer_error, None
            raise error
        stream = FakeStream(f"r{len(self.streams)}", [" Hi", " there"], self.interrupt_at)
        self.streams.append(stream)
        return stream

    def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)


def _chat(fake: FakeClient, lines: list[str]) -> tuple[Chat, io.StringIO, io.StringIO]:
    todo = iter(lines)

    def read_line(prompt: str) -> str:
        out.write(prompt)
        line = next(todo, None)
        if line is None:
            raise EOFError
        if line == "^C":
            raise KeyboardInterrupt
        return line

    out, err = io.StringIO(), io.StringIO()
    return Chat(cast(Client, fake), "m", read_line=read_line, out=out, err=err), out, err


def test_status_line() -> None:
    assert status_line(_stats("partial", 412)) == (
        "[cache: partial 412 tokens, prefill 35 ms, 64 tokens 1.2 s]"
    )
    assert status_line(_stats("cold", finish="length")) == (
        "[cache: cold, prefill 35 ms, 64 tokens 1.2 s, finish length]"
    )


def test_turns_render_the_whole_history_and_record_the_stripped_reply() -> None:
    fake = FakeClient()
    chat, out, _ = _chat(fake, ["hi", "", "more"])
    assert chat.run() == 0
    assert chat.history == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hi there"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "Hi there"},
    ]
    assert fake.rendered[-1] == chat.history[:3]  # the whole history, each turn
    assert out.getvalue().count("[cache: partial 412 tokens") == 2
    assert fake.cancelled == [] and all(s.closed for s in fake.streams)


def test_ctrl_c_in_a_reply_cancels_it_and_drops_the_turn() -> None:
    fake = FakeClient()
    fake.interrupt_at = 1
    chat, out, _ = _chat(fake, ["hi", "^C"])
    assert chat.run() == 0
    assert chat.history == []
    assert fake.cancelled == ["r0"] and fake.streams[0].closed
    text = out.getvalue()
    assert " Hi\n[cancelled]\n> \n(Ctrl-D quits" in text and "[cache:" not in text


def test_a_daemon_error_in_a_turn_is_one_line_and_the_chat_goes_on() -> None:
    fake = FakeClient()
    chat, _, err = _chat(fake, ["hi", "again"])
    fake.infer_error = InvalidRequestError("too long", code="context_overflow")
    assert chat.run() == 0
    assert err.getvalue() == "error: context_overflow: too long\n"
    assert [m["content"] for m in chat.history] == ["again", "Hi there"]


def test_no_template_fails_the_start() -> None:
    fake = FakeClient()
    fake.template_error = NotSupportedError("the GGUF has no chat template", code="no_template")
    chat, out, _ = _chat(fake, ["hi"])
    with pytest.raises(NotSupportedError) as info:
        chat.run()
    assert info.value.code == "no_template" and "> " not in out.getvalue()
