"""Quick start: load nothing, complete twice, see the warm hit and its timing.

Run the daemon first (``./scripts/serve``), then ``.venv/bin/python examples/quickstart.py``.
"""

from __future__ import annotations

import time

import erllama

SYSTEM = (
    "You are a meticulous assistant for a public library. You answer questions about "
    "opening hours, membership, borrowing rules, inter-library loans, digital lending, "
    "study rooms, printing, children's programmes and accessibility. "
) * 12


def main() -> None:
    with erllama.Client() as client:
        prompt = SYSTEM + "\nQuestion: how many books can I borrow at once?\nAnswer:"
        for attempt in ("first (cold)", "second (warm)"):
            t0 = time.perf_counter()
            r = client.complete("default", prompt, response_tokens=24)
            dt = time.perf_counter() - t0
            print(
                f"{attempt}: {dt * 1000:.0f} ms total, prefill {r.stats.prefill_ms:.0f} ms, "
                f"cache_hit_kind={r.cache_hit_kind}, prompt={r.stats.prompt_tokens} tokens"
            )
            print("  ->", r.reply.strip().replace("\n", " ")[:100])
        print("last_cache_hit:", client.last_cache_hit("default"))
        print("counters:", {k: v for k, v in client.counters().items() if v})


if __name__ == "__main__":
    main()
