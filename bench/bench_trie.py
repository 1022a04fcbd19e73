"""Benchmark of TokenTrie.longest_prefix: 10,000 rows, 32,768-token prompts.

Rows mimic what cache-meta holds for chat and agent traffic: a few long system prompts
(1k-8k tokens), conversations on top of them that grow by turns of 100-1500 tokens up to
32k tokens, and one saved row per turn (each row a prefix of its conversation's next row).

Run: ``.venv/bin/python bench/bench_trie.py [--rows 10000] [--queries 2000] [--seed 1]``.
Prints p50 / p99 / max per query kind; lower is better, nothing is asserted.
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from collections.abc import Iterable, Iterator

from erllama.cache.trie import TokenTrie

log = logging.getLogger("bench_trie")

PROMPT_TOKENS = 32_768
MAX_ROW_TOKENS = 32_768


def tokens(rng: random.Random, n: int) -> bytes:
    """``n`` random token ids below 2**17, packed u32le."""
    raw = bytearray(rng.randbytes(4 * n))
    raw[2::4] = bytes(b & 1 for b in raw[2::4])
    raw[3::4] = bytes(n)
    return bytes(raw)


def build_rows(rng: random.Random, n_rows: int) -> tuple[list[bytes], list[tuple[int, int]]]:
    """Conversations (packed) and rows as (conversation index, length in tokens)."""
    systems = [tokens(rng, rng.randrange(1000, 8000)) for _ in range(8)]
    rows: list[tuple[int, int]] = []
    conversations: list[bytes] = []
    while len(rows) < n_rows:
        parts = [rng.choice(systems)]
        n = len(parts[0]) // 4
        while n < MAX_ROW_TOKENS and len(rows) < n_rows:
            turn = min(rng.randrange(100, 1500), MAX_ROW_TOKENS - n)
            parts.append(tokens(rng, turn))
            n += turn
            rows.append((len(conversations), n))
        conversations.append(b"".join(parts))
    return conversations, rows


def percentile(sorted_ns: list[int], q: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1000.0


def report(name: str, samples_ns: list[int]) -> None:
    s = sorted(samples_ns)
    log.info(
        "%-34s n=%-5d p50=%8.1f us  p99=%8.1f us  max=%8.1f us",
        name,
        len(s),
        percentile(s, 0.50),
        percentile(s, 0.99),
        s[-1] / 1000.0,
    )


def time_queries(trie: TokenTrie, prompts: Iterable[bytes]) -> list[int]:
    out = []
    for prompt in prompts:
        assert len(prompt) == 4 * PROMPT_TOKENS
        t0 = time.perf_counter_ns()
        hit = trie.longest_prefix_packed(prompt)
        out.append(time.perf_counter_ns() - t0)
        assert hit is None or hit[0] > 0
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rng = random.Random(args.seed)

    conversations, rows = build_rows(rng, args.rows)
    trie = TokenTrie()
    t0 = time.perf_counter_ns()
    for i, (conv, n) in enumerate(rows):
        trie.insert_packed(conversations[conv][: 4 * n], i.to_bytes(32, "big"))
    insert_ns = time.perf_counter_ns() - t0
    log.info(
        "rows=%d conversations=%d longest=%d tokens, %.0f M row tokens; insert %.1f us/row",
        len(trie),
        len(conversations),
        max(n for _, n in rows),
        sum(n for _, n in rows) / 1e6,
        insert_ns / 1e3 / len(rows),
    )

    def prompts(kind: str, count: int) -> Iterator[bytes]:
        for _ in range(count):
            conv, n = rng.choice(rows)
            if kind == "hit":  # a saved row plus a new turn
                base = conversations[conv][: 4 * n]
            elif kind == "edge":  # diverges part-way into a row
                base = conversations[conv][: 4 * rng.randrange(1, n)]
            else:
                base = b""
            base = base[: 4 * PROMPT_TOKENS]
            yield base + tokens(rng, PROMPT_TOKENS - len(base) // 4)

    time_queries(trie, prompts("hit", 100))  # warm-up
    report("hit: saved row + new turn", time_queries(trie, prompts("hit", args.queries)))
    report("diverges inside an edge", time_queries(trie, prompts("edge", args.queries)))
    report("miss: random prompt", time_queries(trie, prompts("miss", 200)))
    t_list = []
    for prompt in prompts("hit", 200):
        as_list = list(memoryview(prompt).cast("I"))
        t0 = time.perf_counter_ns()
        trie.longest_prefix(as_list)
        t_list.append(time.perf_counter_ns() - t0)
    report("hit via list[int] (packs first)", t_list)

    order = list(enumerate(rows))
    rng.shuffle(order)
    t0 = time.perf_counter_ns()
    for i, (conv, n) in order:
        trie.remove_packed(conversations[conv][: 4 * n], i.to_bytes(32, "big"))
    remove_ns = time.perf_counter_ns() - t0
    assert len(trie) == 0
    log.info("remove all in random order: %.1f us/row", remove_ns / 1e3 / len(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
