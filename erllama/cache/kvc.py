"""The KVC file codec: build, parse and validate cache files (REFERENCE §4).

Layout (little-endian)::

    0   48  header    magic "KVC", version 1, quant_bits, save_reason, reserved,
                      cached_token_count, hit_count (@12, rewritten in place), context_size,
                      reserved, creation_time, last_used_time, payload_byte_count
    48  24  trailer   payload_offset, payload_length, payload_crc32c, header_crc32c (@68)
    72  4+n prompt    u32 length + UTF-8 (written empty; untrusted)
    ..  4+m TLV       u32 length + records (u8 tag, u32 len, value)
    ..      payload   raw sequence state, to the end of the file

Upstream-compatible additions (REFERENCE §4 recommendations):

* The reserved word at 68 holds the CRC32C of bytes ``[0, payload_offset)`` computed with
  the hit_count field (12..16) and the word itself (68..72) zeroed. 0 means absent, so
  upstream files still parse; a mismatch is ``header_crc_mismatch``.
* ``payload_offset`` must equal the end of the TLV section (``bad_payload_offset``).
* Tags >= 0x80 are ours: 0x80 = backend state-format identifier (``KvcMeta.state_format``).
  Unknown tags are skipped.

Reading a file in two steps (the tier startup scan): read ``FIXED_BYTES`` (72) bytes, call
``prefix_length_needed(first, file_size)`` to learn how many bytes precede the payload, read
that many from offset 0, then ``parse_metadata(prefix, file_size)``. ``read_metadata(path)``
does exactly that. Loading a row maps the whole file and calls ``validate_full`` (payload
CRC and key replay), which returns a view of the payload without copying it.

Checks run in this order, the first failure wins: header (``bad_header``,
``unsupported_version``, ``unknown_save_reason``), trailer (``bad_trailer``), sections
(``bad_length_prefixed_section``), ``bad_payload_offset``, ``header_crc_mismatch``, TLV
records (``bad_tlv``), ``payload_length_mismatch``, ``truncated``, ``trailing_bytes``,
``missing_tlv``, TLV values (``unknown_fingerprint_mode``, ``unknown_quant_byte``); then,
for full validation, ``payload_out_of_bounds``, ``crc_mismatch``, ``key_mismatch``.
Duplicate known tags are ``malformed``.
"""

from __future__ import annotations

import enum
import logging
import mmap
import os
import struct

import crc32c as _crc32c
import msgspec

from erllama.cache.keys import (
    CTX_HASH_BYTES,
    FINGERPRINT_BYTES,
    FINGERPRINT_MODES,
    KvcError,
    check_quant_byte,
    make_key_packed,
)

__all__ = [
    "FIXED_BYTES",
    "HIT_COUNT_OFFSET",
    "KvcError",
    "KvcMeta",
    "ParsedKvc",
    "SaveReason",
    "build_prefix",
    "crc32c",
    "parse_metadata",
    "prefix_length_needed",
    "read_metadata",
    "set_hit_count",
    "validate_full",
]

log = logging.getLogger(__name__)

MAGIC = b"KVC"
VERSION = 1
HEADER_BYTES = 48
FIXED_BYTES = 72  # header + trailer
MIN_PREFIX_BYTES = FIXED_BYTES + 4 + 4  # empty prompt and TLV sections
HIT_COUNT_OFFSET = 12
HEADER_CRC_OFFSET = 68

_FIXED = struct.Struct("<3sBBBHIIIIQQQQQII")
_U32 = struct.Struct("<I")
_TLV_HEAD = struct.Struct("<BI")
_ZERO4 = bytes(4)
_U32_MAX = 0xFFFF_FFFF
_U64_MAX = 0xFFFF_FFFF_FFFF_FFFF

TAG_FINGERPRINT = 0x01
TAG_FINGERPRINT_MODE = 0x02
TAG_QUANT = 0x03
TAG_CTX_HASH = 0x04
TAG_HOSTNAME = 0x05
TAG_VERSION = 0x06
TAG_DETAIL = 0x07
TAG_TOKEN_COUNT = 0x08
TAG_TOKENS = 0x09
TAG_STATE_FORMAT = 0x80
TAG_LOGITS_TAIL = 0x81
_KNOWN_TAGS = frozenset(range(TAG_FINGERPRINT, TAG_TOKENS + 1)) | {
    TAG_STATE_FORMAT,
    TAG_LOGITS_TAIL,
}

