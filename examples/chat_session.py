"""Multi-turn chat through the model's chat template, each turn resuming with ``parent_key``.

Run the daemon first (``./scripts/serve``), then ``.venv/bin/python examples/chat_session.py``.
Each turn renders the whole conversation with ``apply_chat_template`` (the bundled Gemma 3
270M uses the built-in ``gemma3`` template; its turn markers are single special tokens)
and generates from those tokens. The finish key of one turn is the parent key of the
next, so the daemon restores the conversation so far and prefills only the new part.
"""

from __future__ import annotations

import erllama

SYSTEM = "You are a concise travel guide. Answer in one or two sentences. " + (
    "Keep answers factual and friendly. " * 40
)
QUESTIONS = [
    "What is the best season to visit Lisbon?",
    "And what should I eat there?",
    "How do I get from the airport to the centre?",
]


def main() -> None:
    with erllama.Client() as client:
        history: list[dict[str, str]] = []
        parent_key: bytes | None = None
        for q in QUESTIONS:
            history.append({"role": "user", "content": q})
            tokens = client.apply_chat_template("default", {"messages": history, "system": SYSTEM})
            opts = {"parent_key": parent_key} if parent_key else {}
            reply: list[str] = []
            stats = None
            for ev in client.infer("default", tokens, response_tokens=40, **opts):
                if ev.kind == "token":
                    reply.append(ev.text)
                elif ev.kind == "done":
                    stats = ev.stats
            assert stats is not None
            answer = "".join(reply).strip()
            print(f"Q: {q}\nA: {answer}")
            print(
                f"   [{stats.cache_hit_kind}, read {stats.cache_delta.read} tokens, "
                f"prefill {stats.prefill_ms:.0f} ms]\n"
            )
            history.append({"role": "assistant", "content": answer})
            parent_key = stats.finish_key


if __name__ == "__main__":
    main()
