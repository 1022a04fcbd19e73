"""The KVC codec: round trips, CRC vectors, every error code, and a corruption fuzz."""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erllama.cache.keys import QUANT_TABLE, make_key
from erllama.cache.kvc import (
    FIXED_BYTES,
    HIT_COUNT_OFFSET,
    KvcError,
    KvcMeta,
    SaveReason,
    build_prefix,
    crc32c,
    parse_metadata,
    prefix_length_needed,
    read_metadata,
    set_hit_count,
    validate_full,
)

FP = bytes(range(32))
CTX = bytes(range(64, 96))
TOKENS = [5, 6, 7, 2**32 - 1]
PACKED = struct.pack("<4I", *TOKENS)
PAYLOAD = bytes(range(256)) * 3


def sample_meta(**over: object) -> KvcMeta:
    fields: dict[str, object] = {
        "save_reason": SaveReason.COLD,
        "quant_bits": 4,
        "context_size": 4096,
        "fingerprint": FP,
        "fingerprint_mode": 0,
        "quant": 7,
        "ctx_hash": CTX,
        "tokens": PACKED,
        "hostname": b"host",
        "version": b"0.1.0",
        "detail": b"",
        "creation_time": 1_700_000_000,
        "last_used_time": 1_700_000_001,
        "hit_count": 3,
        "state_format": b"llama.cpp-seq-v1",
    }
    fields.update(over)
    return KvcMeta(**fields)  # type: ignore[arg-type]


def whole(meta: KvcMeta | None = None, payload: bytes = PAYLOAD) -> bytes:
    meta = meta or sample_meta()
    return build_prefix(meta, payload) + payload


def header_crc(prefix: bytes | bytearray, offset: int) -> int:
    b = bytearray(prefix[:offset])
    b[12:16] = bytes(4)
    b[68:72] = bytes(4)
    return crc32c(bytes(b))


def tlv(tag: int, value: bytes) -> bytes:
    return struct.pack("<BI", tag, len(value)) + value


def std_records() -> list[bytes]:
    return [
        tlv(1, FP),
        tlv(2, b"\x00"),
        tlv(3, b"\x07"),
        tlv(4, CTX),
        tlv(8, struct.pack("<I", 4)),
        tlv(9, PACKED),
    ]


def craft(
    *,
    magic: bytes = b"KVC",
    version: int = 1,
    reason: int = 1,
    byte_count: int | None = None,
    payload_offset: int | None = None,
    payload_length: int | None = None,
    payload_crc: int | None = None,
    hcrc: int | None = None,
    prompt: bytes = b"",
    prompt_len: int | None = None,
    records: list[bytes] | None = None,
    tlv_len: int | None = None,
    payload: bytes = PAYLOAD,
) -> bytes:
    """A file built field by field, so any field can lie. The header CRC is recomputed
    unless ``hcrc`` is given (0 = absent)."""
    body = b"".join(std_records() if records is None else records)
    sections = (
        struct.pack("<I", len(prompt) if prompt_len is None else prompt_len)
        + prompt
        + struct.pack("<I", len(body) if tlv_len is None else tlv_len)
        + body
    )
    offset = FIXED_BYTES + len(sections) if payload_offset is None else payload_offset
    fixed = struct.pack(
        "<3sBBBHIIIIQQQQQII",
        magic,
        version,
        4,
        reason,
        0,
        4,
        3,
        4096,
        0,
        1,
        2,
        len(payload) if byte_count is None else byte_count,
        offset,
        len(payload) if payload_length is None else payload_length,
        crc32c(payload) if payload_crc is None else payload_crc,
        0,
    )
    prefix = bytearray(fixed + sections)
    crc = header_crc(prefix, min(offset, len(prefix))) if hcrc is None else hcrc
    prefix[68:72] = struct.pack("<I", crc)
    return bytes(prefix) + payload


def code_of(buf: bytes, key: bytes | None = None, **kw: int) -> str:
    with pytest.raises(KvcError) as err:
        validate_full(buf, key, **kw)
    return err.value.code


@pytest.mark.parametrize(
    ("data", "crc"),
    [
        (b"123456789", 0xE3069283),
        (b"", 0),
        (b"\x00", 0x527D5351),
        (bytes(32), 0x8A9136AA),
        (b"\xff" * 32, 0x62A8AB43),
    ],
)
def test_crc32c_vectors(data: bytes, crc: int) -> None:
    assert crc32c(data) == crc
    assert crc32c(memoryview(data)) == crc