Buffer = bytes | bytearray | memoryview | mmap.mmap


class SaveReason(enum.IntEnum):
    """Why a row was saved (header byte 5)."""

    UNKNOWN = 0
    COLD = 1
    CONTINUED = 2
    EVICT = 3
    SHUTDOWN = 4
    FINISH = 5


_SAVE_REASONS = frozenset(int(r) for r in SaveReason)


class KvcMeta(msgspec.Struct):
    """Everything a KVC file stores except the payload."""

    save_reason: SaveReason
    quant_bits: int
    context_size: int
    fingerprint: bytes  # 32 B, the effective fingerprint
    fingerprint_mode: int  # 0 safe, 1 gguf_chunked, 2 fast_unsafe
    quant: int  # REFERENCE §3.2 byte
    ctx_hash: bytes  # 32 B
    tokens: bytes  # packed u32le
    hostname: bytes = b""
    version: bytes = b""
    detail: bytes = b""
    creation_time: int = 0  # Unix seconds
    last_used_time: int = 0  # Unix seconds
    hit_count: int = 0
    state_format: bytes = b""  # TLV 0x80, e.g. b"llama.cpp-seq-v1"
    logits_tail: int = 0  # TLV 0x81: the payload ends with this many bytes of f32 logits

    @property
    def n_tokens(self) -> int:
        """The number of tokens the row holds."""
        return len(self.tokens) // 4

    def key(self) -> bytes:
        """The cache key these fields derive (REFERENCE §3.1)."""
        return make_key_packed(self.fingerprint, self.quant, self.ctx_hash, self.tokens)


class ParsedKvc(msgspec.Struct, frozen=True):
    """The metadata of a file plus where its payload lies."""

    meta: KvcMeta
    payload_offset: int
    payload_length: int
    payload_crc: int
    header_crc: int = 0  # 0: the file carries none (upstream writer)


def crc32c(data: Buffer, value: int = 0) -> int:
    """CRC32C (Castagnoli) of ``data``, continuing from ``value``."""
    return int(_crc32c.crc32c(data, value))


def _header_crc(prefix: Buffer, payload_offset: int) -> int:
    """CRC32C of ``prefix[:payload_offset]`` with hit_count and the CRC word zeroed."""
    view = memoryview(prefix)
    crc = crc32c(view[:HIT_COUNT_OFFSET])
    crc = crc32c(_ZERO4, crc)
    crc = crc32c(view[HIT_COUNT_OFFSET + 4 : HEADER_CRC_OFFSET], crc)
    crc = crc32c(_ZERO4, crc)
    return crc32c(view[FIXED_BYTES:payload_offset], crc)


def _tlv(tag: int, value: bytes) -> bytes:
    return _TLV_HEAD.pack(tag, len(value)) + value


def _check_range(name: str, value: int, top: int) -> None:
    if not 0 <= value <= top:
        raise KvcError("bad_argument", f"{name}={value} outside 0..{top}")


