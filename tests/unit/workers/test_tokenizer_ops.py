"""One answer to Tokenize / Detokenize, whichever thread gives it (tokenizer_ops)."""

from __future__ import annotations

import pytest

from erllama.protocol.errors import ErllamaError, ErrorCode
from erllama.protocol.messages import Detokenize, ErrorReply, Msg, Reply, Tokenize
from erllama.protocol.tokens import pack_tokens
from erllama.workers import tokenizer_ops
from erllama.workers.engine import Inbound
from erllama.workers.stub import StubBackend

from .fakes import Harness, stub_spec


class Broken(StubBackend):
    def tokenize(
        self, text: str, *, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        if text == "typed":
            raise ErllamaError("a typed failure", code=ErrorCode.INVALID_TOKEN)
        raise RuntimeError("the tokenizer broke")

    def detokenize(self, tokens: object) -> str:
        raise RuntimeError("the detokenizer broke")


def engine_answer(h: Harness, msg: Msg) -> Msg:
    h.engine.inbox.put(Inbound(b"c", msg))
    h.engine.run_until_idle()
    return [m for cid, m in h.out if cid == b"c"][-1]


@pytest.mark.parametrize(
    ("msg", "code"),
    [
        (Tokenize(request_id="t1", model="m", text="typed"), ErrorCode.INVALID_TOKEN),
        (Tokenize(request_id="t2", model="m", text="other"), ErrorCode.TOKENIZE_FAILED),
        (Detokenize(request_id="d1", model="m", tokens=pack_tokens([1, 2])), ErrorCode.INTERNAL),
    ],
)
def test_io_thread_and_engine_give_the_same_error(msg: Tokenize | Detokenize, code: str) -> None:
    h = Harness()
    backend = Broken(stub_spec())
    h.engine.backend = backend
    io = tokenizer_ops.answer(backend, msg)
    assert isinstance(io, ErrorReply) and io.code == code, io
    eng = engine_answer(h, msg)
    assert isinstance(eng, ErrorReply) and (eng.code, eng.message) == (io.code, io.message)


def test_a_good_tokenize_is_the_same_reply_on_both() -> None:
    h = Harness()
    msg = Tokenize(request_id="t3", model="m", text="hello")
    io = tokenizer_ops.answer(h.engine.backend, msg)
    assert isinstance(io, Reply)
    assert engine_answer(h, msg) == io
