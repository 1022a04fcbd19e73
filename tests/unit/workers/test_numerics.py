"""The batch plans of ``workers/numerics.py``."""

from __future__ import annotations

import pytest

from erllama.workers.numerics import (
    PREFILL_MAX_ROWS,
    PREFILL_MIN_ROWS,
    prefill_chunks,
    warm_start,
)


@pytest.mark.parametrize("n", [*range(0, 300), 1000, 4095, 4096])
def test_prefill_chunks_cover_the_prompt_in_allowed_sizes(n: int) -> None:
    chunks = prefill_chunks(n)
    assert sum(chunks) == n
    if n >= PREFILL_MIN_ROWS:
        assert all(PREFILL_MIN_ROWS <= c <= PREFILL_MAX_ROWS for c in chunks)
        assert len(chunks) == -(-n // PREFILL_MAX_ROWS)
    else:
        assert chunks == ([n] if n else [])


def test_warm_start_keeps_a_tail_of_at_least_the_minimum() -> None:
    assert warm_start(300, 300, have_logits=True, restored_len=None) == 300
    assert warm_start(300, 300, have_logits=False, restored_len=None) == 300 - PREFILL_MIN_ROWS
    assert warm_start(290, 300, have_logits=False, restored_len=None) == 300 - PREFILL_MIN_ROWS
    assert warm_start(200, 300, have_logits=False, restored_len=None) == 200
    assert warm_start(10, 20, have_logits=False, restored_len=None) == 4
    assert warm_start(10, 12, have_logits=False, restored_len=None) == 0  # too short: cold


def test_warm_start_never_truncates_a_restored_window_row() -> None:
    assert warm_start(200, 300, have_logits=False, restored_len=200) == 200
    assert warm_start(300, 300, have_logits=True, restored_len=300) == 300
    assert warm_start(300, 300, have_logits=False, restored_len=300) == 0
    assert warm_start(295, 300, have_logits=False, restored_len=295) == 0