def _check_meta(meta: KvcMeta) -> None:
    if len(meta.fingerprint) != FINGERPRINT_BYTES:
        raise KvcError("bad_argument", f"fingerprint is {len(meta.fingerprint)} bytes")
    if len(meta.ctx_hash) != CTX_HASH_BYTES:
        raise KvcError("bad_argument", f"ctx_hash is {len(meta.ctx_hash)} bytes")
    if len(meta.tokens) % 4:
        raise KvcError("bad_argument", "tokens length is not a multiple of 4")
    if meta.fingerprint_mode not in FINGERPRINT_MODES.values():
        raise KvcError("unknown_fingerprint_mode", f"fingerprint_mode {meta.fingerprint_mode}")
    check_quant_byte(meta.quant)  # a file with an unassigned byte could never be read back
    try:
        SaveReason(meta.save_reason)
    except ValueError:
        raise KvcError("unknown_save_reason", f"save_reason {meta.save_reason}") from None
    _check_range("quant_bits", meta.quant_bits, 0xFF)
    _check_range("context_size", meta.context_size, _U32_MAX)
    _check_range("hit_count", meta.hit_count, _U32_MAX)
    _check_range("creation_time", meta.creation_time, _U64_MAX)
    _check_range("last_used_time", meta.last_used_time, _U64_MAX)
    _check_range("token count", len(meta.tokens) // 4, _U32_MAX)
    _check_range("logits_tail", meta.logits_tail, _U32_MAX)


def build_prefix(meta: KvcMeta, payload: Buffer) -> bytes:
    """Everything of a KVC file before the payload, both CRCs filled in.

    The writer then emits ``[prefix, payload]`` with ``os.writev`` so the payload is never
    copied. The payload is only read (length and CRC).

    Raises:
        KvcError: ``bad_argument`` (sizes, ranges), ``unknown_quant_byte``,
            ``unknown_fingerprint_mode`` or ``unknown_save_reason``.
    """
    _check_meta(meta)
    n_tokens = len(meta.tokens) // 4
    records = [
        _tlv(TAG_FINGERPRINT, bytes(meta.fingerprint)),
        _tlv(TAG_FINGERPRINT_MODE, bytes((meta.fingerprint_mode,))),
        _tlv(TAG_QUANT, bytes((meta.quant,))),
        _tlv(TAG_CTX_HASH, bytes(meta.ctx_hash)),
        _tlv(TAG_TOKEN_COUNT, _U32.pack(n_tokens)),
        _tlv(TAG_TOKENS, bytes(meta.tokens)),
    ]
    for tag, value in (
        (TAG_HOSTNAME, meta.hostname),
        (TAG_VERSION, meta.version),
        (TAG_DETAIL, meta.detail),
        (TAG_STATE_FORMAT, meta.state_format),
    ):
        if value:
            records.append(_tlv(tag, bytes(value)))
    if meta.logits_tail:
        records.append(_tlv(TAG_LOGITS_TAIL, _U32.pack(meta.logits_tail)))
    tlv = b"".join(records)
    prompt = b""
    payload_offset = FIXED_BYTES + 4 + len(prompt) + 4 + len(tlv)
    payload_length = memoryview(payload).nbytes
    fixed = _FIXED.pack(
        MAGIC,
        VERSION,
        meta.quant_bits,
        int(meta.save_reason),
        0,
        n_tokens,
        meta.hit_count,
        meta.context_size,
        0,
        meta.creation_time,
        meta.last_used_time,
        payload_length,
        payload_offset,
        payload_length,
        crc32c(payload),
        0,
    )
    prefix = bytearray(fixed)
    prefix += _U32.pack(len(prompt)) + prompt + _U32.pack(len(tlv)) + tlv
    header_crc = _header_crc(prefix, payload_offset)
    prefix[HEADER_CRC_OFFSET : HEADER_CRC_OFFSET + 4] = _U32.pack(header_crc)
    return bytes(prefix)


def _check_fixed(buf: Buffer, file_size: int) -> tuple[int, ...]:
    """Header and trailer checks; returns the unpacked fixed fields."""
    if min(len(buf), file_size) < HEADER_BYTES or bytes(buf[:3]) != MAGIC:
        raise KvcError("bad_header", "no KVC header")
    if buf[3] != VERSION:
        raise KvcError("unsupported_version", f"version {buf[3]}")
    if buf[5] not in _SAVE_REASONS:
        raise KvcError("unknown_save_reason", f"save_reason {buf[5]}")
    if min(len(buf), file_size) < FIXED_BYTES:
        raise KvcError("bad_trailer", "file ends inside the trailer")
    fields = _FIXED.unpack_from(buf, 0)
    payload_offset = fields[12]
    if not MIN_PREFIX_BYTES <= payload_offset <= file_size:
        raise KvcError("bad_trailer", f"payload_offset {payload_offset}, file size {file_size}")
    return fields


def prefix_length_needed(first: Buffer, file_size: int) -> int:
    """How many bytes from offset 0 ``parse_metadata`` needs: the claimed payload offset.

    Args:
        first: at least the first ``FIXED_BYTES`` (72) bytes of the file.
        file_size: the size of the file.

    Raises:
        KvcError: ``bad_header``, ``unsupported_version``, ``unknown_save_reason`` or
            ``bad_trailer`` (offset below the minimum prefix or past the end of the file).
    """
    return int(_check_fixed(first, file_size)[12])


def _section(buf: Buffer, at: int, limit: int, file_size: int) -> int:
    """The end of the length-prefixed section starting at ``at``."""
    if at + 4 > file_size:
        raise KvcError("bad_length_prefixed_section", f"section length at {at} past end of file")
    if at + 4 > limit:
        raise KvcError("truncated", f"buffer ends at {limit} inside the section at {at}")
    (length,) = _U32.unpack_from(buf, at)
    end = at + 4 + int(length)
    if end > file_size:
        raise KvcError("bad_length_prefixed_section", f"section at {at} runs past end of file")
    if end > limit:
        raise KvcError("truncated", f"buffer ends at {limit} inside the section at {at}")
    return end


def _records(buf: Buffer, start: int, end: int) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    at = start
    while at < end:
        if at + _TLV_HEAD.size > end:
            raise KvcError("bad_tlv", f"truncated TLV record header at {at}")
        tag, length = _TLV_HEAD.unpack_from(buf, at)
        at += _TLV_HEAD.size
        if at + length > end:
            raise KvcError("bad_tlv", f"TLV 0x{tag:02x} at {at} runs past the section")
        if tag in _KNOWN_TAGS:
            if tag in found:
                raise KvcError("malformed", f"duplicate TLV 0x{tag:02x}")
            found[tag] = bytes(buf[at : at + length])
        at += length
    return found


def _meta_from(fields: tuple[int, ...], tlv: dict[int, bytes]) -> KvcMeta:
    fp = tlv.get(TAG_FINGERPRINT)
    ctx = tlv.get(TAG_CTX_HASH)
    mode = tlv.get(TAG_FINGERPRINT_MODE)
    quant = tlv.get(TAG_QUANT)
    tokens = tlv.get(TAG_TOKENS)
    # A wrong-size value is skipped, so it surfaces as missing (REFERENCE §4).
    fp = fp if fp is not None and len(fp) == FINGERPRINT_BYTES else None
    ctx = ctx if ctx is not None and len(ctx) == CTX_HASH_BYTES else None
    mode = mode if mode is not None and len(mode) == 1 else None
    quant = quant if quant is not None and len(quant) == 1 else None
    tokens = tokens if tokens is not None and len(tokens) % 4 == 0 else None
    missing = [
        name
        for name, value in (
            ("fingerprint", fp),
            ("fingerprint_mode", mode),
            ("quant_type", quant),
            ("ctx_params_hash", ctx),
            ("token_ids", tokens),
        )
        if value is None
    ]
    if fp is None or ctx is None or mode is None or quant is None or tokens is None:
        raise KvcError("missing_tlv", ", ".join(missing))
    if mode[0] not in FINGERPRINT_MODES.values():
        raise KvcError("unknown_fingerprint_mode", f"fingerprint_mode {mode[0]}")
    check_quant_byte(quant[0])
    return KvcMeta(
        save_reason=SaveReason(fields[3]),
        quant_bits=fields[2],
        context_size=fields[7],
        fingerprint=fp,
        fingerprint_mode=mode[0],
        quant=quant[0],
        ctx_hash=ctx,
        tokens=tokens,
        hostname=tlv.get(TAG_HOSTNAME, b""),
        version=tlv.get(TAG_VERSION, b""),
        detail=tlv.get(TAG_DETAIL, b""),
        creation_time=fields[9],
        last_used_time=fields[10],
        hit_count=fields[6],
        state_format=tlv.get(TAG_STATE_FORMAT, b""),
        logits_tail=_logits_tail(tlv.get(TAG_LOGITS_TAIL)),
    )


def _logits_tail(value: bytes | None) -> int:
    # a wrong-size value is skipped (REFERENCE §4): the row is then served without logits
    if value is None or len(value) != 4:
        return 0
    return int(_U32.unpack(value)[0])


def parse_metadata(buf: Buffer, file_size: int) -> ParsedKvc:
    """Parse and check everything but the payload CRC and the key (the startup scan).

    Args:
        buf: the file from offset 0, at least up to the payload offset (the whole file, an
            mmap of it, or the first ``prefix_length_needed`` bytes).
        file_size: the size of the file (``os.fstat``); it bounds every section.

    Raises:
        KvcError: see the module docstring for the codes and their order. ``truncated`` is
            also raised when ``buf`` ends before the payload offset.
    """
    fields = _check_fixed(buf, file_size)
    payload_byte_count, payload_offset, payload_length = fields[11], fields[12], fields[13]
    payload_crc, header_crc = fields[14], fields[15]
    limit = min(len(buf), file_size)
    tlv_start = _section(buf, FIXED_BYTES, limit, file_size)
    tlv_end = _section(buf, tlv_start, limit, file_size)
    if payload_offset != tlv_end:
        raise KvcError("bad_payload_offset", f"payload_offset {payload_offset}, TLV ends {tlv_end}")
    if header_crc:
        actual = _header_crc(buf, payload_offset)
        if actual != header_crc:
            raise KvcError(
                "header_crc_mismatch", f"expected 0x{header_crc:08x}, actual 0x{actual:08x}"
            )
    tlv = _records(buf, tlv_start + 4, tlv_end)
    if payload_length != payload_byte_count:
        raise KvcError(
            "payload_length_mismatch", f"trailer {payload_length}, header {payload_byte_count}"
        )
    if file_size < payload_offset + payload_length:
        raise KvcError("truncated", f"file {file_size} < {payload_offset} + {payload_length}")
    if file_size != payload_offset + payload_length:
        raise KvcError("trailing_bytes", f"file {file_size} > {payload_offset} + {payload_length}")
    meta = _meta_from(fields, tlv)
    if meta.logits_tail > payload_length or meta.logits_tail % 4:
        raise KvcError("malformed", f"logits tail {meta.logits_tail} of a {payload_length} payload")
    return ParsedKvc(
        meta=meta,
        payload_offset=payload_offset,
        payload_length=payload_length,
        payload_crc=payload_crc,
        header_crc=header_crc,
    )


def validate_full(
    buf: Buffer, expected_key: bytes | None, *, file_size: int | None = None
) -> tuple[ParsedKvc, memoryview]:
    """Full validation (load, and after publish): metadata, payload CRC and key replay.

    Args:
        buf: the whole file (bytes, or an mmap wrapped in a memoryview).
        expected_key: the key the file is published under; None skips the key check.
        file_size: the size from ``os.fstat``; defaults to ``len(buf)``. A buffer shorter
            than it (the file shrank after the stat) gives ``payload_out_of_bounds``.

    Returns:
        The parsed metadata and a view of the payload inside ``buf`` (no copy; release it
        before closing an mmap).

    Raises:
        KvcError: the metadata codes, then ``payload_out_of_bounds``, ``crc_mismatch`` and
            ``key_mismatch``; the message carries the expected and actual values.
    """
    view = memoryview(buf).cast("B")
    size = len(view) if file_size is None else file_size
    try:
        parsed = parse_metadata(view, size)
        end = parsed.payload_offset + parsed.payload_length
        if end > len(view):
            raise KvcError("payload_out_of_bounds", f"payload ends at {end}, buffer {len(view)}")
        payload = view[parsed.payload_offset : end]
        actual = crc32c(payload)
        if actual != parsed.payload_crc:
            payload.release()
            raise KvcError(
                "crc_mismatch", f"expected 0x{parsed.payload_crc:08x}, actual 0x{actual:08x}"
            )
        if expected_key is not None:
            key = parsed.meta.key()
            if key != expected_key:
                payload.release()
                raise KvcError(
                    "key_mismatch", f"expected {bytes(expected_key).hex()}, actual {key.hex()}"
                )
    except BaseException:
        view.release()
        raise
    return parsed, payload


def read_metadata(path: str | os.PathLike[str]) -> ParsedKvc:
    """Read and ``parse_metadata`` a file's prefix (two reads; the payload is not read).

    Raises:
        KvcError: as ``parse_metadata``.
        OSError: the file cannot be read.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        first = f.read(FIXED_BYTES)
        need = prefix_length_needed(first, size)
        prefix = first + f.read(need - len(first))
    return parse_metadata(prefix, size)


def set_hit_count(target: int | str | os.PathLike[str], n: int) -> bool:
    """Rewrite hit_count in place (a 4-byte pwrite at offset 12), best effort.

    The header CRC leaves this field out, so the rewrite never invalidates a file. The
    value saturates at 2**32 - 1. Nothing is synced.

    Args:
        target: an open file descriptor (writable) or a path.
        n: the new count.

    Returns:
        True when the 4 bytes were written.
    """
    data = _U32.pack(max(0, min(n, _U32_MAX)))
    try:
        if isinstance(target, int):
            return os.pwrite(target, data, HIT_COUNT_OFFSET) == 4
        fd = os.open(target, os.O_WRONLY)
        try:
            return os.pwrite(fd, data, HIT_COUNT_OFFSET) == 4
        finally:
            os.close(fd)
    except OSError as exc:
        log.debug("hit_count rewrite failed on %s: %s", target, exc)
        return False
