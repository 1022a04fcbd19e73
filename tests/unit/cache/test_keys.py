"""Cache keys: the quant table, make_key, one-pass prefix keys, fingerprints (REFERENCE §3)."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from erllama.cache import keys
from erllama.cache.keys import (
    QUANT_TABLE,
    KvcError,
    PrefixHasher,
    check_quant_byte,
    ctx_params_hash,
    effective_fingerprint,
    file_fingerprint,
    make_key,
    make_key_packed,
    quant_byte,
    quant_name,
    quant_namespace,
)

FP = bytes(range(32))
CTX = bytes(range(100, 132))
tokens_st = st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=300)


def reference_key(fp: bytes, quant: int, ctx: bytes, tokens: list[int]) -> bytes:
    return hashlib.sha256(
        fp + bytes([quant]) + ctx + struct.pack(f"<{len(tokens)}I", *tokens)
    ).digest()


def test_quant_table_is_reference_3_2() -> None:
    expected = [
        "f32",
        "f16",
        "q4_0",
        "q4_1",
        "q5_0",
        "q5_1",
        "q8_0",
        "q4_k_m",
        "q4_k_s",
        "q5_k_m",
        "q5_k_s",
        "q6_k",
        "q8_k",
        "q2_k",
        "q3_k_s",
        "q3_k_m",
        "q3_k_l",
        "iq2_xxs",
        "iq2_xs",
        "iq2_s",
        "iq2_m",
        "iq3_xxs",
        "iq3_xs",
        "iq3_s",
        "iq3_m",
        "iq1_s",
        "iq1_m",
        "iq4_nl",
        "iq4_xs",
        "bf16",
    ]
    assert {name: i for i, name in enumerate(expected)} == QUANT_TABLE
    for name, byte in QUANT_TABLE.items():
        assert quant_byte(name) == byte
        assert quant_name(byte) == name
    assert quant_byte("Q4_K_M") == 7


@pytest.mark.parametrize("byte", [255, 30, 200])
def test_unknown_quant(byte: int) -> None:
    assert quant_byte("q9_weird") == 255
    with pytest.raises(KvcError) as err:
        quant_name(byte)
    assert err.value.code == "unknown_quant_byte"


@pytest.mark.parametrize("byte", [30, 200, 254])
def test_unassigned_quant_bytes_are_refused_on_read(byte: int) -> None:
    with pytest.raises(KvcError) as err:
        check_quant_byte(byte)
    assert err.value.code == "unknown_quant_byte"
    for ok in [*QUANT_TABLE.values(), 255]:
        check_quant_byte(ok)


def test_known_quants_keep_the_upstream_namespace() -> None:
    for name, byte in QUANT_TABLE.items():
        assert quant_namespace(FP, name) == (FP, byte)
        assert quant_namespace(FP, name.upper()) == (FP, byte)


def test_other_quants_fold_their_name_into_the_fingerprint() -> None:
    names = ["mxfp4_moe", "tq1_0", "tq2_0", "q2_k_s", "ftype_99", "q4_k_n", ""]
    spaces = {name: quant_namespace(FP, name) for name in names}
    assert {byte for _, byte in spaces.values()} == {255}
    assert len({fp for fp, _ in spaces.values()} | {FP}) == len(names) + 1
    # frozen: a change here orphans every row saved under a quant outside the table
    assert (
        spaces["mxfp4_moe"][0] == hashlib.sha256(b"erllama.other_quant\0mxfp4_moe\0" + FP).digest()
    )
    assert quant_namespace(FP, "MXFP4_MOE") == spaces["mxfp4_moe"]  # names are case-blind
    assert quant_namespace(bytes(32), "tq1_0")[0] != quant_namespace(FP, "tq1_0")[0]
    with pytest.raises(KvcError) as err:
        quant_namespace(FP[:31], "tq1_0")
    assert err.value.code == "bad_argument"


def test_make_key_golden() -> None:
    key = make_key(FP, 7, CTX, [1, 2, 3, 2**32 - 1])
    assert key == reference_key(FP, 7, CTX, [1, 2, 3, 2**32 - 1])
    # Frozen: a change here breaks every published cache file.
    assert key.hex() == "c486c4355b0c87f8d42dace63dfa3caead6e2b96514ca1ebb50cf850f689cfb1"


@given(tokens_st, st.integers(min_value=0, max_value=255))
def test_make_key_matches_reference(tokens: list[int], quant: int) -> None:
    key = make_key(FP, quant, CTX, tokens)
    assert len(key) == 32
    assert key == reference_key(FP, quant, CTX, tokens)
    assert key == make_key_packed(FP, quant, CTX, struct.pack(f"<{len(tokens)}I", *tokens))


@pytest.mark.parametrize(
    ("fp", "quant", "ctx", "tokens"),
    [
        (FP[:31], 1, CTX, [1]),
        (FP, 1, CTX + b"x", [1]),
        (FP, 256, CTX, [1]),
        (FP, -1, CTX, [1]),
        (FP, 1, CTX, [-1]),
        (FP, 1, CTX, [2**32]),
        (FP, 1, CTX, b"\x01\x00\x00\x00"),
    ],
)
def test_make_key_rejects_bad_input(fp: bytes, quant: int, ctx: bytes, tokens: list[int]) -> None:
    with pytest.raises(KvcError) as err:
        make_key(fp, quant, ctx, tokens)
    assert err.value.code == "bad_argument"


def test_make_key_packed_rejects_ragged_bytes() -> None:
    with pytest.raises(KvcError) as err:
        make_key_packed(FP, 1, CTX, b"\x01\x00\x00")
    assert err.value.code == "bad_argument"


@settings(max_examples=200)
@given(tokens_st, st.data())
def test_prefix_hasher_equals_make_key_on_every_prefix(
    tokens: list[int], data: st.DataObject
) -> None:
    hasher = PrefixHasher(FP, 9, CTX)
    every = hasher.keys_at(tokens, range(len(tokens) + 1))
    assert set(every) == set(range(len(tokens) + 1))
    for n, key in every.items():
        assert key == make_key(FP, 9, CTX, tokens[:n])
    some = data.draw(st.lists(st.integers(min_value=0, max_value=len(tokens))))
    packed = struct.pack(f"<{len(tokens)}I", *tokens)
    assert hasher.keys_at_packed(packed, some) == {n: every[n] for n in some}
    # the hasher is reusable: its seed is never consumed
    assert hasher.keys_at(tokens, [len(tokens)]) == {len(tokens): every[len(tokens)]}


@pytest.mark.parametrize("lengths", [[-1], [5], [0, 4, 5]])
def test_prefix_hasher_rejects_out_of_range(lengths: list[int]) -> None:
    with pytest.raises(KvcError) as err:
        PrefixHasher(FP, 1, CTX).keys_at([1, 2, 3, 4], lengths)
    assert err.value.code == "bad_argument"


def q32_body(sha: bytes, q: int) -> bytes:
    return sha + struct.pack("<q", q)


def test_effective_fingerprint_no_adapters_is_base() -> None:
    assert effective_fingerprint(FP, []) == FP


@pytest.mark.parametrize(
    ("scale", "q"),
    [
        (1.0, 2**32),
        (0.5 / 2**32, 1),  # half away from zero (round() would give 0)
        (2.5 / 2**32, 3),  # round() would give 2
        (-2.5 / 2**32, -3),
        (-0.5 / 2**32, -1),
        (0.25, 2**30),
        (0.0, 0),
    ],
)
def test_effective_fingerprint_q32_rounding(scale: float, q: int) -> None:
    sha = b"\xaa" * 32
    expected = hashlib.sha256(FP + q32_body(sha, q)).digest()
    assert effective_fingerprint(FP, [(sha, scale)]) == expected


def test_effective_fingerprint_sorted_and_filtered() -> None:
    a, b = b"\x01" * 32, b"\x02" * 32
    pairs = [(b, 0.5), (a, 1.0), (a, 0.25), (b"short", 1.0)]
    body = q32_body(a, 2**30) + q32_body(a, 2**32) + q32_body(b, 2**31)
    expected = hashlib.sha256(FP + body).digest()
    assert effective_fingerprint(FP, pairs) == expected
    assert effective_fingerprint(FP, list(reversed(pairs))) == expected
    # only malformed shas: the body is empty but the base is still hashed
    assert effective_fingerprint(FP, [(b"x", 1.0)]) == hashlib.sha256(FP).digest()


def test_effective_fingerprint_rejects_nan() -> None:
    with pytest.raises(KvcError) as err:
        effective_fingerprint(FP, [(b"\x01" * 32, float("nan"))])
    assert err.value.code == "bad_argument"


def test_ctx_params_hash_is_canonical_json() -> None:
    params = {"n_ctx": 4096, "type_k": "f16", "flash_attn": False, "b": [1, 2]}
    expected = hashlib.sha256(b'{"b":[1,2],"flash_attn":false,"n_ctx":4096,"type_k":"f16"}')
    assert ctx_params_hash(params) == expected.digest()
    assert ctx_params_hash(dict(reversed(list(params.items())))) == expected.digest()
    assert ctx_params_hash({**params, "n_ctx": 8192}) != expected.digest()


@pytest.mark.parametrize("params", [{"x": float("nan")}, {"x": object()}, {"x": b"raw"}])
def test_ctx_params_hash_rejects_non_json(params: dict[str, object]) -> None:
    with pytest.raises(KvcError) as err:
        ctx_params_hash(params)
    assert err.value.code == "bad_argument"


def test_file_fingerprint_safe_memoised_and_invalidated(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    data = os.urandom(3 * 1024 * 1024 + 17)
    path.write_bytes(data)
    keys._hash_file.cache_clear()
    assert file_fingerprint(str(path), "safe") == hashlib.sha256(data).digest()
    assert file_fingerprint(str(path), "safe") == hashlib.sha256(data).digest()
    info = keys._hash_file.cache_info()
    assert (info.hits, info.misses) == (1, 1)
    # a link to the same file shares the memo entry
    link = tmp_path / "link.gguf"
    link.symlink_to(path)
    assert file_fingerprint(str(link), "safe") == hashlib.sha256(data).digest()
    assert keys._hash_file.cache_info().hits == 2
    data2 = data + b"more"
    path.write_bytes(data2)
    assert file_fingerprint(str(path), "safe") == hashlib.sha256(data2).digest()


def test_file_fingerprint_gguf_chunked(tmp_path: Path) -> None:
    mib = 1024 * 1024
    data = bytearray(os.urandom(12 * mib + 5))
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    size = struct.pack("<Q", len(data))
    expected = hashlib.sha256(size + data[: 8 * mib] + data[-mib:]).digest()
    assert file_fingerprint(str(path), "gguf_chunked") == expected
    assert expected != file_fingerprint(str(path), "safe")
    # a change in the unsampled middle keeps the fingerprint (documented); the head does not
    data[10 * mib] ^= 0xFF
    path.write_bytes(data)
    assert file_fingerprint(str(path), "gguf_chunked") == expected
    data[100] ^= 0xFF
    path.write_bytes(data)
    assert file_fingerprint(str(path), "gguf_chunked") != expected


def test_file_fingerprint_small_file_chunked(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF1234")
    expected = hashlib.sha256(struct.pack("<Q", 8) + b"GGUF1234" + b"GGUF1234").digest()
    assert file_fingerprint(str(path), "gguf_chunked") == expected


def test_file_fingerprint_modes(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"x")
    with pytest.raises(ValueError):
        file_fingerprint(str(path), "fast_unsafe")
    with pytest.raises(KvcError) as err:
        file_fingerprint(str(path), "sloppy")
    assert err.value.code == "unknown_fingerprint_mode"
    with pytest.raises(OSError):
        file_fingerprint(str(tmp_path / "missing.gguf"), "safe")


def test_key_filename() -> None:
    key = make_key(FP, 1, CTX, [1])
    assert keys.key_filename(key) == key.hex() + ".kvc"
    with pytest.raises(KvcError):
        keys.key_filename(b"short")
