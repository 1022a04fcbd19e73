"""The ``ModelBackend`` protocol: what a worker needs from a model engine.

Two implementations: ``workers.llama.LlamaBackend`` (llama-cpp-python, the
real engine) and ``workers.stub.StubBackend`` (deterministic, weight-free,
with fault knobs for tests). The request engine (``workers.engine``) drives
either through this interface only, on the worker's compute thread.

Positions: a sequence holds KV cells for positions ``0 .. n_past-1``. The
engine tracks ``n_past`` per sequence; backends do not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import msgspec

LLAMA_STATE_FORMAT = b"llama.cpp-seq-v1"  # the llama backend's payload: llama_state_seq_get_data


class BackendInfo(msgspec.Struct, frozen=True, kw_only=True):
    backend: str  # "llama" | "stub"
    n_ctx: int
    n_vocab: int
    n_batch: int
    n_seq_max: int
    quant_type: str  # name from the quant table (REFERENCE §3.2), e.g. "q4_k_m"
    quant_bits: int
    fingerprint: bytes  # 32 bytes: base fingerprint of the weights
    ctx_params_hash: bytes  # 32 bytes
    n_layers: int = 0
    model_size_bytes: int = 0
    n_gpu_layers: int = 0
    # Where the chat template comes from (chat_templates.resolve): "gguf", "builtin:gemma3",
    # "file:<path>", "inline"; empty when the model has none.
    chat_template: str = ""
    # A partial reuse keeps whole blocks of this many tokens (1: any length). On CPU the
    # rows at the end of a ragged llama.cpp batch take the kernel's remainder path, so the
    # llama backend re-prefills up to 31 reused tokens to stay bit-identical with cold runs.
    reuse_align: int = 1
    # A warm prefill re-computes at least this many prompt tokens (unless stored logits end
    # the prompt): with several sequences a prefill row is exact only in a 16..63-row chunk.
    prefill_tail_min: int = 1
    # A restored row may be truncated (False: per-sequence snapshots of a sliding-window
    # model hold only the window's cells, so a row serves only prompts it is a prefix of).
    partial_restore_exact: bool = True


class DecodeItem(NamedTuple):
    """One sequence's token in a generation step (``decode_step``)."""

    seq: int
    token: int
    pos: int


class SamplerOptions(msgspec.Struct, frozen=True, kw_only=True):
    """The seven sampler keys of REFERENCE §1.4 (None = not applied)."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    grammar: str | None = None


class Sampler(Protocol):
    def sample(self, row: int = -1) -> int:
        """Sample the next token from the logits of batch row ``row`` of the last decode
        (-1: the last decoded position, which is the sampler's sequence after ``prefill`` /
        ``decode_one``), and accept it."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class ModelBackend(Protocol):
    info: BackendInfo
    # tokenize / detokenize may run on the IO thread beside the compute thread
    thread_safe_tokenizer: bool
    # the ``state_format`` TLV of every saved row: what produced its payload
    state_format: bytes

    def tokenize(
        self, text: str, *, add_special: bool = True, parse_special: bool = False
    ) -> list[int]: ...

    def token_to_piece(self, token: int) -> bytes:
        """The raw bytes of one token (may be a partial UTF-8 sequence)."""
        ...

    def detokenize(self, tokens: Sequence[int]) -> str:
        """All tokens decoded in one pass (UTF-8, errors='replace')."""
        ...

    def is_eog(self, token: int) -> bool: ...

    def seq_clear(self, seq: int) -> None:
        """Remove every cell of ``seq``."""
        ...

    def seq_truncate(self, seq: int, n_keep: int) -> None:
        """Keep positions ``[0, n_keep)`` of ``seq``, remove the rest."""
        ...

    def prefill(self, seq: int, tokens: Sequence[int], start_pos: int) -> None:
        """Decode ``tokens`` at positions ``start_pos..``; logits only for the last one.

        Splits into ``n_batch`` chunks itself. Raises ``InvalidRequestError``
        (``context_overflow``) if ``start_pos + len(tokens) > n_ctx``.
        """
        ...

    def new_sampler(self, seq: int, opts: SamplerOptions) -> Sampler:
        """Build a sampler chain in upstream's fixed order.

        Raises ``InvalidRequestError`` with ``grammar_failed`` or ``badarg``.
        """
        ...

    def decode_one(self, seq: int, token: int, pos: int) -> None:
        """Decode one token at ``pos`` with logits (the generation step)."""
        ...

    def decode_step(self, items: Sequence[DecodeItem]) -> list[int]:
        """Decode one token of each of several sequences in one step (one per sequence);
        the batch row of each item's logits, in item order."""
        ...

    def logits_snapshot(self, row: int = -1) -> bytes:
        """The logits of the last decoded position, or of batch row ``row`` of a
        ``decode_step`` (valid right after prefill / decode_one / decode_step).

        Stored with a saved row, they let an exact hit sample its first token without
        re-decoding the last prompt token (DESIGN §3: measured, this wins by ~20 ms).
        """
        ...

    def sample_from_logits(self, sampler: Any, logits: bytes | memoryview) -> int:
        """Sample (and accept) the next token from stored logits with ``sampler``."""
        ...

    def state_size(self, seq: int) -> int: ...

    def state_snapshot(self, seq: int) -> bytes | bytearray | memoryview:
        """Copy the sequence state out (``llama_state_seq_get_data``): milliseconds, no I/O."""
        ...

    def state_restore(self, seq: int, payload: bytes | memoryview) -> None:
        """Load a snapshot into ``seq`` (``llama_state_seq_set_data``), zero-copy from a mapping.

        Raises ``ValueError`` if the backend rejects the payload.
        """
        ...

    def release_context(self) -> bool:
        """Free the context's memory (every sequence), keep the weights; True when it did."""
        ...

    def ensure_context(self) -> bool:
        """Re-create a released context; True when it did (a no-op otherwise)."""
        ...

    def close(self) -> None: ...