def test_layout_and_write_order() -> None:
    meta = sample_meta(detail=b"why")
    prefix = build_prefix(meta, PAYLOAD)
    assert prefix[:4] == b"KVC\x01"
    assert prefix[4] == 4 and prefix[5] == 1
    count, hits, ctx = struct.unpack_from("<III", prefix, 8)
    assert (count, hits, ctx) == (4, 3, 4096)
    ctime, ltime, nbytes, off, length, pcrc, hcrc = struct.unpack_from("<QQQQQII", prefix, 24)
    assert (ctime, ltime, nbytes, length) == (1_700_000_000, 1_700_000_001, 768, 768)
    assert off == len(prefix)
    assert pcrc == crc32c(PAYLOAD)
    assert hcrc == header_crc(prefix, off) != 0
    assert struct.unpack_from("<I", prefix, 72)[0] == 0  # empty prompt
    (tlv_len,) = struct.unpack_from("<I", prefix, 76)
    assert 80 + tlv_len == off
    tags, at = [], 80
    while at < off:
        tag, n = struct.unpack_from("<BI", prefix, at)
        tags.append(tag)
        at += 5 + n
    assert tags == [0x01, 0x02, 0x03, 0x04, 0x08, 0x09, 0x05, 0x06, 0x07, 0x80]


def test_optional_tags_omitted_when_empty() -> None:
    meta = sample_meta(hostname=b"", version=b"", state_format=b"")
    parsed, _ = validate_full(whole(meta), meta.key())
    assert parsed.meta == meta
    assert len(build_prefix(meta, b"")) == 80 + 5 * 6 + 32 + 1 + 1 + 32 + 4 + 16


metas = st.builds(
    KvcMeta,
    save_reason=st.sampled_from(SaveReason),
    quant_bits=st.integers(0, 255),
    context_size=st.integers(0, 2**32 - 1),
    fingerprint=st.binary(min_size=32, max_size=32),
    fingerprint_mode=st.integers(0, 2),
    quant=st.sampled_from(sorted(QUANT_TABLE.values())),
    ctx_hash=st.binary(min_size=32, max_size=32),
    tokens=st.lists(st.integers(0, 2**32 - 1), max_size=64).map(
        lambda t: struct.pack(f"<{len(t)}I", *t)
    ),
    hostname=st.binary(max_size=20),
    version=st.binary(max_size=20),
    detail=st.binary(max_size=20),
    creation_time=st.integers(0, 2**64 - 1),
    last_used_time=st.integers(0, 2**64 - 1),
    hit_count=st.integers(0, 2**32 - 1),
    state_format=st.binary(max_size=20),
)


@settings(max_examples=300)
@given(metas, st.binary(max_size=2048))
def test_round_trip(meta: KvcMeta, payload: bytes) -> None:
    prefix = build_prefix(meta, payload)
    buf = prefix + payload
    assert prefix_length_needed(buf[:FIXED_BYTES], len(buf)) == len(prefix)
    parsed, view = validate_full(buf, meta.key())
    assert parsed.meta == meta
    assert bytes(view) == payload
    assert (parsed.payload_offset, parsed.payload_length) == (len(prefix), len(payload))
    assert parse_metadata(prefix, len(buf)) == parsed
    assert parse_metadata(memoryview(buf), len(buf)) == parsed
    assert meta.n_tokens == len(meta.tokens) // 4


def test_meta_key_and_msgpack() -> None:
    meta = sample_meta()
    assert meta.key() == make_key(FP, 7, CTX, TOKENS)
    again = msgspec.msgpack.decode(msgspec.msgpack.encode(meta), type=KvcMeta)
    assert again == meta
    assert again.save_reason is SaveReason.COLD


def test_payload_view_is_zero_copy_over_mmap(tmp_path: Path) -> None:
    meta = sample_meta()
    path = tmp_path / "row.kvc"
    path.write_bytes(whole(meta))
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        parsed, view = validate_full(memoryview(mm), meta.key())
        assert view.obj is mm
        assert bytes(view) == PAYLOAD
        assert parsed.meta == meta
        view.release()
        parsed2, view2 = validate_full(mm, meta.key())  # an mmap directly works too
        assert parsed2 == parsed
        view2.release()


def test_read_metadata_and_hit_count(tmp_path: Path) -> None:
    meta = sample_meta()
    path = tmp_path / "row.kvc"
    path.write_bytes(whole(meta))
    assert read_metadata(path).meta == meta
    assert set_hit_count(str(path), 41)
    assert read_metadata(path).meta.hit_count == 41
    fd = os.open(path, os.O_RDWR)
    try:
        assert set_hit_count(fd, 2**40)  # saturates
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert struct.unpack_from("<I", data, HIT_COUNT_OFFSET)[0] == 2**32 - 1
    parsed, _ = validate_full(data, meta.key())  # the header CRC ignores hit_count
    assert parsed.meta.hit_count == 2**32 - 1
    assert not set_hit_count(str(tmp_path / "gone.kvc"), 1)


