"""draft_tokens and verify on the real model, through the real daemon.

Two models load the same Gemma 3 270M GGUF: ``draft`` drafts, ``target``
verifies. Greedy decoding is deterministic, so a draft of ``draft`` is what
``target`` decodes greedily, and verify must accept all of it. Saves are off:
only the live KV of ``target`` is in play, which verify must leave usable
(D28: a request after verify gives what it gives without verify).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import erllama
from tests.support.daemon import Daemon, DaemonFactory, daemon_factory

pytestmark = [pytest.mark.model, pytest.mark.timeout(300)]
__all__ = ["daemon_factory"]

CTX = {"n_ctx": 1024, "n_batch": 512, "n_threads": 2, "n_threads_batch": 2}
K = 8
TEXT = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk. "
    "He trimmed the wick, polished the great lens and watched the ships pass "
    "between the rocks. One winter night a storm rolled in from the north, and "
    "the light was the only thing the sailors could see. In the morning the "
    "harbour was full of boats that had found their way home, and the keeper "
    "walked down to the village to buy bread and fresh coffee for the week ahead. "
    "The baker asked him about the storm, and he told her what he had seen from "
    "the top of the tower: waves as high as houses, and lightning over the sea."
)


@pytest.fixture
def spec_daemon(
    daemon_factory: DaemonFactory, gguf_path: str
) -> Iterator[tuple[Daemon, erllama.Client]]:
    def model(model_id: str) -> dict[str, object]:
        return {"id": model_id, "backend": "llama", "model_path": gguf_path,
                "context_opts": CTX, "policy": {"saves_enabled": False}}  # fmt: skip

    d = daemon_factory([model("draft"), model("target")], ready_timeout=300)
    with erllama.Client(d.endpoint, timeout=300) as c:
        yield d, c


def greedy(c: erllama.Client, model: str, tokens: list[int], n: int) -> tuple[list[int], str]:
    out: list[int] = []
    kind = ""
    for ev in c.infer(model, tokens, response_tokens=n):
        if ev.kind == "token":
            assert ev.token_id is not None
            out.append(ev.token_id)
        elif ev.kind == "done":
            assert ev.stats is not None
            kind = ev.stats.cache_hit_kind
    return out, kind


def test_draft_and_verify(spec_daemon: tuple[Daemon, erllama.Client]) -> None:
    _, c = spec_daemon
    prefix = c.tokenize("target", "The capital of France is Paris. The capital of Italy is")
    draft = c.draft_tokens("draft", prefix, K)
    assert len(draft) == K
    ref, _ = greedy(c, "target", prefix, K + 1)
    assert draft == ref[:K]  # the same weights decode the same tokens

    accepted, nxt = c.verify("target", prefix, draft, K)
    assert accepted == K
    assert nxt == ref[K]
    assert c.verify("target", prefix, draft, 3) == (3, ref[3])

    for j in (0, 2, K - 1):
        other = c.tokenize("target", " banana")[-1]
        bad = list(draft)
        bad[j] = other if other != draft[j] else other + 1
        assert c.verify("target", prefix, bad, K) == (j, draft[j])

    with pytest.raises(erllama.InvalidRequestError) as ei:
        c.verify("target", prefix, draft, 0)
    assert ei.value.code == "badarg"
    with pytest.raises(erllama.InvalidRequestError) as ei:
        c.verify("target", [], draft, K)
    assert ei.value.code == "empty_prefix"
    with pytest.raises(erllama.InvalidRequestError) as ei:
        c.draft_tokens("draft", [], K)
    assert ei.value.code == "empty_prefix"


def test_requests_after_verify_are_unchanged(spec_daemon: tuple[Daemon, erllama.Client]) -> None:
    _, c = spec_daemon
    prompt = c.tokenize("target", TEXT + " " + TEXT)[
        :160
    ]  # a multiple of 32: verify keeps all of it below
    assert len(prompt) == 160
    first, kind = greedy(c, "target", prompt, 12)
    assert kind == "cold"

    # a verify that shares the prompt: it reuses the live KV and leaves the prompt's cells
    acc, _ = c.verify("target", prompt + first[:4], first[4:10], 6)
    assert acc == 6
    again, kind = greedy(c, "target", prompt, 12)
    assert (again, kind) == (first, "exact")

    # an unrelated verify: the live KV is cleared; the request runs cold, as the first did
    other = c.tokenize("target", "Bananas are yellow and")
    c.verify("target", other, c.draft_tokens("draft", other, 4), 4)
    again, kind = greedy(c, "target", prompt, 12)
    assert (again, kind) == (first, "cold")
