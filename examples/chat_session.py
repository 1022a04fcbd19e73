"""Multi-turn chat with ``parent_key``: each turn resumes from the previous turn's saved state.

Run the daemon first (``./scripts/serve``), then ``.venv/bin/python examples/chat_session.py``.
The finish key of one turn is the parent key of the next, so the daemon restores the
conversation so far and prefills only the new user message.
"""

from __future__ import annotations

import erllama

SYSTEM = (
    "<start_of_turn>user\nYou are a concise travel guide. Answer in one or two sentences. "
    + "Keep answers factual and friendly. " * 40
)
QUESTIONS = [
    "What is the best season to visit Lisbon?",
    "And what should I eat there?",
    "How do I get from the airport to the centre?",
]


def main() -> None:
    with erllama.Client() as client:
        context = SYSTEM
        parent_key: bytes | None = None
        for q in QUESTIONS:
            context += f"{q}<end_of_turn>\n<start_of_turn>model\n"
            opts = {"parent_key": parent_key} if parent_key else {}
            r = client.complete("default", context, response_tokens=40, **opts)
            print(f"Q: {q}\nA: {r.reply.strip()}")
            print(
                f"   [{r.cache_hit_kind}, read {r.cache_delta.read} tokens, "
                f"prefill {r.stats.prefill_ms:.0f} ms]\n"
            )
            context += r.reply + "<end_of_turn>\n<start_of_turn>user\n"
            parent_key = r.finish_key


if __name__ == "__main__":
    main()
