"""``embed`` (workers/embedding.py): capability, the checks in upstream's order, failures that
leave the worker and the generation state alone."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import pytest

from erllama.config import ContextOpts
from erllama.protocol.codec import decode_result
from erllama.protocol.errors import ErllamaError, ErrorCode
from erllama.protocol.messages import Embed, ErrorReply, Reply
from erllama.protocol.tokens import pack_tokens
from erllama.workers.embedding import embed
from erllama.workers.stub import StubBackend

from .fakes import Harness, stub_spec

pytestmark = pytest.mark.timeout(30)


class EmbeddingStub(StubBackend):
    """The stub with an embedding "context": a vector made of the token ids."""

    embeddings_enabled = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fail: Exception | None = None
        self.calls = 0

    def embed_tokens(self, tokens: Sequence[int]) -> list[float]:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        return [float(len(tokens)), float(sum(tokens)), 0.5]


def backend(n_ctx: int = 64, n_batch: int = 16) -> EmbeddingStub:
    spec = stub_spec(n_ctx=n_ctx)
    spec = msgspec.structs.replace(spec, context_opts=ContextOpts(n_batch=n_batch))
    return EmbeddingStub(spec)


def code(b: object, tokens: list[int]) -> str:
    with pytest.raises(ErllamaError) as ei:
        embed(b, tokens)
    return ei.value.code


def test_checks_in_order() -> None:
    b = backend(n_ctx=64, n_batch=16)
    assert embed(b, [5, 6, 7]) == [3.0, 18.0, 0.5]
    assert code(b, []) == ErrorCode.INVALID_TOKEN
    assert code(b, [5, 300]) == "invalid_token"  # n_vocab 300
    assert code(b, [-1]) == "invalid_token"
    assert code(b, [5] * 64) == ErrorCode.CONTEXT_OVERFLOW  # n >= n_ctx
    assert code(b, [5] * 17) == ErrorCode.BATCH_OVERFLOW  # n > n_batch
    assert len(embed(b, [5] * 16)) == 3  # exactly n_batch
    wide = backend(n_ctx=16, n_batch=64)
    assert code(wide, [5] * 16) == "context_overflow"  # n_ctx checked before n_batch
    assert b.calls == 2  # nothing reached the backend for a refused request


def test_not_supported() -> None:
    assert code(StubBackend(stub_spec()), [5]) == ErrorCode.NOT_SUPPORTED
    off = backend()
    off.embeddings_enabled = False
    assert code(off, [5]) == "not_supported"
    assert code(object(), [5]) == "not_supported"


def test_backend_failure_is_embed_failed() -> None:
    b = backend()
    b.fail = RuntimeError("decode returned -3")
    assert code(b, [5]) == ErrorCode.EMBED_FAILED


def test_through_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    from . import fakes

    monkeypatch.setattr(fakes, "StubBackend", EmbeddingStub)
    h = Harness()
    h.complete("r1", "hello world")
    h.send(Embed(request_id="e1", model="m", tokens=pack_tokens([5, 6])))
    h.send(Embed(request_id="e2", model="m", tokens=pack_tokens([])))
    h.run()
    kv = list(h.engine.kv.tokens)
    (ok,) = h.for_request("e1")
    assert isinstance(ok, Reply) and decode_result(ok.result, list[float]) == [2.0, 11.0, 0.5]
    (bad,) = h.for_request("e2")
    assert isinstance(bad, ErrorReply) and bad.code == "invalid_token"
    h.backend.fail = RuntimeError("boom")  # type: ignore[attr-defined]
    h.send(Embed(request_id="e3", model="m", tokens=pack_tokens([5])))
    h.run()
    (failed,) = h.for_request("e3")
    assert isinstance(failed, ErrorReply) and failed.code == "embed_failed"
    assert h.engine.kv.tokens == kv  # the generation state is untouched
    h.complete("r2", "hello world")
    h.run()
    assert h.result("r2").cache_hit_kind == "exact"


def test_stub_engine_answers_not_supported() -> None:
    h = Harness()
    h.send(Embed(request_id="e", model="m", tokens=pack_tokens([5])))
    h.run()
    (msg,) = h.for_request("e")
    assert isinstance(msg, ErrorReply) and msg.code == "not_supported"
