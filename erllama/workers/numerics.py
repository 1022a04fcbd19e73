"""The batch shapes that keep a sequence's numbers independent of everything else.

Pure, no llama.cpp: the llama backend (``workers/llama.py``) plans its batches
with these when it serves several sequences (``n_seq_max > 1``), and the tests
check the plans. What the rules rest on was measured with the vendored ggml
CPU kernels (``bench/probe_exactness.py``, docs/ARCHITECTURE.md "Measured for
the multi-sequence engine"):

* flash attention over one stream is layout-independent only in its one-chunk
  kernel: 2..63 query rows of a stream in a ubatch (one row with 512 cells or
  more takes the split-KV path, 64 rows or more the tiled one);
* with weight repacking off, a row's matmuls do not depend on the other rows of
  the batch once the batch has 16 rows or more, and small batches (2 rows, as a
  decode step has) form a class of their own.

So a multi-sequence context prefills in chunks of ``PREFILL_MIN_ROWS ..
PREFILL_MAX_ROWS`` rows of one sequence, and decodes each generating sequence
as two rows: the sampled token at ``pos`` (with logits) and a throwaway copy at
``pos + 1`` that is removed after the step. Every prefill row then computes the
same numbers however the prompt was split, and every decode row the same
numbers whichever other sequences share the step.
"""

from __future__ import annotations

PREFILL_MIN_ROWS = 16
PREFILL_MAX_ROWS = 63


def prefill_chunks(n: int) -> list[int]:
    """Chunk lengths for a prefill of ``n`` tokens, each in ``16..63`` when ``n >= 16``.

    As few chunks as the maximum allows, their lengths as equal as possible (the
    first ones one longer). Below 16 tokens there is one chunk of ``n``.
    """
    if n <= 0:
        return []
    k = -(-n // PREFILL_MAX_ROWS)
    base, extra = divmod(n, k)
    return [base + 1] * extra + [base] * (k - extra)


def warm_start(common: int, n: int, *, have_logits: bool, restored_len: int | None) -> int:
    """Where the prefill of an ``n``-token prompt starts when ``common`` tokens are reused.

    ``have_logits``: the logits after exactly the prompt are stored (an exact hit
    samples at once, returns ``n``). Otherwise at least ``PREFILL_MIN_ROWS``
    tokens are re-prefilled, so the prompt's last rows are computed in the class
    a cold run computed them in. ``restored_len``: the length of a restored
    one-sequence snapshot (it holds only the sliding window's cells, so it may
    not be truncated): the start must then be exactly that length, else 0 (cold).
    """
    if common >= n and have_logits:
        return n
    start = min(common, n - PREFILL_MIN_ROWS)
    if start <= 0:
        return 0
    if restored_len is not None and start != restored_len:
        return 0
    return start
