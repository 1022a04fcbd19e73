"""``embed``: checks and errors of the embedding op (REFERENCE §1.3, D31).

A model embeds only when it was loaded with ``context_opts.embeddings = true``. The
backend then owns a SEPARATE llama.cpp context for embeddings (``LlamaBackend`` creates it
at load, next to the generation context): ``llama_set_embeddings`` on the shared context
would leave it in embeddings mode with no valid logits (D31), and the embedding decode
would also evict the generation KV. The generation context is never put in embeddings
mode, so a model with ``embeddings = true`` still generates, bit-identically, and an
embed between two tokens of a running request changes nothing in it.

The embedding context: one sequence, ``n_ctx = n_ubatch = n_batch`` (an embedding is one
batch), mean pooling over the tokens (``LLAMA_POOLING_TYPE_MEAN``; causal LMs such as
Gemma 3 declare no pooling of their own). The vector is returned as is (not normalised),
``n_embd`` floats. The KV of that context is cleared before every call, so equal tokens
give equal vectors. LoRA adapters are attached to the generation context only.

Checks, in this order: ``not_supported`` (a backend without embeddings, or a model not in
embedding mode), ``invalid_token`` (an empty list, or an id outside the vocabulary),
``context_overflow`` (``n >= n_ctx`` of the model), ``batch_overflow`` (``n > n_batch``).
A failed decode is ``embed_failed``; the worker goes on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from erllama.protocol.errors import (
    ErllamaError,
    ErrorCode,
    InvalidRequestError,
    NotSupportedError,
)
from erllama.workers.backend import BackendInfo


@runtime_checkable
class EmbeddingBackend(Protocol):
    """What a backend offers to embed (``LlamaBackend``)."""

    info: BackendInfo

    @property
    def embeddings_enabled(self) -> bool:
        """Whether the model was loaded with an embedding context."""
        ...

    def embed_tokens(self, tokens: Sequence[int]) -> list[float]:
        """The pooled embedding of ``tokens`` (already checked by ``embed``)."""
        ...


def embed(backend: object, tokens: Sequence[int]) -> list[float]:
    """``embed(model, tokens)``: the embedding vector of ``tokens``.

    Raises:
        NotSupportedError: ``not_supported``; ``embed_failed`` when llama.cpp fails.
        InvalidRequestError: ``invalid_token``, ``context_overflow``, ``batch_overflow``.
    """
    if not isinstance(backend, EmbeddingBackend) or not backend.embeddings_enabled:
        raise NotSupportedError(
            "this model was not loaded with context_opts.embeddings = true",
            code=ErrorCode.NOT_SUPPORTED,
        )
    info = backend.info
    n = len(tokens)
    if n == 0:
        raise InvalidRequestError("embed needs at least one token", code=ErrorCode.INVALID_TOKEN)
    bad = next((t for t in tokens if not 0 <= t < info.n_vocab), None)
    if bad is not None:
        raise InvalidRequestError(
            f"token {bad} outside the vocabulary (0..{info.n_vocab - 1})",
            code=ErrorCode.INVALID_TOKEN,
        )
    if n >= info.n_ctx:
        raise InvalidRequestError(
            f"{n} tokens do not fit the context of {info.n_ctx}", code=ErrorCode.CONTEXT_OVERFLOW
        )
    if n > info.n_batch:
        raise InvalidRequestError(
            f"{n} tokens exceed n_batch {info.n_batch} (an embedding is one batch)",
            code=ErrorCode.BATCH_OVERFLOW,
        )
    try:
        return backend.embed_tokens(tokens)
    except ErllamaError as exc:
        if exc.code == ErrorCode.EMBED_FAILED:
            raise
        raise NotSupportedError(exc.message, code=ErrorCode.EMBED_FAILED) from None
    except Exception as exc:
        raise NotSupportedError(
            f"embedding failed: {type(exc).__name__}: {exc}", code=ErrorCode.EMBED_FAILED
        ) from None
