"""The HTTP gateway on the real model, through the official ``openai``, ``anthropic`` and
``ollama`` clients: stateless chat stays warm, structured output, embeddings.

``default`` is the bundled Gemma 3 270M as a user gets it (the built-in gemma3 chat
template); ``embed`` is the same GGUF with ``embeddings = true``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import anthropic
import ollama
import openai
import pytest

from tests.support.daemon import Daemon, daemon_factory

pytestmark = [pytest.mark.model, pytest.mark.timeout(600)]
__all__ = ["daemon_factory"]

CTX = {"n_ctx": 4096, "n_batch": 512, "n_threads": 2, "n_threads_batch": 2}
POLICY = {"min_tokens": 256, "cold_min_tokens": 256, "boundary_align_tokens": 256}
SYSTEM = "You are the harbour master. Facts: " + " ".join(
    f"Berth {i} holds the ship number {i * 7 % 50}." for i in range(40)
)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, gguf_path: str) -> Iterator[Daemon]:
    del gguf_path  # fails the module when the model package is missing
    models = [
        {"id": "default", "backend": "llama", "context_opts": CTX, "policy": POLICY},
        {"id": "embed", "backend": "llama", "context_opts": {**CTX, "embeddings": True},
         "policy": {"saves_enabled": False}},
    ]  # fmt: skip
    config = {
        "models": models,
        "supervisor": {"heartbeat_interval_s": 1.0, "drain_timeout_s": 5.0, "term_timeout_s": 5.0},
        "http": {"listen": "127.0.0.1:0"},
    }
    d = Daemon(tmp_path_factory.mktemp("gwm"), config, ready_timeout=300)
    try:
        yield d
    finally:
        d.teardown()


@pytest.fixture(scope="module")
def oai(gw: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.http_url()}/v1", api_key="none", max_retries=0)


def test_stateless_chat_gets_later_turns_from_the_cache(oai: openai.OpenAI) -> None:
    history: list[dict[str, str]] = [{"role": "system", "content": SYSTEM}]
    shares = []
    for q in ["Which ship is at berth 3?", "And at berth 4?", "And at berth 5?"]:
        history.append({"role": "user", "content": q})
        r = oai.chat.completions.create(model="default", messages=history, max_tokens=24)  # type: ignore[arg-type]
        assert r.usage is not None and r.usage.prompt_tokens_details is not None
        cached = r.usage.prompt_tokens_details.cached_tokens or 0
        shares.append(cached / r.usage.prompt_tokens)
        history.append({"role": "assistant", "content": r.choices[0].message.content or ""})
    assert shares[0] == 0.0  # the first turn is cold
    assert min(shares[1:]) >= 0.9, shares  # later turns: >= 90 % of the prompt from the cache


def test_streamed_chat_matches_the_unary_one(oai: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Name a colour."}]
    whole = oai.chat.completions.create(model="default", messages=msgs, max_tokens=12)  # type: ignore[arg-type]
    text = "".join(
        c.choices[0].delta.content or ""
        for c in oai.chat.completions.create(
            model="default",
            messages=msgs,
            max_tokens=12,
            stream=True,  # type: ignore[arg-type]
        )
        if c.choices
    )
    assert text == whole.choices[0].message.content  # greedy: the same tokens


def test_json_schema_response_is_valid_json(oai: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}  # fmt: skip
    r = oai.chat.completions.create(
        model="default", max_tokens=40,
        messages=[{"role": "user", "content": "Is the sea salty? Answer in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )  # fmt: skip
    obj = json.loads(r.choices[0].message.content or "")
    assert obj["answer"] in ("yes", "no")


def test_embeddings_through_openai_and_ollama(gw: Daemon, oai: openai.OpenAI) -> None:
    e = oai.embeddings.create(model="embed", input=["a harbour", "a harbour", "quantum flux"])
    a, b, c = (d.embedding for d in e.data)
    assert len(a) > 100 and a == b and a != c
    o = ollama.Client(host=gw.http_url()).embed(model="embed", input="a harbour")
    assert len(o.embeddings) == 1 and len(o.embeddings[0]) == len(a)


def test_anthropic_and_ollama_chat_on_the_real_model(gw: Daemon) -> None:
    client = anthropic.Anthropic(base_url=gw.http_url(), api_key="none", max_retries=0)
    msg = client.messages.create(model="default", max_tokens=16, system=SYSTEM,
                                 messages=[{"role": "user", "content": "Berth 2?"}])  # fmt: skip
    assert msg.content[0].type == "text" and msg.content[0].text.strip()
    again = client.messages.create(model="default", max_tokens=4, system=SYSTEM,
                                   messages=[{"role": "user", "content": "Berth 9?"}])  # fmt: skip
    assert (again.usage.cache_read_input_tokens or 0) >= 256  # the shared system prompt
    r = ollama.Client(host=gw.http_url()).chat(
        model="default", messages=[{"role": "user", "content": "Say hi."}],
        options={"num_predict": 8},
    )  # fmt: skip
    assert r.done and r.eval_count and r.message.content is not None
