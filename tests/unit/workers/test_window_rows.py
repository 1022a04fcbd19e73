"""Cache resolution when rows hold only the sliding window (several sequences, SWA model).

The stub reports what the llama backend reports for Gemma 3 with ``n_seq_max > 1``:
``partial_restore_exact`` off and ``prefill_tail_min`` 16. A row then serves only a
prompt it is a prefix of, ending at least 16 tokens before the prompt does (or the
exact prompt, with its stored logits); it is never truncated, live or restored.
"""

from __future__ import annotations

import msgspec
import pytest

from erllama.protocol.tokens import unpack_tokens
from tests.unit.workers.fakes import FakeCache, Harness
from tests.unit.workers.test_engine import P48, reference

pytestmark = pytest.mark.timeout(60)


def window_harness(cache: FakeCache) -> Harness:
    h = Harness(cache)
    h.backend.info = msgspec.structs.replace(
        h.backend.info, prefill_tail_min=16, partial_restore_exact=False
    )
    return h


def prefilled(h: Harness) -> int:
    return h.backend._prefilled


def test_a_prefix_row_serves_a_prompt_that_extends_it_by_the_tail() -> None:
    cache = FakeCache()
    h1 = window_harness(cache)
    h1.complete("r1", P48)
    h1.run()
    other = "Q" * 39 + "a different tail here"  # 40 shared tokens: rows 16 and 32 fit
    gen, _ = reference(other)
    h2 = window_harness(cache)
    h2.complete("r2", other)
    h2.run()
    r = h2.result("r2")
    assert r.cache_hit_kind == "partial" and r.cache_delta.read == 32  # never the 48/56 rows
    assert unpack_tokens(r.generated) == gen
    assert prefilled(h2) == r.committed_tokens - len(gen) - 32  # only the prompt past the row


def test_a_row_too_close_to_the_prompt_end_is_not_used() -> None:
    cache = FakeCache()
    h1 = window_harness(cache)
    h1.complete("r1", "Q" * 63)  # rows of 16, 32, 48 and 64 tokens
    h1.run()
    h2 = window_harness(cache)
    h2.complete("r2", "Q" * 63 + "abc")  # 67 tokens: the 64 row would leave a tail of 3
    h2.run()
    r = h2.result("r2")
    assert r.cache_delta.read == 48  # the 48-token row leaves 19 to prefill
    assert unpack_tokens(r.generated) == reference("Q" * 63 + "abc")[0]


def test_an_exact_hit_without_logits_re_prefills_the_tail() -> None:
    cache = FakeCache()
    h1 = window_harness(cache)
    h1.complete("r1", P48)
    h1.run()
    h1.complete("r2", P48)  # live: the same prompt again
    before = prefilled(h1)
    h1.run()
    r = h1.result("r2")
    assert r.cache_hit_kind == "exact"
    assert prefilled(h1) - before in (0, 16)  # stored logits, or a tail of 16
    assert r.generated == h1.result("r1").generated


def test_live_cells_of_a_restored_row_are_not_truncated() -> None:
    cache = FakeCache()
    h1 = window_harness(cache)
    h1.complete("r1", P48)
    h1.run()
    h2 = window_harness(cache)
    long = "Q" * 47 + "and then a long continuation"
    h2.complete("r2", long)  # restores the 48 row (a prefix): floor 48
    h2.run()
    assert h2.result("r2").cache_delta.read == 48
    assert h2.engine.kv.floor == 48
    short = "Q" * 39 + "a different tail here"  # shares 40 < 48 live tokens
    h2.complete("r3", short)
    h2.run()
    r = h2.result("r3")
    assert r.cache_delta.read in (0, 16, 32)  # a prefix row or cold, never live-truncated
    assert unpack_tokens(r.generated) == reference(short)[0]
