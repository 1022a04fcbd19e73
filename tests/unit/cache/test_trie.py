"""The token radix trie against a brute-force oracle."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from erllama.cache.keys import KvcError
from erllama.cache.trie import TokenTrie, _Node


def common(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def oracle(rows: set[tuple[tuple[int, ...], bytes]], prompt: list[int]) -> tuple[int, bytes] | None:
    if not rows:
        return None
    best = max(common(t, prompt) for t, _ in rows)
    if best == 0:
        return None
    _length, key = min((len(t), k) for t, k in rows if common(t, prompt) == best)
    return best, key


def check_invariants(trie: TokenTrie) -> None:
    def walk(node: _Node, depth: int, is_root: bool) -> tuple[int, bytes] | None:
        assert node.depth == depth
        if not is_root:
            assert node.label and len(node.label) % 4 == 0
            assert node.keys or len(node.children) >= 2, "unpruned or unmerged node"
        cands = [(depth, k) for k in node.keys]
        for first, child in node.children.items():
            assert child.label[:4] == first
            sub = walk(child, depth + len(child.label) // 4, False)
            assert sub is not None
            cands.append(sub)
        best = min(cands) if cands else None
        assert node.best == best
        return best

    walk(trie._root, 0, True)


tokens_st = st.lists(st.integers(0, 3), min_size=1, max_size=12)
ops_st = st.lists(
    st.one_of(
        st.tuples(st.just("ins"), tokens_st, st.integers(0, 4)),
        st.tuples(st.just("rm"), tokens_st, st.integers(0, 4)),
        st.tuples(st.just("rm_existing"), st.integers(0, 10**6), st.just(0)),
        st.tuples(st.just("q"), st.lists(st.integers(0, 3), max_size=14), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=400)
@given(ops_st)
def test_against_oracle(ops: list[tuple[str, object, int]]) -> None:
    trie = TokenTrie()
    rows: set[tuple[tuple[int, ...], bytes]] = set()
    for op, arg, k in ops:
        key = bytes([k]) * 32
        if op == "ins":
            assert isinstance(arg, list)
            trie.insert(arg, key)
            rows.add((tuple(arg), key))
        elif op == "rm":
            assert isinstance(arg, list)
            assert trie.remove(arg, key) == ((tuple(arg), key) in rows)
            rows.discard((tuple(arg), key))
        elif op == "rm_existing":
            if rows:
                assert isinstance(arg, int)
                tokens, key = sorted(rows)[arg % len(rows)]
                assert trie.remove(list(tokens), key)
                rows.discard((tokens, key))
        else:
            assert isinstance(arg, list)
            got = trie.longest_prefix(arg)
            assert got == oracle(rows, arg)
        assert len(trie) == len(rows)
        check_invariants(trie)
    assert {(tuple(struct.unpack(f"<{len(t) // 4}I", t)), k) for t, k in trie.items()} == rows
    # every stored row finds itself (or an equally long, shorter-or-equal row)
    for tokens, _ in rows:
        found = trie.longest_prefix(list(tokens))
        assert found is not None and found[0] == len(tokens)


def test_examples() -> None:
    trie = TokenTrie()
    assert trie.longest_prefix([1, 2]) is None
    a, b, c = b"a" * 32, b"b" * 32, b"c" * 32
    trie.insert([1, 2, 3, 4, 5], a)
    trie.insert([1, 2, 3], b)
    trie.insert([1, 2, 9, 9], c)
    assert trie.longest_prefix([1, 2, 3, 4, 5, 6]) == (5, a)
    assert trie.longest_prefix([1, 2, 3, 7]) == (3, b)  # b ends right there
    assert trie.longest_prefix([1, 2, 3, 4, 7]) == (4, a)  # a is longer: caller truncates
    assert trie.longest_prefix([1, 2]) == (2, b)  # shortest of the subtree
    assert trie.longest_prefix([1, 2, 9]) == (3, c)
    assert trie.longest_prefix([7]) is None
    assert trie.longest_prefix([]) is None
    assert trie.remove([1, 2, 3], b)
    assert not trie.remove([1, 2, 3], b)
    assert trie.longest_prefix([1, 2]) == (2, c)  # c (4 tokens) is now the shortest
    assert trie.longest_prefix([1, 2, 3, 7]) == (3, a)
    assert len(trie) == 2


def test_duplicates_are_graceful() -> None:
    trie = TokenTrie()
    trie.insert([1, 2], b"x" * 32)
    trie.insert([1, 2], b"x" * 32)
    trie.insert([1, 2], b"y" * 32)
    assert len(trie) == 2
    assert trie.longest_prefix([1, 2, 3]) == (2, b"x" * 32)
    assert trie.remove([1, 2], b"x" * 32)
    assert trie.longest_prefix([1, 2, 3]) == (2, b"y" * 32)


@pytest.mark.parametrize("bad", [[], [-1], [2**32], b"\x01\x00\x00\x00"])
def test_bad_rows_refused(bad: list[int]) -> None:
    with pytest.raises(KvcError) as err:
        TokenTrie().insert(bad, b"k" * 32)
    assert err.value.code == "bad_argument"


def test_ragged_packed_refused() -> None:
    with pytest.raises(KvcError):
        TokenTrie().longest_prefix_packed(b"\x01\x02")


def test_long_rows_against_oracle() -> None:
    rng = random.Random(7)
    systems = [[rng.randrange(50_000) for _ in range(6000)] for _ in range(3)]
    trie = TokenTrie()
    rows: list[tuple[list[int], bytes]] = []
    for i in range(60):
        sys_prompt = systems[i % 3]
        cut = rng.randrange(1, len(sys_prompt))
        tokens = sys_prompt[:cut] + [rng.randrange(4) for _ in range(rng.randrange(0, 200))]
        key = i.to_bytes(32, "big")
        trie.insert(tokens, key)
        rows.append((tokens, key))
    row_set = {(tuple(t), k) for t, k in rows}
    for _ in range(30):
        base = rng.choice(rows)[0]
        prompt = base[: rng.randrange(1, len(base) + 1)] + [rng.randrange(4) for _ in range(300)]
        assert trie.longest_prefix(prompt) == oracle(row_set, prompt)
    for tokens, key in rows[::2]:
        assert trie.remove(tokens, key)
        row_set.discard((tuple(tokens), key))
    check_invariants(trie)
    for _ in range(30):
        base = rng.choice(rows)[0]
        prompt = [*base[: rng.randrange(1, len(base) + 1)], 9]
        assert trie.longest_prefix(prompt) == oracle(row_set, prompt)


def test_packed_inputs_accept_any_buffer() -> None:
    trie = TokenTrie()
    row = struct.pack("<3I", 1, 2, 3)
    trie.insert_packed(bytearray(row), b"k" * 32)
    assert trie.longest_prefix_packed(memoryview(row + row)) == (3, b"k" * 32)
    assert trie.longest_prefix([1, 2, 3, 1]) == (3, b"k" * 32)
    assert trie.remove_packed(memoryview(row), b"k" * 32)
    assert len(trie) == 0