def test_read_metadata_rejects_short_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.kvc"
    path.write_bytes(whole()[:70])
    with pytest.raises(KvcError) as err:
        read_metadata(path)
    assert err.value.code == "bad_trailer"


def test_upstream_file_without_header_crc_parses() -> None:
    buf = craft(hcrc=0)
    parsed, _ = validate_full(buf, make_key(FP, 7, CTX, TOKENS))
    assert parsed.header_crc == 0
    assert parsed.meta.hostname == b""


def test_unknown_tags_and_prompt_are_skipped() -> None:
    records = [tlv(0x42, b"future"), *std_records(), tlv(0x99, b"ours, later")]
    buf = craft(records=records, prompt="héllo".encode())
    parsed, view = validate_full(buf, make_key(FP, 7, CTX, TOKENS))
    assert parsed.meta.tokens == PACKED
    assert bytes(view) == PAYLOAD


def test_key_mismatch_for_renamed_file() -> None:
    other = make_key(FP, 7, CTX, [*TOKENS, 1])
    assert code_of(whole(), other) == "key_mismatch"


def test_crafted_file_is_valid_baseline() -> None:
    validate_full(craft(), make_key(FP, 7, CTX, TOKENS))


def drop(tag: int) -> list[bytes]:
    return [r for r in std_records() if r[0] != tag]


def replace(tag: int, value: bytes) -> list[bytes]:
    return [tlv(tag, value) if r[0] == tag else r for r in std_records()]


ERROR_CASES: list[tuple[str, bytes]] = [
    ("bad_header", craft(magic=b"KVX")),
    ("bad_header", whole()[:40]),
    ("unsupported_version", craft(version=2)),
    ("unknown_save_reason", craft(reason=6)),
    ("bad_trailer", whole()[:60]),
    ("bad_trailer", craft(payload_offset=40)),
    ("bad_trailer", craft(payload_offset=10**9)),
    ("bad_length_prefixed_section", craft(prompt_len=10**6)),
    ("bad_length_prefixed_section", craft(tlv_len=10**6)),
    ("bad_payload_offset", craft(payload_offset=300)),
    ("header_crc_mismatch", craft(hcrc=0xDEADBEEF)),
    ("bad_tlv", craft(records=[*std_records(), b"\x05\x01"])),
    ("bad_tlv", craft(records=[*std_records(), struct.pack("<BI", 5, 99) + b"x"])),
    ("payload_length_mismatch", craft(byte_count=1)),
    ("truncated", craft(payload_length=len(PAYLOAD) + 1, byte_count=len(PAYLOAD) + 1)),
    ("truncated", whole()[:-1]),
    ("trailing_bytes", whole() + b"\x00"),
    ("missing_tlv", craft(records=drop(1))),
    ("missing_tlv", craft(records=drop(2))),
    ("missing_tlv", craft(records=drop(3))),
    ("missing_tlv", craft(records=drop(4))),
    ("missing_tlv", craft(records=drop(9))),
    ("missing_tlv", craft(records=replace(4, CTX[:31]))),
    ("missing_tlv", craft(records=replace(9, PACKED + b"\x01"))),
    ("unknown_fingerprint_mode", craft(records=replace(2, b"\x07"))),
    ("unknown_quant_byte", craft(records=replace(3, b"\x1e"))),
    ("unknown_quant_byte", craft(records=replace(3, b"\xfe"))),
    ("malformed", craft(records=[*std_records(), tlv(1, FP)])),
    ("crc_mismatch", craft(payload_crc=1)),
]


@pytest.mark.parametrize(("code", "buf"), ERROR_CASES, ids=[c for c, _ in ERROR_CASES])
def test_error_codes(code: str, buf: bytes) -> None:
    assert code_of(buf, make_key(FP, 7, CTX, TOKENS)) == code


def test_payload_out_of_bounds() -> None:
    buf = whole()
    assert code_of(buf[:-1], None, file_size=len(buf)) == "payload_out_of_bounds"


def test_parse_metadata_needs_the_prefix() -> None:
    buf = whole()
    need = prefix_length_needed(buf[:FIXED_BYTES], len(buf))
    with pytest.raises(KvcError) as err:
        parse_metadata(buf[: need - 1], len(buf))
    assert err.value.code == "truncated"
    assert parse_metadata(buf[:need], len(buf)).payload_offset == need


