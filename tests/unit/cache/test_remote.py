"""The remote tier's pure parts: row codec, chunks, verification, probe plan, queue, breaker."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given

from erllama.cache.remote import (
    Breaker,
    Manifest,
    RemoteRowError,
    Upload,
    UploadQueue,
    chunk_key,
    decode_manifest,
    decode_pointer,
    encode_manifest,
    encode_pointer,
    lookup_plan,
    manifest_key,
    n_chunks_for,
    pointer_key,
    pointer_lengths,
    probe_plan,
    split_row,
    verify_chunks,
)

GEN = bytes(range(8))


# ================================================================ codec
@given(st.binary(min_size=1, max_size=5000), st.integers(1, 700))
def test_split_and_assemble_round_trip(blob: bytes, chunk: int) -> None:
    m, parts = split_row(blob, chunk, GEN)
    assert m.n_chunks == n_chunks_for(len(blob), chunk) == len(parts)
    assert all(len(p) == m.chunk_len(i) for i, p in enumerate(parts))
    assert decode_manifest(encode_manifest(m)) == m
    assert b"".join(verify_chunks(m, [bytes(p) for p in parts])) == blob


def test_chunks_are_views_not_copies() -> None:
    blob = bytearray(b"x" * 100)
    _, parts = split_row(blob, 30, GEN)
    blob[0] = ord("y")
    assert bytes(parts[0][:1]) == b"y"
    assert [len(p) for p in parts] == [30, 30, 30, 10]


def test_keys_carry_prefix_key_and_generation() -> None:
    key = bytes(32)
    assert manifest_key("p:", key) == "p:m:" + "00" * 32
    assert chunk_key("p:", key, GEN, 3) == f"p:c:{'00' * 32}:{GEN.hex()}:3"


def _parts(blob: bytes, chunk: int) -> tuple[Manifest, list[bytes | None]]:
    m, parts = split_row(blob, chunk, GEN)
    return m, [bytes(p) for p in parts]


def test_a_corrupted_chunk_is_a_crc_mismatch() -> None:
    m, parts = _parts(b"abcdefghij" * 10, 16)
    bad = bytearray(parts[2] or b"")
    bad[0] ^= 1
    parts[2] = bytes(bad)
    with pytest.raises(RemoteRowError) as exc:
        verify_chunks(m, parts)
    assert exc.value.code == "crc_mismatch"


def test_a_truncated_chunk_is_refused() -> None:
    m, parts = _parts(b"abcdefghij" * 10, 16)
    parts[1] = (parts[1] or b"")[:-1]
    with pytest.raises(RemoteRowError) as exc:
        verify_chunks(m, parts)
    assert exc.value.code == "truncated"
    m, parts = _parts(b"abcdefghij" * 10, 16)
    parts[-1] = (parts[-1] or b"") + b"!"
    with pytest.raises(RemoteRowError, match="truncated"):
        verify_chunks(m, parts)


def test_a_missing_chunk_is_a_miss_code() -> None:
    m, parts = _parts(b"abcdefghij" * 10, 16)
    parts[0] = None
    with pytest.raises(RemoteRowError) as exc:
        verify_chunks(m, parts)
    assert exc.value.code == "missing_chunk"
    with pytest.raises(RemoteRowError, match="missing_chunk"):
        verify_chunks(m, parts[:-1])


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"ERLR",
        b"XXXX" + encode_manifest(Manifest(10, 4, GEN, (1, 2, 3)))[4:],
        encode_manifest(Manifest(10, 4, GEN, (1, 2, 3)))[:-1],
        encode_manifest(Manifest(10, 4, GEN, (1, 2))),  # chunk count does not fit the size
        encode_manifest(Manifest(10, 4, GEN, (1, 2, 3))) + b"\0\0\0\0",
    ],
)
def test_bad_manifests_are_refused(raw: bytes) -> None:
    with pytest.raises(RemoteRowError) as exc:
        decode_manifest(raw)
    assert exc.value.code == "bad_manifest"


def test_split_refuses_empty_rows_and_bad_arguments() -> None:
    with pytest.raises(ValueError):
        split_row(b"", 10, GEN)
    with pytest.raises(ValueError):
        split_row(b"abc", 0, GEN)
    with pytest.raises(ValueError):
        split_row(b"abc", 10, b"short")


# ================================================================ probe plan
def test_probe_plan_is_the_prompt_then_aligned_prefixes_longest_first() -> None:
    assert probe_plan(1000, 0, 32, [256], 16) == [1000, 768, 512, 256]
    assert probe_plan(1024, 0, 32, [256, 512], 16) == [1024, 768, 512, 256]


def test_probe_plan_only_asks_for_rows_that_beat_the_local_index() -> None:
    assert probe_plan(1000, 512, 32, [256], 16) == [1000, 768]
    assert probe_plan(1000, 1000, 32, [256], 16) == []
    assert probe_plan(1000, 0, 600, [256], 16) == [1000, 768]


def test_probe_plan_caps_the_keys_and_ignores_bad_aligns() -> None:
    assert probe_plan(4096, 0, 1, [64], 4) == [4096, 4032, 3968, 3904]
    assert probe_plan(100, 0, 1, [0, -5], 8) == [100]
    assert probe_plan(100, 0, 1, [256], 0) == []
    assert probe_plan(0, 0, 1, [256], 8) == []


@given(st.integers(0, 10_000), st.integers(0, 10_000), st.integers(0, 2000),
       st.lists(st.integers(-10, 3000), max_size=3), st.integers(0, 40))  # fmt: skip
def test_probe_plan_properties(
    n: int, local: int, min_len: int, aligns: list[int], cap: int
) -> None:
    plan = probe_plan(n, local, min_len, aligns, cap)
    assert len(plan) <= cap
    assert plan == sorted(set(plan), reverse=True)
    assert all(max(local + 1, min_len, 1) <= x <= n for x in plan)
    if plan:
        assert plan[0] == n
    assert all(x == n or any(a > 0 and x % a == 0 for a in aligns) for x in plan)


# ================================================================ prefix pointers
def test_a_row_gets_pointers_at_its_aligned_prefixes_longest_first_capped() -> None:
    assert pointer_lengths(1000) == [768, 512, 256]
    assert pointer_lengths(512) == [512, 256]  # its own length too: a longer prompt asks there
    assert pointer_lengths(255) == []
    assert pointer_lengths(100_000) == list(range(99_840, 99_840 - 32 * 256, -256))
    assert pointer_lengths(1000, floor=513) == [768]
    assert pointer_lengths(1000, align=0) == [] and pointer_lengths(1000, max_keys=0) == []


def test_pointer_codec_round_trips_and_refuses_garbage() -> None:
    key = bytes(range(32))
    assert decode_pointer(encode_pointer(key, 2345)) == (key, 2345)
    assert pointer_key("p:", key) == "p:p:" + key.hex()
    for raw in (b"", encode_pointer(key, 1)[:-1], encode_pointer(key, 0)):
        with pytest.raises(RemoteRowError) as exc:
            decode_pointer(raw)
        assert exc.value.code == "bad_pointer"


def test_lookup_plan_merges_pointers_with_the_exact_keys_best_first() -> None:
    # a 3000-token prompt: its own row, the 2048 save alignment, pointers every 256
    plan = lookup_plan(3000, 0, 1, [2048], 16, max_pointers=4)
    assert plan == [(3000, False), (2816, True), (2560, True), (2304, True),
                    (2048, True), (2048, False)]  # fmt: skip
    # only what beats the local index: the floor applies to the pointers too
    assert lookup_plan(3000, 2560, 1, [2048], 16) == [(3000, False), (2816, True)]
    assert lookup_plan(3000, 3000, 1, [2048], 16) == []
    assert lookup_plan(300, 0, 1, [2048], 16) == [(300, False), (256, True)]


@given(st.integers(0, 20_000), st.integers(0, 20_000), st.integers(0, 2000),
       st.integers(0, 40), st.integers(0, 40))  # fmt: skip
def test_lookup_plan_properties(n: int, local: int, min_len: int, cap: int, ptrs: int) -> None:
    plan = lookup_plan(n, local, min_len, [2048], cap, max_pointers=ptrs)
    exact = [x for x, pointer in plan if not pointer]
    assert exact == probe_plan(n, local, min_len, [2048], cap)
    pointers = [x for x, pointer in plan if pointer]
    assert len(pointers) <= ptrs and all(x % 256 == 0 for x in pointers)
    assert all(max(local + 1, min_len, 1) <= x <= n for x, _ in plan)
    assert plan == sorted(plan, reverse=True)  # by length, a pointer first on a tie


# ================================================================ write-behind queue
def _job(i: int, size: int = 10) -> Upload:
    return Upload(key=bytes([i]) * 32, path=f"/r/{i}", size=size)


def test_queue_drops_the_oldest_past_its_row_bound() -> None:
    q = UploadQueue(max_rows=2, max_bytes=1000)
    assert q.push(_job(1)) == 0 and q.push(_job(2)) == 0
    assert q.push(_job(3)) == 1
    assert [q.pop(), q.pop(), q.pop()] == [_job(2), _job(3), None]
    assert q.bytes == 0


def test_queue_drops_the_oldest_past_its_byte_bound() -> None:
    q = UploadQueue(max_rows=10, max_bytes=100)
    q.push(_job(1, 40))
    q.push(_job(2, 40))
    assert q.push(_job(3, 50)) == 1
    assert len(q) == 2 and q.bytes == 90
    assert q.pop() == _job(2, 40)


def test_queue_refuses_a_row_bigger_than_its_bound_and_dedupes() -> None:
    q = UploadQueue(max_rows=10, max_bytes=100)
    q.push(_job(1, 40))
    assert q.push(_job(2, 101)) == 1 and len(q) == 1
    assert q.push(_job(1, 40)) == 0 and len(q) == 1


def test_queue_retry_goes_back_to_the_head_when_it_fits() -> None:
    q = UploadQueue(max_rows=2, max_bytes=100)
    q.push(_job(1))
    q.push_front(_job(9))
    assert q.pop() == _job(9)
    q.push(_job(2))
    q.push_front(_job(8))  # full: not put back
    assert len(q) == 2 and _job(8) not in [q.pop(), q.pop()]


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 60)), max_size=60))
def test_queue_bounds_always_hold(ops: list[tuple[int, int]]) -> None:
    q = UploadQueue(max_rows=5, max_bytes=100)
    for i, size in ops:
        if size == 0:
            q.pop()
        else:
            q.push(_job(i, size))
        assert len(q) <= 5 and q.bytes <= 100


# ================================================================ breaker
def test_breaker_backs_off_doubling_and_resets() -> None:
    b = Breaker(min_s=1.0, max_s=4.0)
    assert b.allow(0.0)
    assert b.failed(10.0) is True  # up -> down: log it once
    assert not b.allow(10.5) and b.allow(11.0)
    assert b.failed(11.0) is False and b.retry_at == 13.0
    b.failed(13.0)
    b.failed(17.0)
    assert b.retry_at == 21.0  # capped at max_s
    assert b.ok() is True and b.allow(17.1)
    assert b.ok() is False
    b.failed(30.0)
    assert b.retry_at == 31.0
