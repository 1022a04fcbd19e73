"""The real model through the real daemon: warm paths are token-exact, counters move.

Two models load the same Gemma 3 270M GGUF. ``warm`` caches normally (small
policy numbers so a ~700-token prompt saves). ``ref`` has another fingerprint
(so it never sees ``warm``'s rows) and saves nothing: its answers are cold
runs, the reference every warm path must equal token for token.

Exactness on CPU needs two things the engine guarantees (see
``workers/engine.py``): an exact hit samples from the logits stored with the
row (no re-decode of the last prompt token), and every re-prefilled stretch is
a large batch (logits of small batches take another kernel path). The
continuations below are therefore >= 128 tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import erllama
from tests.support.daemon import Daemon, DaemonFactory, daemon_factory

pytestmark = [pytest.mark.model, pytest.mark.timeout(600)]
__all__ = ["daemon_factory"]

N_GEN = 16
CTX = {"n_ctx": 4096, "n_batch": 512, "n_threads": 2, "n_threads_batch": 2}
POLICY = {"min_tokens": 256, "cold_min_tokens": 256, "boundary_align_tokens": 256}

WORDS = [
    "river",
    "mountain",
    "cloud",
    "lantern",
    "harbour",
    "meadow",
    "copper",
    "violin",
    "orchard",
    "glacier",
    "compass",
    "ember",
    "falcon",
    "quarry",
    "saddle",
    "thistle",
    "walnut",
    "beacon",
    "canyon",
    "dune",
]


def text(seed: int, n_words: int) -> str:
    x = seed
    out = []
    for _ in range(n_words):
        x = (x * 1103515245 + 12345) % 2**31
        out.append(WORDS[x % len(WORDS)])
    return f"Notes {seed}: " + " ".join(out) + "."


@pytest.fixture(scope="module")
def gguf(gguf_path: str) -> str:
    return gguf_path


@pytest.fixture(params=[1, 4], ids=["n_seq_max=1", "n_seq_max=4"])
def model_daemon(
    request: pytest.FixtureRequest, daemon_factory: DaemonFactory, gguf: str
) -> Iterator[tuple[Daemon, erllama.Client]]:
    ctx = {**CTX, "n_seq_max": request.param}
    if request.param > 1:
        ctx["n_ctx"] = 2048  # per sequence: four streams of 2048 cells
    warm = {
        "id": "warm",
        "backend": "llama",
        "model_path": gguf,
        "context_opts": ctx,
        "policy": POLICY,
    }
    ref = {"id": "ref", "backend": "llama", "model_path": gguf, "context_opts": ctx,
           "fingerprint": "ab" * 32, "policy": {**POLICY, "saves_enabled": False}}  # fmt: skip
    d = daemon_factory([warm, ref], ready_timeout=300)
    with erllama.Client(d.endpoint, timeout=300) as c:
        yield d, c


def greedy(c: erllama.Client, model: str, tokens: list[int], **opts: Any) -> tuple[list[int], Any]:
    gen: list[int] = []
    stats = None
    for ev in c.infer(model, tokens, response_tokens=N_GEN, **opts):
        if ev.kind == "token":
            gen.append(ev.token_id)
        elif ev.kind == "done":
            stats = ev.stats
    assert stats is not None
    return gen, stats


def clobber(c: erllama.Client, model: str) -> None:
    """Replace the worker's live KV with something unrelated (so only the cache can help)."""
    c.complete(model, "Unrelated: " + text(999, 40), response_tokens=2)


def test_warm_paths_are_token_exact(model_daemon: tuple[Daemon, erllama.Client]) -> None:
    _, c = model_daemon
    # several sequences: rows hold only the sliding window's cells, so a row is reused
    # only whole (never truncated), and reuse is not rounded to 32-token blocks
    window_rows = c.model_info("warm").context_size == 2048
    p = c.tokenize("warm", text(1, 500))[:506]
    x = c.tokenize("warm", text(2, 200))[1:161]  # 160 tokens, no BOS
    y = c.tokenize("warm", text(3, 200))[1:161]

    def ref(tokens: list[int]) -> list[int]:
        clobber(c, "ref")
        gen, stats = greedy(c, "ref", tokens)
        assert (stats.cache_hit_kind, stats.cache_delta.read) == ("cold", 0)
        return gen

    before = c.counters()
    # cold on warm, then (a) an exact hit restored from the ram tier
    cold_p, s = greedy(c, "warm", p)
    assert s.cache_hit_kind == "cold"
    assert cold_p == ref(p)
    clobber(c, "warm")
    exact_p, s = greedy(c, "warm", p)
    assert s.cache_hit_kind == "exact" and s.cache_delta.read == len(p)
    assert exact_p == cold_p
    assert c.last_cache_hit("warm") == erllama.CacheHit(kind="exact", prefix_len=len(p))

    # (b) a parent_key resume: prefill_only gives the key, the next prompt extends it
    key = c.prefill_only("warm", p).finish_key
    assert key is not None
    clobber(c, "warm")
    resumed, s = greedy(c, "warm", p + x, parent_key=key)
    # reuse keeps whole 32-token blocks (the llama backend's reuse_align): 480 of 506
    expect = len(p) if window_rows else len(p) - len(p) % 32
    assert s.cache_hit_kind == "partial" and s.cache_delta.read == expect
    assert resumed == ref(p + x)

    # (c) a longest-prefix hit: the row p+x(+gen) shares exactly p with p+y; truncate there
    clobber(c, "warm")
    partial, s = greedy(c, "warm", p + y)
    if window_rows:  # the longest row that is a prefix of p + y: the ladder's 256 rung
        assert s.cache_hit_kind == "partial" and s.cache_delta.read == 256
    else:
        assert s.cache_hit_kind == "partial" and s.cache_delta.read >= len(p) - len(p) % 32
    r = ref(p + y)
    assert partial == r

    after = c.counters()
    assert after["hits_exact"] > before.get("hits_exact", 0)
    assert after["hits_resume"] > before.get("hits_resume", 0)
    assert after["hits_longest_prefix"] > before.get("hits_longest_prefix", 0)
    assert after["saves_cold"] > before.get("saves_cold", 0)
    assert after["saves_finish"] > before.get("saves_finish", 0)
    assert after["bytes_ram"] > 0


@pytest.mark.parametrize("model_daemon", [1], indirect=True, ids=["n_seq_max=1"])
def test_model_errors_through_the_daemon(model_daemon: tuple[Daemon, erllama.Client]) -> None:
    _, c = model_daemon
    with pytest.raises(erllama.InvalidRequestError) as ei:
        c.infer_list = list(c.infer("warm", [5] * 5000))  # type: ignore[attr-defined]
    assert ei.value.code == "context_overflow"
    with pytest.raises(erllama.InvalidRequestError) as ei:
        list(c.infer("warm", [10**8]))
    assert ei.value.code == "invalid_token"
    with pytest.raises(erllama.InvalidRequestError) as ei:
        c.complete("warm", "hi", grammar="root ::= (")
    assert ei.value.code == "grammar_failed"
    # and the model still answers
    assert c.complete("warm", "The sky is", response_tokens=3).committed_tokens > 3