@pytest.mark.parametrize(
    ("over", "code"),
    [
        ({"fingerprint": FP[:31]}, "bad_argument"),
        ({"ctx_hash": b""}, "bad_argument"),
        ({"tokens": b"\x01\x02"}, "bad_argument"),
        ({"quant": 30}, "unknown_quant_byte"),
        ({"quant": 254}, "unknown_quant_byte"),
        ({"fingerprint_mode": 3}, "unknown_fingerprint_mode"),
        ({"save_reason": 9}, "unknown_save_reason"),
        ({"quant_bits": 256}, "bad_argument"),
        ({"creation_time": -1}, "bad_argument"),
        ({"hit_count": 2**32}, "bad_argument"),
    ],
)
def test_build_rejects_bad_meta(over: dict[str, object], code: str) -> None:
    with pytest.raises(KvcError) as err:
        build_prefix(sample_meta(**over), b"")
    assert err.value.code == code


BASE_META = sample_meta()
BASE = whole(BASE_META)
BASE_KEY = BASE_META.key()
N_PREFIX = len(BASE) - len(PAYLOAD)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(0, len(BASE) - 1), st.integers(1, 255)), min_size=1, max_size=4),
    st.one_of(st.none(), st.integers(0, len(BASE) + 8)),
)
def test_fuzz_only_kvc_errors(flips: list[tuple[int, int]], cut: int | None) -> None:
    buf = bytearray(BASE)
    for pos, mask in flips:
        buf[pos] ^= mask
    if cut is not None:
        buf = buf[:cut] if cut <= len(buf) else buf + bytes(cut - len(buf))
    changed = {i for i in range(min(len(buf), len(BASE))) if buf[i] != BASE[i]}
    try:
        validate_full(bytes(buf), BASE_KEY)
    except KvcError:
        return
    # Accepted only if nothing but the mutable hit_count moved, or the header CRC word was
    # zeroed (an upstream file) and the change then lay where no check looks.
    assert len(buf) == len(BASE)
    assert changed <= set(range(12, 16)) or buf[68:72] == bytes(4)


@settings(max_examples=200)
@given(st.integers(N_PREFIX, len(BASE) - 1), st.integers(1, 255))
def test_flipped_payload_byte_is_crc_mismatch(pos: int, mask: int) -> None:
    buf = bytearray(BASE)
    buf[pos] ^= mask
    assert code_of(bytes(buf), BASE_KEY) == "crc_mismatch"
    # the startup scan does not read the payload, so it does not notice
    assert parse_metadata(bytes(buf), len(buf)).meta == BASE_META


@settings(max_examples=200)
@given(st.integers(0, N_PREFIX - 1), st.integers(1, 255))
def test_flipped_prefix_byte_is_detected(pos: int, mask: int) -> None:
    buf = bytearray(BASE)
    buf[pos] ^= mask
    if HIT_COUNT_OFFSET <= pos < HIT_COUNT_OFFSET + 4:
        assert validate_full(bytes(buf), BASE_KEY)[0].meta.hit_count != BASE_META.hit_count
        return
    if buf[68:72] == bytes(4):
        return  # the flip erased the header CRC: an upstream-style file
    with pytest.raises(KvcError):
        parse_metadata(bytes(buf), len(buf))


def test_logits_tail_round_trip_and_bounds() -> None:
    from erllama.cache.kvc import KvcError, KvcMeta, SaveReason, build_prefix, validate_full

    meta = KvcMeta(
        save_reason=SaveReason.FINISH,
        quant_bits=4,
        context_size=4096,
        fingerprint=b"\x01" * 32,
        fingerprint_mode=0,
        quant=7,
        ctx_hash=b"\x02" * 32,
        tokens=b"\x05\x00\x00\x00" * 3,
        logits_tail=8,
    )
    payload = b"state-bytes" + b"\x00\x00\x80\x3f" * 2
    blob = build_prefix(meta, payload) + payload
    parsed, view = validate_full(blob, meta.key())
    assert parsed.meta.logits_tail == 8
    assert bytes(view[-8:]) == b"\x00\x00\x80\x3f" * 2
    bad = KvcMeta(**{**{f: getattr(meta, f) for f in meta.__struct_fields__}, "logits_tail": 64})
    blob = build_prefix(bad, payload) + payload
    with pytest.raises(KvcError) as ei:
        validate_full(blob, bad.key())
    assert ei.value.code == "malformed"
