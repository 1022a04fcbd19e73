"""Stateless chat: the client re-sends the WHOLE conversation every turn, with no keys.

This is how OpenAI-style clients behave. The daemon still hits its cache: the longest
common prefix of the new prompt with a saved row (or with the worker's live KV) is reused,
and only the new tail is prefilled. Two interleaved sessions show that the cache, not just
the live KV, is doing the work. Run the daemon first (``./scripts/serve``).
"""

from __future__ import annotations

import erllama

SYSTEM = "You are a helpful assistant who answers briefly. " * 50


def main() -> None:
    sessions = {
        "alice": ["Name three primary colours.", "Which one is the warmest?"],
        "bob": ["What is a haiku?", "Write one about rain."],
    }
    history = {name: SYSTEM for name in sessions}
    with erllama.Client() as client:
        for turn in range(2):
            for name, questions in sessions.items():
                history[name] += f"\nUser ({name}): {questions[turn]}\nAssistant:"
                r = client.complete("default", history[name], response_tokens=32)
                history[name] += r.reply
                print(
                    f"{name} turn {turn}: {r.cache_hit_kind:7s} reused {r.cache_delta.read:5d} "
                    f"of {r.stats.prompt_tokens:5d} prompt tokens, prefill "
                    f"{r.stats.prefill_ms:6.0f} ms | {r.reply.strip()[:60]!r}"
                )


if __name__ == "__main__":
    main()
