"""Chat on the bundled model, out of the box: its template, its special tokens, a warm turn.

The bundled Gemma 3 270M GGUF carries no chat template; it is loaded here as a user gets
it (no ``model_path``, no ``chat_template``), so it renders with the built-in ``gemma3``
template (erllama/chat_templates.py). ``ref`` is the same model with another fingerprint
and no saves: its answers are cold runs, the reference of the warm second turn.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import erllama
from tests.support.daemon import Daemon, DaemonFactory, daemon_factory

pytestmark = [pytest.mark.model, pytest.mark.timeout(600)]
__all__ = ["daemon_factory"]

CTX = {"n_ctx": 4096, "n_batch": 512, "n_threads": 2, "n_threads_batch": 2}
POLICY = {"min_tokens": 256, "cold_min_tokens": 256, "boundary_align_tokens": 256}
SYSTEM = "You are a terse assistant for a harbour office. Facts you know: " + " ".join(
    f"Berth {i} holds the ship number {i * 7 % 50}." for i in range(40)
)
N_GEN = 24


@pytest.fixture
def chat_daemon(
    daemon_factory: DaemonFactory, gguf_path: str
) -> Iterator[tuple[Daemon, erllama.Client]]:
    del gguf_path  # the fixture fails the test when the model package is missing
    models = [
        {"id": "default", "backend": "llama", "context_opts": CTX, "policy": POLICY},
        {"id": "ref", "backend": "llama", "context_opts": CTX, "fingerprint": "ab" * 32,
         "policy": {**POLICY, "saves_enabled": False}},
        {"id": "raw", "backend": "llama", "context_opts": CTX, "chat_template": "gguf",
         "policy": {"saves_enabled": False}},
    ]  # fmt: skip
    d = daemon_factory(models, ready_timeout=300)
    with erllama.Client(d.endpoint, timeout=300) as c:
        yield d, c


def run(c: erllama.Client, model: str, tokens: list[int]) -> tuple[list[int], str, Any]:
    gen: list[int] = []
    pieces: list[str] = []
    stats = None
    for ev in c.infer(model, tokens, response_tokens=N_GEN):
        if ev.kind == "token":
            gen.append(ev.token_id)
            pieces.append(ev.text)
        elif ev.kind == "done":
            stats = ev.stats
    assert stats is not None
    return gen, "".join(pieces), stats


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def test_bundled_model_chats_with_single_special_tokens_and_a_warm_second_turn(
    chat_daemon: tuple[Daemon, erllama.Client],
) -> None:
    _, c = chat_daemon
    assert c.model_info("default").chat_template == "builtin:gemma3"
    # the turn markers are ONE special token each when parsed as specials, text otherwise
    start = c.tokenize("default", "<start_of_turn>", parse_special=True)
    end = c.tokenize("default", "<end_of_turn>", parse_special=True)
    assert len(start) == 2 and len(end) == 2  # BOS + the marker
    sot, eot = start[1], end[1]
    plain = c.tokenize("default", "<start_of_turn>")
    assert len(plain) > 2 and sot not in plain
    # a raw prompt with parse_special reaches the model as those tokens
    r = c.complete("default", "<start_of_turn>user\nHi<end_of_turn>\n", response_tokens=1,
                   parse_special=True)  # fmt: skip
    assert r.context_tokens[:5] == c.tokenize(
        "default", "<start_of_turn>user\nHi", parse_special=True
    )
    assert r.context_tokens[1] == sot and eot in r.context_tokens

    history: list[dict[str, str]] = [{"role": "user", "content": "Which ship is at berth 3?"}]
    t1 = c.apply_chat_template("default", {"messages": history, "system": SYSTEM})
    assert t1.count(sot) == 2 and t1.count(eot) == 1  # user turn + the generation prompt
    assert t1[-3:] == c.tokenize("default", "<start_of_turn>model\n", parse_special=True)[-3:]
    gen1, reply1, s1 = run(c, "default", t1)
    assert s1.cache_hit_kind == "cold" and gen1 and reply1.strip()

    history += [{"role": "assistant", "content": reply1},
                {"role": "user", "content": "And at berth 4?"}]  # fmt: skip
    t2 = c.apply_chat_template("default", {"messages": history, "system": SYSTEM})
    assert t2[: len(t1)] == t1  # the first turn is a prefix of the second
    assert t2.count(sot) == 4 and t2.count(eot) == 3
    c.complete("default", "Unrelated text to replace the live KV.", response_tokens=2)
    gen2, _, s2 = run(c, "default", t2)
    # a warm partial hit covering the whole first turn (its prompt and the reply's tokens
    # that the re-rendered history repeats), in the 32-token blocks the backend reuses
    shared = common_prefix(t2, t1 + gen1)
    assert shared >= len(t1)
    assert s2.cache_hit_kind == "partial"
    assert s2.cache_delta.read >= len(t1) - len(t1) % 32
    assert s2.cache_delta.read == shared - shared % 32
    ref2, _, sr = run(c, "ref", t2)
    assert sr.cache_hit_kind == "cold"
    assert gen2 == ref2  # the warm turn is token-exact against a cold run


def test_the_gguf_option_means_the_gguf_template_only(
    chat_daemon: tuple[Daemon, erllama.Client],
) -> None:
    _, c = chat_daemon
    assert c.model_info("raw").chat_template == ""
    with pytest.raises(erllama.NotSupportedError) as ei:
        c.apply_chat_template("raw", {"messages": [{"role": "user", "content": "Hi"}]})
    assert ei.value.code == "no_template"
