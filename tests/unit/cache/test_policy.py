"""The save policy formulas (REFERENCE §7.2) and the checkpoint ladder (D16, D17)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from erllama.cache.policy import (
    PolicyError,
    cold_save_split,
    continued_fires,
    continued_frontier,
    finish_fires,
    ladder_lengths,
    trim_count,
    validate_policy,
)
from erllama.config import PolicyConfig

DEFAULT = PolicyConfig()
OFF = PolicyConfig(saves_enabled=False)


@st.composite
def policies(draw: st.DrawFn) -> PolicyConfig:
    min_tokens = draw(st.integers(0, 4096))
    cold_min = draw(st.integers(min_tokens, min_tokens + 4096))
    cold_max = draw(st.integers(cold_min, cold_min + 40000))
    return PolicyConfig(
        min_tokens=min_tokens,
        cold_min_tokens=cold_min,
        cold_max_tokens=cold_max,
        continued_interval=draw(st.integers(1, 4096)),
        boundary_trim_tokens=draw(st.integers(0, 256)),
        boundary_align_tokens=draw(st.integers(1, 4096)),
    )


def test_trim_count() -> None:
    assert trim_count(5000, 32, 2048) == 4096
    assert trim_count(2080, 32, 2048) == 2048
    assert trim_count(2079, 32, 2048) is None
    assert trim_count(0, 0, 1) is None
    with pytest.raises(PolicyError):
        trim_count(100, 0, 0)


def test_reference_examples() -> None:
    assert cold_save_split(5000, DEFAULT) == 4096
    assert cold_save_split(2079, DEFAULT) is None
    assert cold_save_split(2080, DEFAULT) == 2048
    # D17: clamp instead of skipping: 30000 - 32 -> 28672
    assert cold_save_split(100_000, DEFAULT) == 28672
    assert cold_save_split(30_001, DEFAULT) == 28672
    assert cold_save_split(511, PolicyConfig(boundary_align_tokens=64)) is None  # below cold_min


def test_min_tokens_gates_the_cold_prefix() -> None:
    p = PolicyConfig(min_tokens=600, cold_min_tokens=600, boundary_align_tokens=512)
    assert cold_save_split(700, p) is None  # prefix 512 < min_tokens
    assert cold_save_split(1100, p) == 1024


def test_saves_disabled_fires_nothing() -> None:
    for n in (0, 600, 5000, 100_000):
        assert cold_save_split(n, OFF) is None
        assert ladder_lengths(n, OFF) == []
        assert not continued_fires(n, 0, OFF)
        assert continued_frontier(n, 0, OFF) is None
        assert not finish_fires(n, OFF)


def test_continued_and_finish() -> None:
    assert continued_fires(2048, 0, DEFAULT)
    assert not continued_fires(2047, 0, DEFAULT)
    assert not continued_fires(4000, 2000, DEFAULT)
    assert continued_fires(4048, 2000, DEFAULT)
    low_interval = PolicyConfig(continued_interval=10)
    assert not continued_fires(100, 0, low_interval)  # below min_tokens
    assert finish_fires(512, DEFAULT)
    assert not finish_fires(511, DEFAULT)
    assert not finish_fires(0, PolicyConfig(min_tokens=0, cold_min_tokens=0))


def test_continued_frontier_absolute() -> None:
    assert continued_frontier(2048, 0, DEFAULT) == 2048
    assert continued_frontier(2047, 0, DEFAULT) is None
    assert continued_frontier(2049, 0, DEFAULT) == 2048  # passed it inside a chunk
    assert continued_frontier(2049, 2048, DEFAULT) is None  # already saved there
    assert continued_frontier(4096, 3000, DEFAULT) == 4096  # absolute, not relative
    assert continued_frontier(5000, 4096, DEFAULT) is None
    p = PolicyConfig(continued_interval=256)
    assert continued_frontier(256, 0, p) is None  # below min_tokens
    assert continued_frontier(512, 0, p) == 512


def test_ladder_examples() -> None:
    assert ladder_lengths(5000, DEFAULT) == [2048, 4096]
    assert ladder_lengths(20_000, DEFAULT) == [12288, 14336, 16384, 18432]
    assert ladder_lengths(20_000, DEFAULT, max_rungs=1) == [18432]
    assert ladder_lengths(20_000, DEFAULT, max_rungs=0) == []
    assert ladder_lengths(100_000, DEFAULT)[-1] == 28672
    assert ladder_lengths(2000, DEFAULT) == []
    p = PolicyConfig(min_tokens=600, cold_min_tokens=600, boundary_align_tokens=256)
    assert ladder_lengths(2000, p, max_rungs=10) == [768, 1024, 1280, 1536, 1792]


@given(policies(), st.integers(0, 80_000))
def test_cold_split_properties(p: PolicyConfig, n: int) -> None:
    validate_policy(p)
    split = cold_save_split(n, p)
    if split is None:
        return
    assert split % p.boundary_align_tokens == 0
    assert max(p.min_tokens, 1) <= split <= n
    assert n >= p.cold_min_tokens
    assert split <= p.cold_max_tokens - p.boundary_trim_tokens
    assert split == trim_count(
        min(n, p.cold_max_tokens), p.boundary_trim_tokens, p.boundary_align_tokens
    )
    assert min(n, p.cold_max_tokens) - split < p.boundary_trim_tokens + p.boundary_align_tokens


@given(policies(), st.integers(0, 80_000), st.integers(1, 8))
def test_ladder_properties(p: PolicyConfig, n: int, rungs: int) -> None:
    ladder = ladder_lengths(n, p, rungs)
    split = cold_save_split(n, p)
    if split is None:
        assert ladder == []
        return
    assert ladder[-1] == split
    assert 1 <= len(ladder) <= rungs
    assert ladder == sorted(set(ladder))
    for length in ladder:
        assert length % p.boundary_align_tokens == 0
        assert max(p.min_tokens, 1) <= length <= n
    # the largest rungs: nothing aligned and eligible was left out between them
    assert all(b - a == p.boundary_align_tokens for a, b in itertools.pairwise(ladder))
    below = ladder[0] - p.boundary_align_tokens
    assert len(ladder) == rungs or below < max(p.min_tokens, 1)


@given(policies(), st.integers(0, 80_000), st.integers(0, 80_000))
def test_continued_frontier_properties(p: PolicyConfig, live: int, last: int) -> None:
    f = continued_frontier(live, last, p)
    if f is None:
        g = (live // p.continued_interval) * p.continued_interval
        assert g <= last or g < p.min_tokens or g == 0
        return
    assert f % p.continued_interval == 0
    assert last < f <= live < f + p.continued_interval
    assert f >= p.min_tokens


@pytest.mark.parametrize(
    ("over", "code"),
    [
        ({"min_tokens": -1}, "invalid"),
        ({"min_tokens": 600}, "ordering"),
        ({"cold_max_tokens": 100}, "ordering"),
        ({"continued_interval": 0}, "invalid"),
        ({"boundary_trim_tokens": -1}, "invalid"),
        ({"boundary_align_tokens": 0}, "invalid"),
    ],
)
def test_validate_policy(over: dict[str, int], code: str) -> None:
    validate_policy(DEFAULT)
    with pytest.raises(PolicyError) as err:
        validate_policy(PolicyConfig(**over))  # type: ignore[arg-type]
    assert err.value.code == code
