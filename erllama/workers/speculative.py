"""Speculative decoding on the worker side: ``verify`` (REFERENCE §1.2, §1.6, D28).

``draft_tokens`` needs nothing here: it is implemented in the client over
``infer`` (``client/_core.py``), exactly as upstream's facade does (collect the
token ids of one greedy ``infer``, cancel after 30 s), so it shares admission,
the cache and cancellation with every other request.

``verify(prefix, candidates, k)``:

1. ``K' = min(k, len(candidates))``; ``S = prefix + candidates[:K']``, ``P = len(prefix)``.
2. One forward pass over ``S`` with the argmax of every row from ``P-1`` on
   (``prefill_all_logits``): ``pred[i]`` is the greedy token after ``S[:P+i]``.
3. ``accepted`` = the leading candidates with ``pred[i] == candidates[i]``; an
   end-of-generation prediction never accepts a candidate (upstream maps EOG to
   ``eos`` before comparing); ``next_token = pred[accepted]`` (``eos`` if EOG).

Sequence 0 and D28: upstream appended the pass at the end of sequence 0 and
then removed cells from ``P`` on, which is right only if the sequence was
empty. Here the pass *reuses* the live KV: the common prefix of
``KvState.tokens`` and ``S``, at most ``P-1`` (that row must be decoded for its
logits), with the engine's own rules (no reuse under ``MIN_PARTIAL_TOKENS``,
whole ``reuse_align`` blocks), so a verify over a long shared context costs
only the new rows. Afterwards the sequence is truncated back to that reused
length: what stays in the KV are cells verify never wrote (bit for bit what
they were), ``KvState`` is truncated with it (``tokens`` == KV, D27), and the
rest of the old live state is dropped, as a later request would have
re-prefilled past a divergence anyway (or gets it back from the cache). Below
the reuse minimum the sequence is cleared. The verified rows are not kept
(keeping ``prefix + accepted`` would speed a draft/verify loop, but would leave
rows computed in a verify-shaped batch in the live state).

Turned down: a reserved scratch sequence (D28 R): with ``n_seq_max == 1`` (the
default, and what whole-cache snapshots of sliding-window models need) there is
none; snapshot + restore of the live state: exact, but tens of MB copied twice
per verify.

Errors: ``not_supported`` (the backend has no ``prefill_all_logits``),
``bad_request`` (ragged token bytes), ``badarg`` (``k <= 0``), ``empty_prefix``,
``invalid_token``, ``context_overflow``, ``busy`` (a request is running or
queued: verify only runs on an idle model), ``shutting_down``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from erllama.protocol.errors import (
    ConflictError,
    ErrorCode,
    InvalidRequestError,
    NotSupportedError,
)
from erllama.protocol.messages import Verify, VerifyResult
from erllama.protocol.tokens import unpack_tokens
from erllama.workers.backend import ModelBackend
from erllama.workers.sequence import MIN_PARTIAL_TOKENS, KvState
from erllama.workers.slots import common_prefix

log = logging.getLogger(__name__)


@runtime_checkable
class VerifyingBackend(Protocol):
    """A backend that can return the argmax of every row of a pass."""

    def prefill_all_logits(self, seq: int, tokens: Sequence[int], start_pos: int) -> list[int]:
        """Decode ``tokens`` at ``start_pos..`` (like ``prefill``); the argmax after each."""
        ...


def _bad(code: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(message, code=code)


def check_verify(msg: Verify, backend: ModelBackend) -> tuple[list[int], list[int]]:
    """Validate a ``Verify``; ``(prefix, candidates[:K'])``."""
    if not isinstance(backend, VerifyingBackend):
        raise NotSupportedError(
            f"the {backend.info.backend} backend cannot verify", code=ErrorCode.NOT_SUPPORTED
        )
    prefix = unpack_tokens(msg.prefix)  # bad_request on a ragged length
    candidates = unpack_tokens(msg.candidates)
    if msg.k <= 0:
        raise _bad(ErrorCode.BADARG, f"k must be > 0, got {msg.k}")
    if not prefix:
        raise _bad(ErrorCode.EMPTY_PREFIX, "the prefix is empty")
    cands = candidates[: msg.k]
    n_vocab = backend.info.n_vocab
    top = max(prefix + cands)
    if top >= n_vocab:
        raise _bad(ErrorCode.INVALID_TOKEN, f"token {top} is not below n_vocab {n_vocab}")
    n_ctx = backend.info.n_ctx
    if len(prefix) + len(cands) > n_ctx:
        raise _bad(
            ErrorCode.CONTEXT_OVERFLOW,
            f"{len(prefix)} + {len(cands)} tokens exceed the context of {n_ctx}",
        )
    return prefix, cands


def verify(
    backend: ModelBackend,
    kv: KvState,
    msg: Verify,
    *,
    busy: bool,
    stopping: bool = False,
) -> VerifyResult:
    """Run ``verify`` on sequence 0 of an idle model (see the module docstring).

    Args:
        backend: the model; must be a ``VerifyingBackend``.
        kv: the engine's view of sequence 0, kept equal to the KV.
        msg: the request.
        busy: a request is running or queued.
        stopping: the engine is stopping.

    Raises:
        ErllamaError: the codes of the module docstring.
    """
    prefix, cands = check_verify(msg, backend)
    if stopping:
        raise ConflictError("the model is stopping", code=ErrorCode.SHUTTING_DOWN)
    if busy:
        raise ConflictError(
            "verify runs only while the model is idle (a request is running or queued)",
            code=ErrorCode.BUSY,
        )
    assert isinstance(backend, VerifyingBackend)
    seq = prefix + cands
    p = len(prefix)
    keep = min(common_prefix(kv.tokens, seq), p - 1)
    if keep < MIN_PARTIAL_TOKENS:
        keep = 0  # a few shared tokens are not worth it (the engine's rule too)
    keep -= keep % max(1, backend.info.reuse_align)
    if keep == 0:
        backend.seq_clear(0)
        kv.clear()
    else:
        backend.seq_truncate(0, keep)
        kv.truncate(keep)
    try:
        if p - 1 > keep:
            backend.prefill(0, seq[keep : p - 1], keep)
        pred = backend.prefill_all_logits(0, seq[p - 1 :], p - 1)
    finally:
        # only cells verify never wrote stay: KvState (truncated above) is exact again
        try:
            backend.seq_truncate(0, keep)
        except Exception:
            backend.seq_clear(0)
            kv.clear()
            raise
        kv.fresh = False  # the backend's logits are verify's now
    accepted = 0
    for c, t in zip(cands, pred, strict=False):
        if t != c or backend.is_eog(t):
            break
        accepted += 1
    nxt = pred[accepted]
    log.debug(
        "event=verify prefix=%d candidates=%d accepted=%d reused=%d", p, len(cands), accepted, keep
    )
    return VerifyResult(accepted=accepted, next_token=nxt, eos=backend.is_eog(nxt))
