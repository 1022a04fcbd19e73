"""Cache keys: the quant byte table, key derivation, LoRA and model fingerprints (REFERENCE §3).

A key is ``SHA-256(fingerprint[32] || quant_byte[1] || ctx_params_hash[32] || u32le tokens)``,
identical to upstream erllama, so keys are comparable across implementations. The first 65
bytes are the *namespace*; ``PrefixHasher`` seeds one hasher with them and takes a copy of
the hash state at every requested prefix length, so all the keys of a prompt come out of a
single pass over its tokens.

A quant outside the §3.2 table (llama.cpp's ``tq1_0``, ``mxfp4_moe``, ``q2_k_s``, an
``ftype_N`` it has no name for, a configured name with a typo) keys under byte 255 with its
lower-cased name folded into the fingerprint (``quant_namespace``), so every GGUF llama.cpp
loads is cached, and rows of two such quants never meet. The known names keep upstream's bytes
and their fingerprint unchanged (REFERENCE §3.2, fixing §11 D20: upstream drops every save
under 255 because its reader refuses that byte; ``check_quant_byte`` accepts it).

``KvcError`` lives here (and is re-exported by ``erllama.cache.kvc``) because both the key
code and the file codec raise it: ``check_quant_byte`` fails with ``unknown_quant_byte``
just as parsing a file that carries an unassigned byte does.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import struct
from collections.abc import Iterable, Mapping, Sequence

from erllama.protocol.errors import InvalidRequestError
from erllama.protocol.tokens import pack_tokens

log = logging.getLogger(__name__)

Namespace = tuple[bytes, int, bytes]
"""(effective fingerprint, quant byte, ctx params hash): one token trie per namespace."""

KEY_BYTES = 32
FINGERPRINT_BYTES = 32
CTX_HASH_BYTES = 32
OTHER_QUANT_BYTE = 255
"""The byte of every quant outside ``QUANT_TABLE``; the name goes into the fingerprint."""
_OTHER_QUANT_TAG = b"erllama.other_quant\0"

QUANT_TABLE: dict[str, int] = {
    "f32": 0,
    "f16": 1,
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 4,
    "q5_1": 5,
    "q8_0": 6,
    "q4_k_m": 7,
    "q4_k_s": 8,
    "q5_k_m": 9,
    "q5_k_s": 10,
    "q6_k": 11,
    "q8_k": 12,
    "q2_k": 13,
    "q3_k_s": 14,
    "q3_k_m": 15,
    "q3_k_l": 16,
    "iq2_xxs": 17,
    "iq2_xs": 18,
    "iq2_s": 19,
    "iq2_m": 20,
    "iq3_xxs": 21,
    "iq3_xs": 22,
    "iq3_s": 23,
    "iq3_m": 24,
    "iq1_s": 25,
    "iq1_m": 26,
    "iq4_nl": 27,
    "iq4_xs": 28,
    "bf16": 29,
}
"""REFERENCE §3.2. Stable: a byte is never reassigned."""

_QUANT_NAMES: dict[int, str] = {byte: name for name, byte in QUANT_TABLE.items()}

FINGERPRINT_MODES: dict[str, int] = {"safe": 0, "gguf_chunked": 1, "fast_unsafe": 2}
"""The TLV 0x02 byte of each ``fingerprint_mode``."""

_HASH_CHUNK_BYTES = 1 << 20
GGUF_HEAD_BYTES = 8 << 20
GGUF_TAIL_BYTES = 1 << 20


class KvcError(ValueError):
    """A cache key or KVC file is invalid.

    ``code`` is a stable snake_case string: the REFERENCE §4 codes (``bad_header``,
    ``crc_mismatch``, ``key_mismatch``, ...), ``header_crc_mismatch`` and
    ``bad_payload_offset`` (our recommendations), and ``bad_argument`` for a caller
    passing values that cannot form a key or a file (wrong sizes, negative numbers).
    """

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


def quant_byte(name: str) -> int:
    """The §3.2 byte of a quant name (case-insensitive); ``OTHER_QUANT_BYTE`` for any other."""
    return QUANT_TABLE.get(name.lower(), OTHER_QUANT_BYTE)


def quant_namespace(fingerprint: bytes, name: str) -> tuple[bytes, int]:
    """The (fingerprint, quant byte) pair that keys a model of quant ``name``.

    A §3.2 name: ``fingerprint`` as given and its table byte, exactly upstream's key. Any other
    name: ``SHA-256("erllama.other_quant\\0" || lower(name) || "\\0" || fingerprint)`` and 255,
    so two quants outside the table never share a row even when their byte does.

    Raises:
        KvcError: ``bad_argument`` when the fingerprint is not 32 bytes.
    """
    if len(fingerprint) != FINGERPRINT_BYTES:
        raise KvcError("bad_argument", f"fingerprint is {len(fingerprint)} bytes, not 32")
    byte = quant_byte(name)
    if byte != OTHER_QUANT_BYTE:
        return bytes(fingerprint), byte
    folded = hashlib.sha256(
        _OTHER_QUANT_TAG + name.lower().encode("utf-8") + b"\0" + bytes(fingerprint)
    ).digest()
    return folded, byte


def quant_name(byte: int) -> str:
    """The quant name of a §3.2 byte.

    Raises:
        KvcError: ``unknown_quant_byte`` for 255 (many names) or any byte not in the table.
    """
    try:
        return _QUANT_NAMES[byte]
    except KeyError:
        raise KvcError("unknown_quant_byte", f"quant byte {byte} has no name") from None


def check_quant_byte(byte: int) -> None:
    """Accept a quant byte read from a file: a §3.2 byte or ``OTHER_QUANT_BYTE``.

    Raises:
        KvcError: ``unknown_quant_byte`` for a byte the table has not assigned (30..254).
    """
    if byte != OTHER_QUANT_BYTE and byte not in _QUANT_NAMES:
        raise KvcError("unknown_quant_byte", f"quant byte {byte} is not assigned")


def fingerprint_mode_byte(mode: str) -> int:
    """The TLV byte of a ``fingerprint_mode`` name.

    Raises:
        KvcError: ``unknown_fingerprint_mode``.
    """
    try:
        return FINGERPRINT_MODES[mode]
    except KeyError:
        raise KvcError("unknown_fingerprint_mode", f"fingerprint mode {mode!r}") from None


def namespace_prefix(fingerprint: bytes, quant: int, ctx_hash: bytes) -> bytes:
    """The 65 bytes every key of a namespace starts with.

    Raises:
        KvcError: ``bad_argument`` when a hash is not 32 bytes or quant is not a byte.
    """
    if len(fingerprint) != FINGERPRINT_BYTES:
        raise KvcError("bad_argument", f"fingerprint is {len(fingerprint)} bytes, not 32")
    if len(ctx_hash) != CTX_HASH_BYTES:
        raise KvcError("bad_argument", f"ctx_params_hash is {len(ctx_hash)} bytes, not 32")
    if not 0 <= quant <= 255:
        raise KvcError("bad_argument", f"quant byte {quant} out of range")
    return bytes(fingerprint) + bytes((quant,)) + bytes(ctx_hash)


def _pack(tokens: Sequence[int]) -> bytes:
    if isinstance(tokens, bytes | bytearray | memoryview):
        # bytes is a Sequence[int] too: refuse it rather than hash each byte as a token.
        raise KvcError("bad_argument", "packed tokens given where a token list is expected")
    try:
        return pack_tokens(tokens)
    except InvalidRequestError as exc:
        raise KvcError("bad_argument", str(exc)) from None


def _check_packed(data: bytes | memoryview) -> None:
    if len(data) % 4:
        raise KvcError("bad_argument", f"packed tokens length {len(data)} is not a multiple of 4")


def make_key_packed(
    fingerprint: bytes, quant: int, ctx_hash: bytes, tokens: bytes | memoryview
) -> bytes:
    """The 32-byte key of already packed (u32le) tokens."""
    _check_packed(tokens)
    h = hashlib.sha256(namespace_prefix(fingerprint, quant, ctx_hash))
    h.update(tokens)
    return h.digest()


def make_key(fingerprint: bytes, quant: int, ctx_hash: bytes, tokens: Sequence[int]) -> bytes:
    """The 32-byte cache key of ``tokens`` under a namespace (REFERENCE §3.1).

    Raises:
        KvcError: ``bad_argument`` for a hash that is not 32 bytes, a quant outside 0..255,
            a token outside u32, or packed bytes instead of a list.
    """
    return make_key_packed(fingerprint, quant, ctx_hash, _pack(tokens))


def key_filename(key: bytes) -> str:
    """``<lowercase hex key>.kvc``, the published file name of a key."""
    if len(key) != KEY_BYTES:
        raise KvcError("bad_argument", f"key is {len(key)} bytes, not 32")
    return key.hex() + ".kvc"


class PrefixHasher:
    """Keys of many prefixes of one prompt in a single pass.

    The hasher is seeded once with the 65-byte namespace; ``keys_at`` feeds the tokens
    block by block in ascending order of the requested lengths and copies the hash state
    at each one, so the cost is one SHA-256 over the longest prefix.
    """

    __slots__ = ("_seed",)

    def __init__(self, fingerprint: bytes, quant: int, ctx_hash: bytes) -> None:
        self._seed = hashlib.sha256(namespace_prefix(fingerprint, quant, ctx_hash))

    def keys_at(self, tokens: Sequence[int], lengths: Iterable[int]) -> dict[int, bytes]:
        """``{n: make_key(..., tokens[:n])}`` for every ``n`` in ``lengths``.

        Raises:
            KvcError: ``bad_argument`` for a length outside ``0..len(tokens)`` or a bad token.
        """
        return self.keys_at_packed(_pack(tokens), lengths)

    def keys_at_packed(
        self, tokens: bytes | memoryview, lengths: Iterable[int]
    ) -> dict[int, bytes]:
        """``keys_at`` over packed u32le tokens (no unpacking, no copy of the tokens)."""
        _check_packed(tokens)
        n_tokens = len(tokens) // 4
        wanted = sorted(set(lengths))
        if wanted and (wanted[0] < 0 or wanted[-1] > n_tokens):
            raise KvcError("bad_argument", f"lengths must lie in 0..{n_tokens}: {wanted}")
        view = memoryview(tokens)
        h = self._seed.copy()
        out: dict[int, bytes] = {}
        done = 0
        for n in wanted:
            h.update(view[done * 4 : n * 4])
            done = n
            out[n] = h.copy().digest()
        return out


def _q32(scale: float) -> int:
    """Q32 fixed point, rounded half away from zero, wrapped to 64 bits as upstream's
    ``<<Q:64/little-signed>>`` does."""
    if not math.isfinite(scale):
        raise KvcError("bad_argument", f"adapter scale {scale!r} is not finite")
    q = math.floor(abs(scale) * 2**32 + 0.5)
    return -q if scale < 0 else q


def effective_fingerprint(base_fp: bytes, adapters: Sequence[tuple[bytes, float]]) -> bytes:
    """The fingerprint of a model with LoRA adapters attached (REFERENCE §3.3).

    Args:
        base_fp: the model's 32-byte fingerprint.
        adapters: ``(sha256 of the adapter file, scale)`` for each attached adapter.

    Returns:
        ``base_fp`` when no adapter is attached, else ``SHA-256(base_fp || body)`` where the
        body is ``sha || i64le(q32(scale))`` for the pairs sorted by (sha, scale), skipping
        any sha that is not 32 bytes.
    """
    if not adapters:
        return bytes(base_fp)
    body = b"".join(
        bytes(sha) + struct.pack("<Q", _q32(scale) & 0xFFFF_FFFF_FFFF_FFFF)
        for sha, scale in sorted((bytes(s), float(x)) for s, x in adapters)
        if len(sha) == FINGERPRINT_BYTES
    )
    return hashlib.sha256(bytes(base_fp) + body).digest()


def ctx_params_hash(params: Mapping[str, object]) -> bytes:
    """SHA-256 of the canonical JSON of the context parameters (REFERENCE D6).

    Canonical: keys sorted, no whitespace, UTF-8, non-ASCII kept as is, NaN refused. The
    caller picks the fields (n_ctx, type_k, type_v, flash_attn, n_seq_max, kv_unified,
    swa_full, the llama.cpp build and state format, ...).

    Raises:
        KvcError: ``bad_argument`` when the mapping is not plain JSON data.
    """
    try:
        text = json.dumps(
            params, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise KvcError("bad_argument", f"ctx params are not canonical JSON: {exc}") from None
    return hashlib.sha256(text.encode("utf-8")).digest()


@functools.lru_cache(maxsize=64)
def _hash_file(real: str, mode: str, ino: int, size: int, mtime_ns: int) -> bytes:
    # ino, size and mtime_ns are part of the memo key only: a replaced or rewritten file
    # misses the memo and is hashed again.
    del ino, mtime_ns
    h = hashlib.sha256()
    with open(real, "rb") as f:
        if mode == "safe":
            while chunk := f.read(_HASH_CHUNK_BYTES):
                h.update(chunk)
        else:
            h.update(struct.pack("<Q", size))
            h.update(f.read(GGUF_HEAD_BYTES))
            f.seek(max(0, size - GGUF_TAIL_BYTES))
            h.update(f.read(GGUF_TAIL_BYTES))
    log.debug("fingerprinted %s mode=%s size=%d", real, mode, size)
    return h.digest()


def file_fingerprint(path: str, mode: str) -> bytes:
    """The 32-byte fingerprint of a model file (REFERENCE D4).

    Modes:
        ``safe``: SHA-256 of the whole file, streamed in 1 MiB chunks.
        ``gguf_chunked``: SHA-256 of ``u64le(file size) || first 8 MiB || last 1 MiB``. A
            fast fingerprint of the GGUF header, the metadata (tokenizer included) and the
            first tensor region, plus the end of the last tensor. Two files that differ only
            in the middle of their tensor data get the same fingerprint.
        ``fast_unsafe``: not computed; the caller must supply the fingerprint.

    Results are memoised in this process by (real path, inode, size, mtime_ns), so the
    same unchanged file is hashed once.

    Raises:
        KvcError: (a ``ValueError``) ``bad_argument`` for ``fast_unsafe``,
            ``unknown_fingerprint_mode`` for any other unknown mode.
        OSError: the file cannot be read.
    """
    fingerprint_mode_byte(mode)
    if mode == "fast_unsafe":
        raise KvcError("bad_argument", "fast_unsafe: the caller must supply the fingerprint")
    real = os.path.realpath(path)
    st = os.stat(real)
    return _hash_file(real, mode, st.st_ino, st.st_size, st.st_mtime_ns)
