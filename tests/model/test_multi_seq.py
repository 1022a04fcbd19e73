"""``LlamaBackend`` with four sequences on the real Gemma 3 270M: the batch shapes of
``workers/numerics.py`` make a sequence's numbers independent of the others.

Every comparison is of raw logits bytes (bit-identical), so a single differing float
fails: a sequence decoded alone against the same sequence co-batched with others, a
prompt prefilled in one call against several, a one-sequence snapshot restored into
another sequence while a different one generates, and an exact hit from stored
logits. The prompts are longer than 512 tokens, where a lone one-row decode would take
flash attention's layout-dependent split-KV path.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from erllama.config import ContextOpts, ModelSpec
from erllama.workers.backend import DecodeItem, SamplerOptions
from erllama.workers.llama import LlamaBackend, LlamaSampler
from erllama.workers.numerics import PREFILL_MIN_ROWS

pytestmark = [pytest.mark.model, pytest.mark.timeout(300)]

N_SEQ = 4
N_GEN = 12
GREEDY = SamplerOptions()


@pytest.fixture(scope="module")
def mb(gguf_path: str) -> Iterator[LlamaBackend]:
    spec = ModelSpec(
        id="gemma4", context_opts=ContextOpts(n_ctx=2048, n_seq_max=N_SEQ, n_threads=2)
    )
    b = LlamaBackend(spec, gguf_path, fingerprint=bytes(range(32)), ctx_params_hash=bytes(32))
    try:
        yield b
    finally:
        b.close()


def prompt(b: LlamaBackend, topic: str, min_tokens: int) -> list[int]:
    parts: list[str] = []
    while True:
        parts.append(f"Note {len(parts) + 1} about {topic}: it changed on day {len(parts) * 7}.")
        toks = b.tokenize(" ".join(parts) + f"\nQuestion: what is {topic}? Answer:")
        if len(toks) >= min_tokens:
            return toks


def clear(b: LlamaBackend) -> None:
    for s in range(N_SEQ):
        b.seq_clear(s)


class Stream:
    """One sequence generating greedily; ``logits`` keeps every step's raw logits."""

    def __init__(self, b: LlamaBackend, seq: int, pos: int, first_logits: bytes) -> None:
        self.b, self.seq, self.pos = b, seq, pos
        self.sampler: LlamaSampler = b.new_sampler(seq, GREEDY)
        self.logits = [first_logits]
        self.tokens = [b.sample_from_logits(self.sampler, first_logits)]

    def item(self) -> DecodeItem:
        return DecodeItem(self.seq, self.tokens[-1], self.pos)

    def after(self, row: int) -> None:
        self.pos += 1
        self.logits.append(self.b.logits_snapshot(row))
        self.tokens.append(self.sampler.sample(row))


def run(b: LlamaBackend, streams: list[Stream], steps: int) -> None:
    try:
        for _ in range(steps):
            rows = b.decode_step([s.item() for s in streams])
            for s, row in zip(streams, rows, strict=True):
                s.after(row)
    finally:
        for s in streams:
            s.sampler.close()


def prefilled(b: LlamaBackend, seq: int, toks: list[int], start: int = 0) -> bytes:
    b.prefill(seq, toks[start:], start)
    return b.logits_snapshot()


def test_info_of_a_multi_sequence_context(mb: LlamaBackend) -> None:
    info = mb.info
    assert (info.n_seq_max, info.n_ctx) == (N_SEQ, 2048)  # every sequence has all of n_ctx
    assert info.prefill_tail_min == PREFILL_MIN_ROWS and info.reuse_align == 1
    assert not info.partial_restore_exact  # one-sequence snapshots of a sliding-window model


def test_a_sequence_computes_the_same_alone_and_co_batched(mb: LlamaBackend) -> None:
    a = prompt(mb, "the harbour", 600)
    others = [prompt(mb, "the orchard", 100), prompt(mb, "the old mill", 560)]
    clear(mb)
    alone = Stream(mb, 0, len(a), prefilled(mb, 0, a))
    run(mb, [alone], N_GEN)

    clear(mb)
    streams = [Stream(mb, 0, len(others[0]), prefilled(mb, 0, others[0]))]
    # the same prompt in another sequence, prefilled in uneven pieces between others' steps
    mb.prefill(2, a[:100], 0)
    run_one = Stream(mb, 1, len(others[1]), prefilled(mb, 1, others[1]))
    mb.prefill(2, a[100:137], 100)
    together = Stream(mb, 2, len(a), prefilled(mb, 2, a, 137))
    run(mb, [streams[0], run_one, together], N_GEN)

    assert together.logits == alone.logits
    assert together.tokens == alone.tokens
    assert len(set(alone.tokens)) > 1


def test_a_snapshot_restored_into_another_sequence_is_exact(mb: LlamaBackend) -> None:
    a = prompt(mb, "the lighthouse", 700)
    cut = 560  # a one-sequence row, continued by a tail of more than PREFILL_MIN_ROWS
    clear(mb)
    mb.prefill(0, a[:cut], 0)
    row = bytes(mb.state_snapshot(0))
    end_logits = prefilled(mb, 0, a, cut)
    full_row = bytes(mb.state_snapshot(0))
    cold = Stream(mb, 0, len(a), end_logits)
    run(mb, [cold], N_GEN)

    clear(mb)
    other = prompt(mb, "the bakery", 100)
    busy = Stream(mb, 1, len(other), prefilled(mb, 1, other))
    mb.state_restore(3, row)  # while sequence 1 is mid-generation
    warm = Stream(mb, 3, len(a), prefilled(mb, 3, a, cut))
    run(mb, [busy, warm], N_GEN)
    assert warm.logits == cold.logits and warm.tokens == cold.tokens

    # an exact hit: the whole prompt's row, sampled from the logits stored with it
    clear(mb)
    mb.state_restore(2, full_row)
    hit = Stream(mb, 2, len(a), end_logits)
    run(mb, [hit], N_GEN)
    assert hit.logits == cold.logits and hit.tokens == cold.tokens


def test_a_step_rejects_two_tokens_of_one_sequence(mb: LlamaBackend) -> None:
    clear(mb)
    mb.prefill(0, [2, 100, 200], 0)
    with pytest.raises(ValueError, match="one token per sequence"):
        mb.decode_step([DecodeItem(0, 5, 3), DecodeItem(0, 6, 4)])
    assert mb.decode_step([]) == []
