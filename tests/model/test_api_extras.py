"""Chat templates, embeddings and LoRA adapters on the real model, through the daemon.

One daemon (module scope) runs three models:

* ``base``: the bundled Gemma 3 270M GGUF (no template of its own: the built-in gemma3), small
  save policy so ~100-token prompts are cached; the LoRA tests run here.
* ``chat``: a byte copy of the same GGUF with Gemma 3's chat template added
  (``tests/support/lora.add_chat_template``), loaded with ``embeddings = true``: chat
  templates and embeddings run here (n_batch 256), and its generation must be unaffected
  by embeds.
* ``stub``: the stub backend (fallback chat template; no embeddings, no LoRA).

The LoRA adapter is written by ``tests/support/lora.write_lora`` for the base model.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import erllama
from erllama.workers.stub import BYTE_OFFSET
from tests.support.daemon import Daemon
from tests.support.lora import GEMMA3_CHAT_TEMPLATE, add_chat_template, write_lora

pytestmark = [pytest.mark.model, pytest.mark.timeout(300)]

# one thread: on a shared, oversubscribed CPU, ggml's spinning thread barriers make two threads
# up to 10x slower than one (measured: a 100-token completion 5-13 s against 0.6-1.4 s)
CTX = {"n_ctx": 1024, "n_batch": 512, "n_threads": 1, "n_threads_batch": 1}
POLICY = {"min_tokens": 64, "cold_min_tokens": 64, "boundary_align_tokens": 64}
N_GEN = 6
BOS, START_OF_TURN, END_OF_TURN = 2, 105, 106  # Gemma 3 vocabulary

WORDS = ["river", "mountain", "cloud", "lantern", "harbour", "meadow", "copper", "violin"]


def text(seed: int, n_words: int) -> str:
    x = seed
    out = []
    for _ in range(n_words):
        x = (x * 1103515245 + 12345) % 2**31
        out.append(WORDS[x % len(WORDS)])
    return f"Notes {seed}: " + " ".join(out) + "."


@pytest.fixture(scope="module")
def files(gguf_path: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("extras_files")
    return {
        "chat": add_chat_template(gguf_path, d / "gemma-chat.gguf", GEMMA3_CHAT_TEMPLATE),
        "lora": write_lora(d / "lora.gguf", gguf_path),
        "not_lora": Path(gguf_path),
        "dir": d,
    }


@pytest.fixture(scope="module")
def daemon(
    gguf_path: str, files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    models = [
        {"id": "base", "backend": "llama", "model_path": gguf_path, "context_opts": CTX,
         "policy": POLICY},
        {"id": "chat", "backend": "llama", "model_path": str(files["chat"]),
         "context_opts": {**CTX, "n_batch": 256, "embeddings": True},
         "policy": {"saves_enabled": False}},
        {"id": "stub", "backend": "stub"},
    ]  # fmt: skip
    config = {
        "models": models,
        "supervisor": {"heartbeat_interval_s": 1.0, "drain_timeout_s": 5.0, "term_timeout_s": 3.0},
    }
    d = Daemon(tmp_path_factory.mktemp("extras_daemon"), config, ready_timeout=300)
    try:
        yield d
    finally:
        d.teardown()


@pytest.fixture
def c(daemon: Daemon) -> Iterator[erllama.Client]:
    with erllama.Client(daemon.endpoint, timeout=120) as client:
        yield client


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def code_of(exc_info: pytest.ExceptionInfo[erllama.ErllamaError]) -> str:
    return exc_info.value.code


# ================================================================ chat templates
def test_chat_template_renders_the_gguf_template(c: erllama.Client) -> None:
    request = {
        "messages": [{"role": "user", "content": "Hi there"}],
        "system": "Be brief.",
        "tools": [{"name": "get_time", "description": "Current time", "schema": {}}],
    }
    tokens = c.apply_chat_template("chat", request)

    # the oracle: llama.cpp's tokenizer splits at special tokens and tokenizes each text
    # fragment on its own, so the expected ids are the fragments' ids around the specials
    def frag(s: str) -> list[int]:
        return c.tokenize("chat", s)[1:]  # without the BOS tokenize adds

    system = "Be brief.\n\nAvailable tools:\n  - get_time: Current time"
    expected = [
        *(BOS, START_OF_TURN, *frag(f"user\n{system}\n\nHi there"), END_OF_TURN),
        *(*frag("\n"), START_OF_TURN, *frag("model\n")),
    ]
    assert tokens == expected  # exactly one BOS, although the template emits one too
    # the rendered prompt is usable as is
    gen = [ev.token_id for ev in c.infer("chat", tokens, response_tokens=4) if ev.kind == "token"]
    assert len(gen) == 4

    # a multi-turn chat with the system message given as a message
    turns = {
        "messages": [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Bonjour"},
            {"role": "user", "content": "Thanks"},
        ]
    }
    t2 = c.apply_chat_template("chat", turns)
    assert t2[:2] == [BOS, START_OF_TURN] and t2.count(START_OF_TURN) == 4
    assert c.detokenize("chat", t2).endswith("Thanks\nmodel\n")


def test_chat_template_errors_keep_the_worker(c: erllama.Client) -> None:
    ok = {"messages": [{"role": "user", "content": "Hi"}]}
    bad_content = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}
    with pytest.raises(erllama.InvalidRequestError) as ei:
        c.apply_chat_template("chat", bad_content)
    assert code_of(ei) == "invalid_content"
    with pytest.raises(erllama.InvalidRequestError) as ei:
        c.apply_chat_template("chat", {"messages": [{"role": 7, "content": "Hi"}]})
    assert code_of(ei) == "invalid_content"
    with pytest.raises(erllama.InvalidRequestError) as ei:
        c.apply_chat_template("chat", {"messages": [{"role": "user"}]})
    assert code_of(ei) == "badarg"
    with pytest.raises(erllama.InvalidRequestError) as ei:
        c.apply_chat_template("chat", {"messages": "Hi"})
    assert code_of(ei) == "badarg"
    with pytest.raises(erllama.InvalidRequestError) as ei:
        c.apply_chat_template("chat", {"messages": [], "temperature": 1})
    assert code_of(ei) == "badarg"
    # the template's own raise_exception (roles must alternate)
    two_users = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    with pytest.raises(erllama.NotSupportedError) as ei2:
        c.apply_chat_template("chat", two_users)
    assert code_of(ei2) == "template_failed" and "alternate" in ei2.value.message
    # the bundled GGUF has no template: it gets the built-in gemma3, the same text
    assert c.model_info("base").chat_template == "builtin:gemma3"
    assert c.model_info("chat").chat_template == "gguf"
    assert c.apply_chat_template("base", ok) == c.apply_chat_template("chat", ok)
    # nothing crashed: the same worker answers
    assert c.apply_chat_template("chat", ok)[0] == BOS
    assert c.model_info("chat").restarts == 0


def test_stub_chat_fallback(c: erllama.Client) -> None:
    tokens = c.apply_chat_template(
        "stub", {"messages": [{"role": "user", "content": "hi"}], "system": "S"}
    )
    text_ = "system: S\nuser: hi\nassistant:"
    assert tokens == [1] + [b + BYTE_OFFSET for b in text_.encode()]


# ================================================================ embeddings
def test_embeddings_and_generation_side_by_side(c: erllama.Client) -> None:
    def emb(s: str) -> list[float]:
        return c.embed("chat", c.tokenize("chat", s))

    cat = emb("The cat sat on the mat.")
    cat2 = emb("A cat was sitting on the mat.")
    money = emb("Quarterly revenue grew by twelve percent in the fiscal year.")
    assert len(cat) == len(cat2) == len(money) == 640  # n_embd of Gemma 3 270M
    assert all(isinstance(x, float) and math.isfinite(x) for x in cat)
    assert emb("The cat sat on the mat.") == cat  # deterministic
    assert cosine(cat, cat2) > cosine(cat, money) + 0.1
    assert cosine(cat2, cat) > cosine(cat2, money) + 0.1

    # D31: a separate embedding context; generation is unaffected, even mid-stream
    prompt = text(5, 60)
    ref = c.complete("chat", prompt, response_tokens=N_GEN).generated
    got: list[int] = []
    with c.stream("chat", prompt, response_tokens=N_GEN) as stream:
        for ev in stream:
            if ev.kind == "token" and ev.token_id is not None:
                got.append(ev.token_id)
                if len(got) == 2:
                    assert emb("The cat sat on the mat.") == cat
    assert got == ref
    assert c.complete("chat", prompt, response_tokens=N_GEN).generated == ref


def test_embed_errors(c: erllama.Client) -> None:
    def fails(model: str, tokens: list[int]) -> str:
        with pytest.raises(erllama.ErllamaError) as ei:
            c.embed(model, tokens)
        return ei.value.code

    assert fails("chat", []) == "invalid_token"
    assert fails("chat", [10**8]) == "invalid_token"
    assert fails("chat", [5] * 1024) == "context_overflow"  # n >= n_ctx
    assert fails("chat", [5] * 257) == "batch_overflow"  # n > n_batch
    assert fails("base", [5, 6]) == "not_supported"  # not loaded in embedding mode
    assert fails("stub", [5, 6]) == "not_supported"
    assert len(c.embed("chat", [5] * 256)) == 640  # exactly n_batch is fine


# ================================================================ LoRA
def test_lora_changes_output_and_cache_keys(c: erllama.Client, files: dict[str, Path]) -> None:
    p = text(1, 90)
    q = text(2, 90)
    q_tokens = c.tokenize("base", q)

    def run(prompt: str) -> erllama.Completion:
        return c.complete("base", prompt, response_tokens=N_GEN)

    base_p = run(p)
    assert c.list_adapters("base") == []

    h = c.load_adapter("base", str(files["lora"]))
    assert isinstance(h, str)
    assert c.list_adapters("base") == [{"handle": h, "scale": 1.0}]
    lora_p = run(p)
    assert lora_p.cache_hit_kind == "cold"  # base rows never serve the adapter
    assert lora_p.generated != base_p.generated

    lora_q = run(q)  # q runs only under the adapter: its rows carry the effective fingerprint
    assert lora_q.cache_hit_kind == "cold"
    hit_with = c.list_cached_prefixes("base", q_tokens)
    assert hit_with >= 64

    c.set_adapter_scale("base", h, 0.5)
    assert c.list_adapters("base") == [{"handle": h, "scale": 0.5}]
    assert c.list_cached_prefixes("base", q_tokens) == 0  # another fingerprint
    c.set_adapter_scale("base", h, 1.0)
    assert c.list_cached_prefixes("base", q_tokens) == hit_with

    c.unload_adapter("base", h)
    c.unload_adapter("base", h)  # idempotent
    assert c.list_adapters("base") == []
    assert c.list_cached_prefixes("base", q_tokens) == 0  # q was never cached without it
    assert run(p).generated == base_p.generated  # the original output, exactly
    plain_q = run(q)
    assert plain_q.cache_hit_kind == "cold"

    # the same file again: the same effective fingerprint, so its rows are hits again
    before = c.counters()
    h2 = c.load_adapter("base", str(files["lora"]))
    assert h2 != h
    again = run(q)
    assert again.cache_hit_kind == "exact" and again.generated == lora_q.generated
    assert c.counters()["hits_exact"] > before.get("hits_exact", 0)
    c.unload_adapter("base", h2)


def test_lora_errors(c: erllama.Client, files: dict[str, Path]) -> None:
    missing = str(files["dir"] / "missing.gguf")
    with pytest.raises(erllama.InvalidRequestError) as ei:
        c.load_adapter("base", missing)
    assert code_of(ei) == "enoent" and missing in ei.value.message
    assert ei.value.detail == {"path": missing}
    with pytest.raises(erllama.InvalidRequestError) as ei:
        c.load_adapter("base", str(files["dir"]))
    assert code_of(ei) == "eisdir"
    with pytest.raises(erllama.ModelLoadError) as ei3:
        c.load_adapter("base", str(files["not_lora"]))  # a model, not an adapter
    assert code_of(ei3) == "load_failed"
    with pytest.raises(erllama.UnknownModelError) as ei4:
        c.set_adapter_scale("base", "lora-999", 0.5)
    assert code_of(ei4) == "not_found"
    with pytest.raises(erllama.InvalidRequestError) as ei:
        c.set_adapter_scale("base", "lora-999", float("nan"))
    assert code_of(ei) == "badarg"
    c.unload_adapter("base", "lora-999")  # unknown handle: fine
    with pytest.raises(erllama.NotSupportedError) as ei5:
        c.load_adapter("stub", str(files["lora"]))
    assert code_of(ei5) == "not_supported"
    assert c.list_adapters("stub") == []
    assert c.list_adapters("base") == []
    assert c.model_info("base").restarts == 0


# ================================================================ the async twin
def test_async_client(daemon: Daemon, files: dict[str, Path]) -> None:
    async def main() -> dict[str, Any]:
        async with erllama.AsyncClient(daemon.endpoint, timeout=120) as ac:
            out: dict[str, Any] = {}
            req = {"messages": [{"role": "user", "content": "hi"}]}
            out["chat"] = await ac.apply_chat_template("chat", req)
            out["stub_chat"] = await ac.apply_chat_template("stub", req)
            toks = await ac.tokenize("chat", "The cat sat on the mat.")
            out["embed"] = await ac.embed("chat", toks)
            h = await ac.load_adapter("base", str(files["lora"]))
            await ac.set_adapter_scale("base", h, 0.25)
            out["listed"] = await ac.list_adapters("base")
            await ac.unload_adapter("base", h)
            out["after"] = await ac.list_adapters("base")
            try:
                await ac.embed("base", toks)
            except erllama.NotSupportedError as exc:
                out["embed_error"] = exc.code
            out["h"] = h
            return out

    out = asyncio.run(main())
    assert out["chat"][:2] == [BOS, START_OF_TURN]
    assert out["stub_chat"][0] == 1
    assert len(out["embed"]) == 640
    assert out["listed"] == [{"handle": out["h"], "scale": 0.25}]
    assert out["after"] == []
    assert out["embed_error"] == "not_supported"
